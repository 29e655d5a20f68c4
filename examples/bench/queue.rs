//! The queue: enqueue and drain rates against pgmq measured in the same run,
//! drains after what a queue in continuous use goes through (dead rows, a
//! purge, a mass delete, a held snapshot), and pickup latency.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn::prelude::*;
use serde::{Deserialize, Serialize};
use sqlx::{Executor, PgPool};
use tokio::sync::{Notify, mpsc};

use super::peer::Pgmq;
use super::{BoxError, Running, autovacuum_stand_in, ms, peaks_by_half, redact, reference, secs};

/// How many of the jobs that finished last a drain waits to see
/// acknowledged: handlers finish a few microseconds apart, and one that
/// counted itself done before the last may hand its job to the completer
/// just after it.
const RECENT: usize = 256;

#[derive(Serialize, Deserialize)]
struct Noop {
    n: u32,
}
impl Task for Noop {
    const QUEUE: &'static str = "bench";
    type Output = ();
}

/// Jobs per drain.
const N: usize = 20_000;
/// cairn's side: an app with a no-op task that counts what it ran.
struct Cairn {
    app: App,
    pool: PgPool,
    done: Arc<AtomicUsize>,
    all_done: Arc<Notify>,
    target: Arc<AtomicUsize>,
    /// The jobs whose handlers ran last, newest at the back.
    recent: Arc<Mutex<VecDeque<i64>>>,
    picked: mpsc::UnboundedReceiver<Instant>,
}

impl Cairn {
    async fn install(url: &str) -> Result<Self, BoxError> {
        let app = App::builder()
            .database_url(url)
            .max_connections(16)
            .build()
            .await?;
        app.initialize().await?;
        app.create_queue("bench").await?;
        let done = Arc::new(AtomicUsize::new(0));
        let all_done = Arc::new(Notify::new());
        let target = Arc::new(AtomicUsize::new(usize::MAX));
        let recent = Arc::new(Mutex::new(VecDeque::with_capacity(RECENT)));
        let (picked_tx, picked) = mpsc::unbounded_channel::<Instant>();
        {
            let (done, all_done, target, recent) = (
                done.clone(),
                all_done.clone(),
                target.clone(),
                recent.clone(),
            );
            app.task(move |_job: Noop, ctx: JobContext| {
                let (done, all_done, target, recent, picked) = (
                    done.clone(),
                    all_done.clone(),
                    target.clone(),
                    recent.clone(),
                    picked_tx.clone(),
                );
                async move {
                    let _ = picked.send(Instant::now());
                    {
                        let mut recent = recent.lock().unwrap();
                        if recent.len() == RECENT {
                            recent.pop_front();
                        }
                        recent.push_back(ctx.id());
                    }
                    if done.fetch_add(1, Ordering::Relaxed) + 1 == target.load(Ordering::Relaxed) {
                        all_done.notify_one();
                    }
                    Ok(())
                }
            })?;
        }
        let pool = app.pool().clone();
        Ok(Self {
            app,
            pool,
            done,
            all_done,
            target,
            recent,
            picked,
        })
    }

