//! The worker against a real database: typed handlers, retries, dead letters,
//! LISTEN/NOTIFY wake-ups with the poll fallback, leases and shutdown.

mod common;

use std::time::{Duration, Instant};

use cairn::{App, Backoff, HandlerError, RetryPolicy, Task, WorkerStats};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Every handler run records (job id, attempt, payload n) here, so tests
/// count effects in the database rather than in memory.
async fn effects_table(pool: &PgPool) {
    sqlx::query(
        "create table effects (job_id bigint, attempt int, n bigint,
                               at timestamptz default clock_timestamp())",
    )
    .execute(pool)
    .await
    .unwrap();
}

async fn record(pool: &PgPool, ctx: &cairn::JobContext, n: i64) {
    sqlx::query("insert into effects (job_id, attempt, n) values ($1, $2, $3)")
        .bind(ctx.id())
        .bind(ctx.attempt() as i32)
        .bind(n)
        .execute(pool)
        .await
        .unwrap();
}

async fn effects(pool: &PgPool) -> i64 {
    common::scalar_i64(pool, "select count(*) from effects").await
}

struct Running {
    stop: CancellationToken,
    handle: JoinHandle<cairn::Result<WorkerStats>>,
}

impl Running {
    async fn stop(self) -> WorkerStats {
        self.stop.cancel();
        self.handle.await.unwrap().unwrap()
    }
}

fn start(builder: cairn::WorkerBuilder) -> Running {
    let stop = CancellationToken::new();
    let handle = tokio::spawn(builder.run_until(stop.clone().cancelled_owned()));
    Running { stop, handle }
}

#[derive(Serialize, Deserialize)]
struct Count {
    n: i64,
}
impl Task for Count {
    const QUEUE: &'static str = "count";
    type Output = ();
}

async fn count_app(pool: &PgPool) -> App {
    let app = common::app(pool).await;
    effects_table(pool).await;
    app.create_queue("count").await.unwrap();
    let db = pool.clone();
    app.task(move |job: Count, ctx| {
        let db = db.clone();
        async move {
            record(&db, &ctx, job.n).await;
            Ok(())
        }
    })
    .unwrap();
    app
}

#[sqlx::test(migrations = false)]
async fn typed_jobs_from_rust_sql_transactions_and_batches(pool: PgPool) {
    let app = count_app(&pool).await;
    app.enqueue(&Count { n: 1 }).await.unwrap();
    // Inside the caller's transaction: exists iff the transaction commits.
    let mut tx = pool.begin().await.unwrap();
    app.enqueue(&Count { n: 2 })
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    app.enqueue(&Count { n: 666 })
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    sqlx::query("select cairn.send('count', '{\"n\": 3}')")
        .execute(&pool)
        .await
        .unwrap();
    let batch: Vec<Count> = (4..=8).map(|n| Count { n }).collect();
    let ids = app.enqueue_batch(&batch).await.unwrap();
    assert_eq!(ids.len(), 5);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids come back in order"
    );
    let sent: Vec<i64> = sqlx::query_scalar(
        "select (j.payload->>'n')::bigint from unnest($1::bigint[]) with ordinality as u(id, i) \
           join cairn.jobs j on j.id = u.id order by u.i",
    )
    .bind(&ids)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        sent,
        (4..=8).collect::<Vec<_>>(),
        "the n-th id is the n-th job's"
    );

    let worker = start(app.worker().queues(["count"]).concurrency(4));
    common::wait_for("8 effects", Duration::from_secs(10), || async {
        effects(&pool).await >= 8
    })
    .await;
    let stats = worker.stop().await;
    let ns: Vec<i64> = sqlx::query_scalar("select n from effects order by n")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(ns, (1..=8).collect::<Vec<_>>());
    assert_eq!(stats.completed, 8);
    let left = app.metrics("count").await.unwrap();
    assert_eq!((left.ready, left.in_flight, left.dead), (0, 0, 0));
}

#[derive(Serialize, Deserialize)]
struct Receipt {
    order: i64,
}
#[derive(Serialize)]
struct Charged {
    order: i64,
    cents: i64,
}
impl Task for Receipt {
    const QUEUE: &'static str = "receipts";
    const ARCHIVE: bool = true;
    type Output = Charged;
}

