//! The run soak (`bench -- run-soak`): 3-step workflow runs at full speed
//! for three minutes under a short retention window, every table a run
//! writes sampled every 10 s. Finished runs, their steps and their history
//! are pruned by the worker as fast as they come, so storage stops growing.

use std::time::{Duration, Instant};

use cairn::Retention;
use sqlx::PgPool;

use super::workflow::workflow_app;
use super::{BoxError, Running, autovacuum_stand_in, peaks_by_half, redact, secs};

/// How long the soak produces: three minutes, ten with `--long`.
const FOR: Duration = Duration::from_secs(180);
const FOR_LONG: Duration = Duration::from_secs(600);
/// The retention window: finished runs older than this are pruned.
const KEEP: Duration = Duration::from_secs(10);
/// Runs started per producer call, and the most left waiting.
const BATCH: i32 = 500;
const WAITING: i64 = 2_000;

/// The tables a run writes (in schema cairn), summed in the size column.
const TABLES: [&str; 6] = ["runs", "steps", "run_events", "signals", "jobs", "archive"];

pub async fn run(url: &str, long: bool) -> Result<(), BoxError> {
    let period = if long { FOR_LONG } else { FOR };
    let app = workflow_app(url).await?;
    app.initialize().await?;
    app.register_workflows().await?;
    // Failed runs are kept, so that the check at the end sees any.
    app.set_retention(Retention {
        completed: Some(KEEP),
        failed: None,
    })
    .await?;
    let pool = app.pool().clone();
    println!(
        "cairn run soak (PostgreSQL at {}): 3-step runs for {} minutes at full speed, retention {} s",
        redact(url),
        period.as_secs() / 60,
        KEEP.as_secs()
    );
    let stand_in = autovacuum_stand_in(&pool, VACUUM).await?;
    if stand_in.running() {
        println!(
            "(autovacuum is off on this server: VACUUM ANALYZE of these tables every 10 s in its place)"
        );
    }
    let worker = Running::spawn(
        app.worker()
            .queues(["workflows"])
            .concurrency(64)
            .prune_interval(Duration::from_secs(1)),
    );
    println!(
        "  {:>5}  {:>9}  {:>7}  {:>9}  {:>9}  {:>9}  {:>9}",
        "time", "finished", "runs", "all MiB", "runs MiB", "steps MiB", "jobs MiB"
    );
    let start = Instant::now();
    let mut next_sample = Duration::ZERO;
    let mut started: i64 = 0;
    let mut samples = Vec::new();
    loop {
        let live: i64 = sqlx::query_scalar("select count(*) from cairn.jobs")
            .fetch_one(&pool)
            .await?;
        if start.elapsed() >= next_sample {
            let (all, runs, steps, jobs) = sizes(&pool).await?;
            let stored: i64 = sqlx::query_scalar("select count(*) from cairn.runs")
                .fetch_one(&pool)
                .await?;
            println!(
                "  {:>4.0} s  {:>9}  {stored:>7}  {all:>9.1}  {runs:>9.1}  {steps:>9.1}  {jobs:>9.1}",
                secs(start),
                started - live,
            );
            samples.push(all);
            next_sample += Duration::from_secs(10);
        }
        if start.elapsed() >= period {
            if live == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        } else if live < WAITING {
            sqlx::query(
                "select count(cairn.start_workflow('three', to_jsonb(g)))
                   from generate_series(1, $1) g",
            )
            .bind(BATCH)
            .execute(&pool)
            .await?;
            started += i64::from(BATCH);
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let rate = started as f64 / secs(start);
    worker.stop().await?;
    drop(stand_in);
    let failed: i64 = sqlx::query_scalar(
        "select count(*) from cairn.runs where status not in ('completed', 'pending', 'running')",
    )
    .fetch_one(&pool)
    .await?;
    if failed > 0 {
        return Err(format!("{failed} runs did not complete").into());
    }
    let (first, second) = peaks_by_half(&samples);
    println!(
        "{:<40} {rate:>7.0} runs/s   largest size, second half {second:.1} MiB vs first half {first:.1} MiB",
        format!("run soak of {started}"),
    );
    app.pool().close().await;
    Ok(())
}

/// MiB, with indexes and TOAST: every table a run writes, then runs, steps
/// and jobs alone.
async fn sizes(pool: &PgPool) -> Result<(f64, f64, f64, f64), sqlx::Error> {
    sqlx::query_as(
        "select sum(s.bytes)::float8 / 1048576,
                sum(s.bytes) filter (where s.name = 'runs')::float8 / 1048576,
                sum(s.bytes) filter (where s.name = 'steps')::float8 / 1048576,
                sum(s.bytes) filter (where s.name = 'jobs')::float8 / 1048576
           from (select t.name, pg_total_relation_size(format('cairn.%I', t.name)::regclass) as bytes
                   from unnest($1::text[]) as t(name)) s",
    )
    .bind(TABLES)
    .fetch_one(pool)
    .await
}

/// The stand-in for autovacuum: the tables of [`TABLES`].
const VACUUM: &str = "vacuum analyze cairn.runs, cairn.steps, cairn.run_events, cairn.signals, \
                      cairn.jobs, cairn.archive";