    /// Enqueues `n` jobs, 1,000 per call, in one transaction: a running
    /// worker sees the whole backlog at once, at the commit.
    async fn fill(&self, n: usize) -> Result<(), BoxError> {
        let batch: Vec<Noop> = (0..1_000).map(|n| Noop { n }).collect();
        let mut tx = self.pool.begin().await?;
        let mut left = n;
        while left > 0 {
            let take = left.min(batch.len());
            self.app
                .enqueue_batch(&batch[..take])
                .execute(&mut tx)
                .await?;
            left -= take;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Starts a worker serving the queue, and lets it connect and go idle
    /// (its listener, its first claims) before anything is timed.
    async fn start_worker(&self, concurrency: usize) -> Running {
        let worker = Running::spawn(self.app.worker().queues(["bench"]).concurrency(concurrency));
        tokio::time::sleep(Duration::from_millis(300)).await;
        worker
    }

    /// Enqueues `n` jobs at once for a running, idle worker and times their
    /// drain: from the commit to the last acknowledgement landing.
    async fn drain(&self, n: usize) -> Result<f64, BoxError> {
        self.done.store(0, Ordering::Relaxed);
        self.target.store(n, Ordering::Relaxed);
        self.fill(n).await?;
        let start = Instant::now();
        self.all_done.notified().await;
        // The acknowledgements still in flight. The worker writes them in
        // the order the handlers finished, one flush at a time: once the
        // jobs that finished last are gone, so are the others. Asked for by
        // id (index probes, whatever dead rows the table holds: a scan of
        // the table took 60 ms a drain with a snapshot held), again at once
        // rather than after a sleep (a millisecond is a tenth of a
        // 1,000-job drain).
        let recent: Vec<i64> = self.recent.lock().unwrap().iter().copied().collect();
        while sqlx::query_scalar::<_, bool>(
            "select exists (select from cairn.jobs where id = any ($1))",
        )
        .bind(&recent)
        .fetch_one(&self.pool)
        .await?
        {}
        Ok(n as f64 / secs(start))
    }

    async fn vacuum(&self) -> Result<(), BoxError> {
        Ok(vacuum_jobs(&self.pool).await?)
    }
}

/// The seconds each engine took over `rounds` rounds, in rounds that
/// alternate which engine goes first, so that neither gets the machine's
/// quieter moments.
async fn alternate(
    rounds: usize,
    cairn: impl AsyncFn() -> Result<f64, BoxError>,
    pgmq: impl AsyncFn() -> Result<f64, BoxError>,
) -> Result<(f64, f64), BoxError> {
    let (mut c, mut p) = (0.0, 0.0);
    for round in 0..rounds {
        if round % 2 == 0 {
            c += cairn().await?;
            p += pgmq().await?;
        } else {
            p += pgmq().await?;
            c += cairn().await?;
        }
    }
    Ok((c, p))
}

/// One drain figure: cairn, pgmq and the ratio.
fn compare(label: &str, cairn: f64, pgmq: f64) {
    println!(
        "{label:<46} {cairn:>9.0} /s  pgmq {pgmq:>9.0} /s   {:>5.2} x",
        cairn / pgmq
    );
}

pub async fn run(url: &str, long: bool) -> Result<(), BoxError> {
    let mut cairn = Cairn::install(url).await?;
    let pgmq = Pgmq::install(url).await?;
    let pool = cairn.pool.clone();

    println!(
        "cairn queue benchmark against pgmq, same run (PostgreSQL at {})",
        redact(url)
    );
    let (ref_rate, ref_p50) = reference(&pool, 5_000).await?;
    println!(
        "{:<46} {ref_rate:>9.0} /s   (p50 round trip {:.3} ms)",
        "reference: single-row UPDATE transactions",
        ms(ref_p50)
    );

    enqueue(&cairn, &pgmq, 1).await?;
    cairn.app.purge_queue("bench").await?;
    pgmq.purge().await?;

    // Each side's best settings: a short sweep on a clean table.
    let mut best = (0.0, 0, 0);
    for (consumers, batch) in [(2, 100), (4, 100), (8, 100), (4, 500)] {
        pgmq.vacuum(&pool).await?;
        pgmq.fill(N).await?;
        let rate = pgmq.drain(N, consumers, batch).await?;
        println!(
            "{:<46} {rate:>9.0} /s",
            format!("  pgmq drain, {consumers} consumers x {batch} per read")
        );
        if rate > best.0 {
            best = (rate, consumers, batch);
        }
    }
    let (_, consumers, batch) = best;
    let mut best = (0.0, 0);
    for concurrency in [64, 256, 1024] {
        cairn.vacuum().await?;
        let worker = cairn.start_worker(concurrency).await;
        let rate = cairn.drain(N).await?;
        worker.stop().await?;
        println!(
            "{:<46} {rate:>9.0} /s",
            format!("  cairn drain, one worker, concurrency {concurrency}")
        );
        if rate > best.0 {
            best = (rate, concurrency);
        }
    }
    let (_, concurrency) = best;
    println!(
        "from here on: pgmq {consumers} consumers x {batch} per read; cairn one worker, concurrency {concurrency}"
    );

    // The drains. Each engine goes through the same history on its own
    // table; cairn's worker is running and idle when its backlog commits.
    let mut figures = Vec::new();
    let mut drain_both = async |label: &str, cairn: &Cairn| -> Result<(), BoxError> {
        let worker = cairn.start_worker(concurrency).await;
        let c = cairn.drain(N).await?;
        let stats = worker.stop().await?;
        let per_claim = stats.completed as f64 / stats.claims.max(1) as f64;
        let p = pgmq.drain(N, consumers, batch).await?;
        compare(label, c, p);
        println!("{:<46} {per_claim:>9.1} jobs per claim", "");
        figures.push((label.to_owned(), c, p));
        Ok(())
    };

    cairn.vacuum().await?;
    pgmq.vacuum(&pool).await?;
    pgmq.fill(N).await?;
    drain_both("drain 20,000, clean table", &cairn).await?;

    pgmq.fill(N).await?;
    drain_both("drain 20,000 again (dead rows, no vacuum)", &cairn).await?;

    cairn.fill(N).await?;
    pgmq.fill(N).await?;
    cairn.app.purge_queue("bench").await?;
    pgmq.purge().await?;
    pgmq.fill(N).await?;
    drain_both("drain 20,000 right after a purge of 20,000", &cairn).await?;

    cairn.fill(N).await?;
    pgmq.fill(N).await?;
    pool.execute("select count(cairn.delete('bench', id)) from cairn.jobs")
        .await?;
    pgmq.delete_all(&pool).await?;
    pgmq.fill(N).await?;
    drain_both("drain 20,000 right after deleting 20,000", &cairn).await?;

    let worker = cairn.start_worker(concurrency).await;
    let c = cairn.drain(1_000).await?;
    worker.stop().await?;
    pgmq.fill(1_000).await?;
    let p = pgmq.drain(1_000, consumers, batch).await?;
    compare("drain a backlog of 1,000", c, p);
    figures.push(("backlog 1,000".into(), c, p));

    if long {
        let big = 1_000_000;
        let worker = cairn.start_worker(concurrency).await;
        let c = cairn.drain(big).await?;
        worker.stop().await?;
        pgmq.fill(big).await?;
        let p = pgmq.drain(big, consumers, batch).await?;
        compare("drain a backlog of 1,000,000", c, p);
        figures.push(("backlog 1,000,000".into(), c, p));
    }

    let rates: Vec<f64> = figures.iter().map(|f| f.1).collect();
    let (lo, hi) = rates
        .iter()
        .fold((f64::MAX, 0.0_f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    let worst = figures.iter().map(|f| f.1 / f.2).fold(f64::MAX, f64::min);
    println!(
        "{:<46} {:>9.2} x   (fastest / slowest cairn drain above)",
        "spread across histories and backlogs",
        hi / lo
    );
    println!(
        "{:<46} {worst:>9.2} x   (the lowest cairn / pgmq ratio above)",
        "worst ratio to pgmq"
    );

    if long {
        held_snapshot(&cairn, &pgmq, &pool, concurrency, (consumers, batch)).await?;
        soak(&cairn, concurrency).await?;
    }

    pickup_latency(&mut cairn, ref_p50).await?;
    cairn.app.pool().close().await;
    Ok(())
}

/// Drains while another connection holds a snapshot open for two minutes
/// (the xmin horizon held back, so vacuum can remove nothing): the rate
/// of the last drain against the rate before the snapshot was taken.
async fn held_snapshot(
    cairn: &Cairn,
    pgmq: &Pgmq,
    pool: &PgPool,
    concurrency: usize,
    (consumers, batch): (usize, i32),
) -> Result<(), BoxError> {
    // What autovacuum would have done by now (it is off on this machine's
    // server): after `--long`'s 1,000,000-job backlog, both tables hold a
    // million dead rows that no snapshot protects.
    cairn.vacuum().await?;
    pgmq.vacuum(pool).await?;
    let worker = cairn.start_worker(concurrency).await;
    let c_before = cairn.drain(N).await?;
    pgmq.fill(N).await?;
    let p_before = pgmq.drain(N, consumers, batch).await?;
    let mut holder = pool.acquire().await?;
    holder
        .execute("begin isolation level repeatable read; select count(*) from cairn.queues")
        .await?;
    let start = Instant::now();
    let (mut c_last, mut p_last, mut rounds) = (0.0, 0.0, 0);
    while start.elapsed() < Duration::from_secs(120) {
        c_last = cairn.drain(N).await?;
        pgmq.fill(N).await?;
        p_last = pgmq.drain(N, consumers, batch).await?;
        rounds += 1;
    }
    holder.execute("commit").await?;
    worker.stop().await?;
    compare(
        &format!("drain with a snapshot held 2 min ({rounds} x 20,000)"),
        c_last,
        p_last,
    );
    println!(
        "{:<46} {:>9.2} x   (pgmq {:.2} x) the rate before the snapshot",
        "",
        c_last / c_before,
        p_last / p_before
    );
    Ok(())
}

/// The held snapshot alone (`bench -- held`): pgmq with 4 consumers x 500
/// per read, cairn at concurrency 1,024 (the usual best settings of both).
pub async fn run_held(url: &str) -> Result<(), BoxError> {
    let cairn = Cairn::install(url).await?;
    let pgmq = Pgmq::install(url).await?;
    let pool = cairn.pool.clone();
    println!(
        "cairn and pgmq with a snapshot held (PostgreSQL at {})",
        redact(url)
    );
    held_snapshot(&cairn, &pgmq, &pool, 1024, (4, 500)).await?;
    cairn.app.pool().close().await;
    Ok(())
}

/// The enqueue figures alone (`bench -- enqueue`), five times as many
/// rounds as in `bench -- queue`.
pub async fn run_enqueue(url: &str) -> Result<(), BoxError> {
    let cairn = Cairn::install(url).await?;
    let pgmq = Pgmq::install(url).await?;
    println!("cairn and pgmq enqueue (PostgreSQL at {})", redact(url));
    enqueue(&cairn, &pgmq, 5).await?;
    cairn.app.pool().close().await;
    Ok(())
}

/// Enqueue rates, one by one and batched, in alternating rounds: `scale`
/// times 3,000 single sends and 100,000 batched ones per engine.
async fn enqueue(cairn: &Cairn, pgmq: &Pgmq, scale: usize) -> Result<(), BoxError> {
    let (one, one_pgmq) = alternate(
        6 * scale,
        async || {
            let start = Instant::now();
            for i in 0..500 {
                cairn.app.enqueue(&Noop { n: i }).await?;
            }
            Ok(secs(start))
        },
        async || pgmq.send_one_by_one(500).await,
    )
    .await?;
    compare(
        &format!("enqueue one by one ({})", thousands(3_000 * scale)),
        (3_000 * scale) as f64 / one,
        (3_000 * scale) as f64 / one_pgmq,
    );
    let batch: Vec<Noop> = (0..1_000).map(|n| Noop { n }).collect();
    let (batched, batched_pgmq) = alternate(
        10 * scale,
        async || {
            let start = Instant::now();
            for _ in 0..10 {
                cairn.app.enqueue_batch(&batch).await?;
            }
            Ok(secs(start))
        },
        async || pgmq.send_batched(10_000).await,
    )
    .await?;
    compare(
        &format!(
            "enqueue batched, 1,000 per call ({})",
            thousands(100_000 * scale)
        ),
        (100_000 * scale) as f64 / batched,
        (100_000 * scale) as f64 / batched_pgmq,
    );
    Ok(())
}

/// `n` with a comma every three digits, as the figures' labels write it.
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

/// The soak alone (`bench -- soak`), at concurrency 1,024.
pub async fn run_soak(url: &str) -> Result<(), BoxError> {
    let cairn = Cairn::install(url).await?;
    println!("cairn queue soak (PostgreSQL at {})", redact(url));
    soak(&cairn, 1024).await?;
    cairn.app.pool().close().await;
    Ok(())
}

/// A soak: jobs enqueued for three minutes while a worker drains them at
/// full speed (the producer keeps at most 20,000 waiting; several million
/// jobs in all), the size of cairn.jobs with its indexes and its dead rows
/// sampled every 10 s. Three minutes, because autovacuum looks at a
/// database once a minute by default (`autovacuum_naptime`): a shorter soak
/// ends before the first vacuum. With autovacuum keeping up, the size
/// stops growing.
async fn soak(cairn: &Cairn, concurrency: usize) -> Result<(), BoxError> {
    const FOR: Duration = Duration::from_secs(180);
    let pool = &cairn.pool;
    cairn.done.store(0, Ordering::Relaxed);
    cairn.target.store(usize::MAX, Ordering::Relaxed);
    let worker = cairn.start_worker(concurrency).await;
    let batch: Vec<Noop> = (0..1_000).map(|n| Noop { n }).collect();
    let size = "select pg_total_relation_size('cairn.jobs')::float8 / 1048576, \
                       coalesce(n_dead_tup, 0), coalesce(autovacuum_count + vacuum_count, 0) \
                  from pg_stat_user_tables where relid = 'cairn.jobs'::regclass";
    // Autovacuum is what keeps a queue table small: without it, the soak
    // vacuums in its place, and says so.
    let stand_in = autovacuum_stand_in(pool, VACUUM_JOBS).await?;
    println!(
        "soak: 3 minutes at full speed; cairn.jobs with its indexes{}:",
        if stand_in.running() {
            " (autovacuum is off on this server: VACUUM ANALYZE every 10 s in its place)"
        } else {
            ""
        }
    );
    let start = Instant::now();
    let mut next_sample = Duration::ZERO;
    let mut sent = 0;
    let mut samples = Vec::new();
    while start.elapsed() < FOR || cairn.done.load(Ordering::Relaxed) < sent {
        if start.elapsed() >= next_sample {
            let (mb, dead, vacuums): (f64, i64, i64) = sqlx::query_as(size).fetch_one(pool).await?;
            let done = cairn.done.load(Ordering::Relaxed);
            println!(
                "  {:>5.0} s  {done:>9} done  {mb:>7.1} MiB  {dead:>8} dead rows  {vacuums:>3} vacuums",
                secs(start)
            );
            samples.push(mb);
            next_sample += Duration::from_secs(10);
        }
        let waiting = sent - cairn.done.load(Ordering::Relaxed);
        if start.elapsed() < FOR && waiting < 20_000 {
            cairn.app.enqueue_batch(&batch).await?;
            sent += batch.len();
        } else {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let rate = sent as f64 / secs(start);
    worker.stop().await?;
    drop(stand_in);
    let (first, second) = peaks_by_half(&samples);
    println!(
        "{:<46} {rate:>9.0} /s   largest size, second half {second:.1} MiB vs first half {first:.1} MiB",
        format!("soak of {sent}"),
    );
    Ok(())
}

const VACUUM_JOBS: &str = "vacuum analyze cairn.jobs";

async fn vacuum_jobs(pool: &PgPool) -> Result<(), sqlx::Error> {
    pool.execute(VACUUM_JOBS).await.map(|_| ())
}

/// One job at a time to an idle worker: from before the enqueue call to the
/// handler's start (the NOTIFY path).
async fn pickup_latency(cairn: &mut Cairn, ref_p50: Duration) -> Result<(), BoxError> {
    cairn.target.store(usize::MAX, Ordering::Relaxed);
    while cairn.picked.try_recv().is_ok() {}
    let worker = cairn.start_worker(16).await;
    let (mut lat, mut enqueue) = (Vec::with_capacity(500), Vec::with_capacity(500));
    for i in 0..500 {
        tokio::time::sleep(Duration::from_millis(3)).await; // let it go idle
        let sent = Instant::now();
        cairn.app.enqueue(&Noop { n: i }).await?;
        enqueue.push(sent.elapsed());
        let started = cairn.picked.recv().await.ok_or("worker stopped")?;
        lat.push(started - sent);
    }
    worker.stop().await?;
    let p50_p99 = |v: &mut Vec<Duration>| {
        v.sort();
        (ms(v[v.len() / 2]), ms(v[v.len() * 99 / 100]))
    };
    let (lat50, lat99) = p50_p99(&mut lat);
    let (enq50, enq99) = p50_p99(&mut enqueue);
    println!(
        "{:<46} p50 {lat50:.3} ms, p99 {lat99:.3} ms   ({:.1} x / {:.1} x reference round trip)",
        "pickup latency, idle worker (500 jobs)",
        lat50 / ms(ref_p50),
        lat99 / ms(ref_p50),
    );
    // The part the worker has no say in: the producer's own call, until
    // its commit is flushed.
    println!(
        "{:<46} p50 {enq50:.3} ms, p99 {enq99:.3} ms",
        "  of which the enqueue call, with its commit"
    );
    Ok(())
}
