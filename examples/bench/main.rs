//! Benchmarks, printed as figures and as ratios to a reference measured in
//! the same run on the same database (this machine is shared and noisy).
//!
//! ```text
//! cargo run --release --example bench -- queue [--long]
//! cargo run --release --example bench -- workflow
//! cargo run --release --example bench -- flow
//! cargo run --release --example bench -- otel
//! cargo run --release --example bench -- scale
//! cargo run --release --example bench -- soak
//! cargo run --release --example bench -- held
//! cargo run --release --example bench -- enqueue
//! cargo run --release --example bench -- run-soak [--long]
//! ```
//!
//! Uses a scratch database `cairn_bench` on the server of DATABASE_URL
//! (default the local Postgres), created fresh and dropped at the end. The
//! queue benchmark installs pgmq's SQL there too (through the `pgmq` crate,
//! no extension needed) and measures it in the same run, on the same server.
//! `--long` adds the cases that take minutes: a 1,000,000-job backlog, a
//! drain while another transaction holds its snapshot for two minutes, and
//! the soak (1,000,000 jobs at full speed, table sizes sampled); `soak` and
//! `held` run the last two alone, `enqueue` the enqueue figures (five times
//! as many rounds). `scale` drains with 1, 2 and 4 worker processes.
//! `run-soak` runs workflows for three minutes (ten with `--long`) under a
//! 10-second retention window and samples the size of every table a run
//! writes.

mod flow;
mod otel;
mod peer;
mod queue;
mod run_soak;
mod scale;
mod workflow;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn::{WorkerBuilder, WorkerStats};
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::sync::Notify;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let what = args.next().unwrap_or_else(|| "queue".into());
    if what == "scale-worker" {
        let url = args.next().ok_or("scale-worker needs a database URL")?;
        return scale::worker(&url).await;
    }
    let long = args.any(|a| a == "--long");
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut admin = PgConnection::connect(&server).await?;
    admin
        .execute("drop database if exists cairn_bench with (force)")
        .await?;
    admin.execute("create database cairn_bench").await?;
    let url = match server.rsplit_once('/') {
        Some((base, _)) => format!("{base}/cairn_bench"),
        None => return Err("DATABASE_URL must name a database".into()),
    };
    let result = match what.as_str() {
        "queue" => queue::run(&url, long).await,
        "workflow" => workflow::run(&url).await,
        "flow" => flow::run(&url).await,
        "otel" => otel::run(&url).await,
        "scale" => scale::run(&url).await,
        "soak" => queue::run_soak(&url).await,
        "held" => queue::run_held(&url).await,
        "enqueue" => queue::run_enqueue(&url).await,
        "run-soak" => run_soak::run(&url, long).await,
        other => Err(format!(
            "unknown benchmark {other:?}; try: queue, enqueue, workflow, flow, otel, scale, soak, held, run-soak"
        )
        .into()),
    };
    admin
        .execute("drop database if exists cairn_bench with (force)")
        .await?;
    result
}

/// The reference: bare single-row UPDATE transactions, one after another,
/// from one connection. Returns (transactions/s, p50 round trip).
async fn reference(pool: &PgPool, n: usize) -> Result<(f64, Duration), BoxError> {
    sqlx::query("create table if not exists bench_ref (id int primary key, n bigint)")
        .execute(pool)
        .await?;
    sqlx::query("insert into bench_ref values (1, 0) on conflict do nothing")
        .execute(pool)
        .await?;
    let mut conn = pool.acquire().await?;
    let mut times = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        sqlx::query("update bench_ref set n = n + 1 where id = 1")
            .execute(&mut *conn)
            .await?;
        times.push(t.elapsed());
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    times.sort();
    Ok((rate, times[n / 2]))
}

/// Autovacuum keeps the hot tables' pages reusable; where the server has it
/// off (this project's test machine does), a soak runs `vacuum` (a VACUUM
/// ANALYZE statement) every 10 s in its place, until the returned stand-in
/// is dropped.
async fn autovacuum_stand_in(pool: &PgPool, vacuum: &'static str) -> Result<StandIn, sqlx::Error> {
    let autovacuum: String = sqlx::query_scalar("show autovacuum")
        .fetch_one(pool)
        .await?;
    Ok(StandIn((autovacuum == "off").then(|| {
        let pool = pool.clone();
        tokio::spawn(async move {
            while pool.execute(vacuum).await.is_ok() {
                tokio::time::sleep(Duration::from_secs(10)).await;
            }
        })
    })))
}

/// The largest of the first half of `samples`, and of the second: a size
/// that stops growing has the second no larger than the first.
fn peaks_by_half(samples: &[f64]) -> (f64, f64) {
    let (first, second) = samples.split_at(samples.len() / 2);
    let peak = |s: &[f64]| s.iter().copied().fold(0.0, f64::max);
    (peak(first), peak(second))
}

/// The vacuuming task standing in for autovacuum, if any; it stops when
/// this is dropped, however the soak ends.
struct StandIn(Option<tokio::task::JoinHandle<()>>);

impl StandIn {
    fn running(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

fn secs(start: Instant) -> f64 {
    start.elapsed().as_secs_f64()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn redact(url: &str) -> &str {
    url.rsplit_once('@').map_or(url, |(_, host)| host)
}

/// A worker running in the background until stopped.
struct Running {
    stop: Arc<Notify>,
    handle: tokio::task::JoinHandle<cairn::Result<WorkerStats>>,
}

impl Running {
    fn spawn(worker: WorkerBuilder) -> Self {
        let stop = Arc::new(Notify::new());
        let handle = {
            let stop = stop.clone();
            tokio::spawn(
                async move { worker.run_until(async move { stop.notified().await }).await },
            )
        };
        Self { stop, handle }
    }

    /// Stops the worker gracefully; what it did.
    async fn stop(self) -> Result<WorkerStats, BoxError> {
        self.stop.notify_one();
        Ok(self.handle.await??)
    }
}