#[sqlx::test(migrations = false)]
async fn archived_tasks_keep_their_typed_output(pool: PgPool) {
    let app = common::app(&pool).await;
    app.create_queue("receipts").await.unwrap();
    app.task(|r: Receipt, _ctx| async move {
        Ok(Charged {
            order: r.order,
            cents: 1250,
        })
    })
    .unwrap();
    let id = app.enqueue(&Receipt { order: 7 }).await.unwrap();
    let worker = start(app.worker().queues(["receipts"]));
    common::wait_for("the archive row", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.archive").await == 1
    })
    .await;
    worker.stop().await;
    let output: String = sqlx::query_scalar(
        "select output::text from cairn.archive where id = $1 and outcome = 'completed'",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(output, r#"{"cents": 1250, "order": 7}"#);
}

#[sqlx::test(migrations = false)]
async fn an_undecodable_payload_is_dead_lettered_and_the_worker_goes_on(pool: PgPool) {
    let app = count_app(&pool).await;
    let bad: i64 = sqlx::query_scalar("select cairn.send('count', '{\"n\": \"seven\"}')")
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query("select cairn.send('count', 'null')")
        .execute(&pool)
        .await
        .unwrap();
    app.enqueue(&Count { n: 5 }).await.unwrap();
    let worker = start(app.worker().queues(["count"]));
    common::wait_for(
        "the good job and two dead letters",
        Duration::from_secs(10),
        || async { effects(&pool).await == 1 && app.metrics("count").await.unwrap().dead == 2 },
    )
    .await;
    let stats = worker.stop().await;
    assert_eq!((stats.completed, stats.dead, stats.retried), (1, 2, 0));
    let (attempts, error): (i32, String) = sqlx::query_as(
        "select attempts, last_error from cairn.archive where id = $1 and outcome = 'dead'",
    )
    .bind(bad)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(attempts, 1, "a decode error is never retried");
    assert!(
        error.contains("does not deserialize into") && error.contains("Count"),
        "{error}"
    );
    assert!(error.contains("invalid type: string \"seven\""), "{error}");
}

#[derive(Serialize, Deserialize)]
struct Flaky {
    mode: String,
}
impl Task for Flaky {
    const QUEUE: &'static str = "flaky";
    type Output = ();
    fn retry_policy() -> RetryPolicy {
        RetryPolicy::default()
            .max_attempts(3)
            .backoff(Backoff::Fixed(Duration::from_millis(150)))
            .jitter(0.0)
    }
}

async fn flaky_app(pool: &PgPool) -> App {
    let app = common::app(pool).await;
    effects_table(pool).await;
    app.create_queue("flaky").await.unwrap();
    let db = pool.clone();
    app.task(move |job: Flaky, ctx| {
        let db = db.clone();
        async move {
            record(&db, &ctx, 0).await;
            match (job.mode.as_str(), ctx.attempt()) {
                ("always", _) => Err(HandlerError::retryable("still broken")),
                ("fatal", _) => Err(HandlerError::fatal("card declined")),
                ("after", 1) => Err(HandlerError::retry_after(
                    Duration::from_millis(400),
                    "busy",
                )),
                ("panic", 1) => panic!("handler bug"),
                _ => Ok(()),
            }
        }
    })
    .unwrap();
    app
}

async fn attempt_gaps_ms(pool: &PgPool, job: i64) -> Vec<f64> {
    sqlx::query_scalar(
        "select (extract(epoch from at - lag(at) over (order by at)) * 1000)::float8
           from effects where job_id = $1 order by at offset 1",
    )
    .bind(job)
    .fetch_all(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn retries_back_off_durably_then_dead_letter_and_can_be_requeued(pool: PgPool) {
    let app = flaky_app(&pool).await;
    let always = app
        .enqueue(&Flaky {
            mode: "always".into(),
        })
        .await
        .unwrap();
    let fatal = app
        .enqueue(&Flaky {
            mode: "fatal".into(),
        })
        .await
        .unwrap();
    let after = app
        .enqueue(&Flaky {
            mode: "after".into(),
        })
        .await
        .unwrap();
    let panics = app
        .enqueue(&Flaky {
            mode: "panic".into(),
        })
        .await
        .unwrap();
    let worker = start(
        app.worker()
            .queues(["flaky"])
            .poll_interval(Duration::from_millis(50)),
    );
    common::wait_for("all four settled", Duration::from_secs(10), || async {
        let m = app.metrics("flaky").await.unwrap();
        m.dead == 2 && m.ready + m.delayed + m.in_flight == 0
    })
    .await;

    let attempts = |job: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i32>(
                "select attempt from effects where job_id = $1 order by at",
            )
            .bind(job)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    assert_eq!(
        attempts(always).await,
        [1, 2, 3],
        "max_attempts 3, then dead"
    );
    assert_eq!(attempts(fatal).await, [1], "fatal: no retry");
    assert_eq!(attempts(after).await, [1, 2]);
    assert_eq!(
        attempts(panics).await,
        [1, 2],
        "a panic is a retryable failure"
    );
    // The waits happened on the database clock (the job's visibility).
    assert!(
        attempt_gaps_ms(&pool, always)
            .await
            .iter()
            .all(|&g| g >= 150.0)
    );
    assert!(attempt_gaps_ms(&pool, after).await[0] >= 400.0);
    let errors: Vec<String> = sqlx::query_scalar(
        "select last_error from cairn.archive where outcome = 'dead' order by id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        errors,
        ["still broken (attempt 3 of 3, giving up)", "card declined"]
    );

    // A dead letter is retryable by hand: it runs again from attempt 1.
    assert!(app.requeue("flaky", always).await.unwrap());
    common::wait_for(
        "the requeued job to die again",
        Duration::from_secs(10),
        || async {
            app.metrics("flaky").await.unwrap().dead == 2 && attempts(always).await.len() == 6
        },
    )
    .await;
    let stats = worker.stop().await;
    assert_eq!((stats.completed, stats.dead), (2, 3));
    assert_eq!(attempts(always).await, [1, 2, 3, 1, 2, 3]);
}

async fn listener_pid(pool: &PgPool) -> Option<i32> {
    sqlx::query_scalar(
        "select pid from pg_stat_activity
          where datname = current_database() and query like 'LISTEN%' and pid <> pg_backend_pid()",
    )
    .fetch_optional(pool)
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn notify_wakes_an_idle_worker_and_the_listener_reconnects(pool: PgPool) {
    let app = count_app(&pool).await;
    // A poll period far longer than the test: only NOTIFY can wake it.
    let worker = start(
        app.worker()
            .queues(["count"])
            .poll_interval(Duration::from_secs(600)),
    );
    common::wait_for("LISTEN", Duration::from_secs(10), || async {
        listener_pid(&pool).await.is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await; // let the start-up claim go idle

    let t = Instant::now();
    app.enqueue(&Count { n: 1 }).await.unwrap();
    common::wait_for("pickup", Duration::from_secs(5), || async {
        effects(&pool).await == 1
    })
    .await;
    let woke_in = t.elapsed();

    // Cut the LISTEN connection: the worker reconnects and wakes again.
    let old = listener_pid(&pool).await.unwrap();
    sqlx::query("select pg_terminate_backend($1)")
        .bind(old)
        .execute(&pool)
        .await
        .unwrap();
    common::wait_for(
        "a new LISTEN connection",
        Duration::from_secs(10),
        || async { listener_pid(&pool).await.is_some_and(|pid| pid != old) },
    )
    .await;
    app.enqueue(&Count { n: 2 }).await.unwrap();
    common::wait_for("pickup after reconnect", Duration::from_secs(5), || async {
        effects(&pool).await == 2
    })
    .await;
    let stats = worker.stop().await;
    assert_eq!(stats.listener_reconnects, 1);
    assert!(
        woke_in < Duration::from_secs(5),
        "woken by NOTIFY in {woke_in:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn without_notifications_the_poll_finds_the_work(pool: PgPool) {
    let app = count_app(&pool).await;
    let worker = start(
        app.worker()
            .queues(["count"])
            .poll_interval(Duration::from_millis(200)),
    );
    common::wait_for("LISTEN", Duration::from_secs(10), || async {
        listener_pid(&pool).await.is_some()
    })
    .await;
    // A delayed job sends no NOTIFY when it becomes visible; and with the
    // listener killed, immediate jobs' notifications are lost too.
    app.enqueue(&Count { n: 1 })
        .delay(Duration::from_millis(300))
        .await
        .unwrap();
    let pid = listener_pid(&pool).await.unwrap();
    sqlx::query("select pg_terminate_backend($1)")
        .bind(pid)
        .execute(&pool)
        .await
        .unwrap();
    for n in 2..=20 {
        app.enqueue(&Count { n }).await.unwrap();
    }
    common::wait_for("all 20 jobs", Duration::from_secs(10), || async {
        effects(&pool).await == 20
    })
    .await;
    worker.stop().await;
    let distinct = common::scalar_i64(&pool, "select count(distinct n) from effects").await;
    assert_eq!(distinct, 20);
}

/// The worker's claims resume (less 50 ms) where its last claim stopped in
/// the queue's order; a job committed late behind that position (its
/// transaction began well before the others') is found by the claim from
/// the head it makes about once a second, and runs once.
#[sqlx::test(migrations = false)]
async fn a_job_committed_behind_the_claims_still_runs(pool: PgPool) {
    let app = count_app(&pool).await;
    let worker = start(app.worker().queues(["count"]));
    common::wait_for("LISTEN", Duration::from_secs(10), || async {
        listener_pid(&pool).await.is_some()
    })
    .await;
    let mut late = pool.begin().await.unwrap();
    app.enqueue(&Count { n: 1 })
        .execute(&mut *late)
        .await
        .unwrap();
    // Longer than the margin the worker resumes before its position.
    tokio::time::sleep(Duration::from_millis(150)).await;
    for n in 2..=5 {
        app.enqueue(&Count { n }).await.unwrap();
    }
    common::wait_for(
        "the jobs sent after it",
        Duration::from_secs(10),
        || async { effects(&pool).await == 4 },
    )
    .await;
    late.commit().await.unwrap();
    common::wait_for("the late job", Duration::from_secs(5), || async {
        effects(&pool).await == 5
    })
    .await;
    worker.stop().await;
    let distinct = common::scalar_i64(&pool, "select count(distinct n) from effects").await;
    assert_eq!(distinct, 5);
}

#[derive(Serialize, Deserialize)]
struct Slow {
    millis: u64,
}
impl Task for Slow {
    const QUEUE: &'static str = "slow";
    type Output = ();
}

async fn slow_app(pool: &PgPool) -> App {
    let app = common::app(pool).await;
    effects_table(pool).await;
    app.create_queue("slow").await.unwrap();
    let db = pool.clone();
    app.task(move |job: Slow, ctx| {
        let db = db.clone();
        async move {
            record(&db, &ctx, job.millis as i64).await;
            tokio::time::sleep(Duration::from_millis(job.millis)).await;
            Ok(())
        }
    })
    .unwrap();
    app
}

#[sqlx::test(migrations = false)]
async fn long_jobs_keep_their_lease_across_workers(pool: PgPool) {
    let app = slow_app(&pool).await;
    let id = app.enqueue(&Slow { millis: 2000 }).await.unwrap();
    // Two workers compete; the lease (600 ms) is much shorter than the job.
    let lease = Duration::from_millis(600);
    let a = start(
        app.worker()
            .queues(["slow"])
            .lease(lease)
            .poll_interval(Duration::from_millis(50)),
    );
    let b = start(
        app.worker()
            .queues(["slow"])
            .lease(lease)
            .poll_interval(Duration::from_millis(50)),
    );
    common::wait_for("the job to finish", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.jobs").await == 0
    })
    .await;
    let (sa, sb) = (a.stop().await, b.stop().await);
    let runs: i64 = sqlx::query_scalar("select count(*) from effects where job_id = $1")
        .bind(id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(runs, 1, "the heartbeat kept the lease: no second delivery");
    assert_eq!(sa.completed + sb.completed, 1);
    assert_eq!(sa.refused + sb.refused, 0);
}

#[sqlx::test(migrations = false)]
async fn shutdown_finishes_short_jobs_and_releases_long_ones(pool: PgPool) {
    let app = slow_app(&pool).await;
    app.enqueue(&Slow { millis: 300 }).await.unwrap();
    let long = app.enqueue(&Slow { millis: 60_000 }).await.unwrap();
    let worker = start(
        app.worker()
            .queues(["slow"])
            .shutdown_timeout(Duration::from_millis(1000)),
    );
    common::wait_for("both started", Duration::from_secs(10), || async {
        effects(&pool).await == 2
    })
    .await;
    let stats = worker.stop().await;
    assert_eq!((stats.completed, stats.released), (1, 1));
    let (attempts, leased): (i32, bool) = sqlx::query_as(
        "select attempts, lease is not null or leased_until is not null from cairn.jobs where id = $1",
    )
    .bind(long)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (attempts, leased),
        (0, false),
        "released: visible now, delivery uncounted"
    );
}
