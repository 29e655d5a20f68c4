//! Workflows: runs drained per second, per-step overhead against a bare
//! commit, and round trips per step.

use std::time::{Duration, Instant};

use cairn::WorkflowContext;
use cairn::prelude::*;
use sqlx::PgPool;

use super::{BoxError, Running, redact, secs};

/// The workflow reference: bare single-row INSERT transactions, one after
/// another, from one connection. Returns (transactions/s, mean µs).
async fn insert_reference(pool: &PgPool, n: usize) -> Result<(f64, f64), BoxError> {
    sqlx::query("create table if not exists bench_insert (id bigserial primary key, v int)")
        .execute(pool)
        .await?;
    let mut conn = pool.acquire().await?;
    let start = Instant::now();
    for i in 0..n {
        sqlx::query("insert into bench_insert (v) values ($1)")
            .bind(i as i32)
            .execute(&mut *conn)
            .await?;
    }
    let secs = secs(start);
    Ok((n as f64 / secs, secs * 1e6 / n as f64))
}

/// The worker's round trips so far: calls of the functions a worker calls
/// directly (needs `track_functions = 'pl'`, set on the bench database).
/// Backends report on exit, so measure with a pool that is closed first.
async fn worker_calls(pool: &PgPool) -> Result<i64, BoxError> {
    sqlx::query("select pg_stat_clear_snapshot()")
        .execute(pool)
        .await?;
    Ok(sqlx::query_scalar(
        "select coalesce(sum(calls), 0)::bigint from pg_stat_user_functions
          where schemaname = 'cairn'
            and funcname in ('claim', 'claim_from', 'load_run', 'load_runs', 'begin_step',
                             'begin_steps', 'record_steps', 'sleep_step', 'await_signal',
                             'start_child', 'start_task_step', 'suspend_run', 'complete_run',
                             'complete_runs', 'fail_run', 'extend', 'ack')",
    )
    .fetch_one(pool)
    .await?)
}

/// An app with the benchmark's workflows: `zero` (no step) and `three`.
pub async fn workflow_app(url: &str) -> Result<App, BoxError> {
    let app = App::builder()
        .database_url(url)
        .max_connections(16)
        .build()
        .await?;
    app.workflow(
        "zero",
        |_ctx: WorkflowContext, i: usize| async move { Ok(i) },
    )?;
    app.workflow("three", |ctx: WorkflowContext, i: usize| async move {
        let a: usize = ctx.step("one", i, |i| async move { Ok(i + 1) }).await?;
        let b: usize = ctx.step("two", a, |i| async move { Ok(i + 1) }).await?;
        let c: usize = ctx.step("three", b, |i| async move { Ok(i + 1) }).await?;
        Ok(c)
    })?;
    Ok(app)
}

/// Starts `n` runs of `workflow`, then times a worker (with a pool of its
/// own) draining them. Returns (runs/s, seconds, the worker's round trips).
async fn drain_runs(
    url: &str,
    app: &App,
    workflow: &str,
    n: usize,
    concurrency: usize,
) -> Result<(f64, f64, i64), BoxError> {
    drain_runs_with(url, app, workflow, n, concurrency, None).await
}

/// [`drain_runs`], with a plugin on the worker.
pub async fn drain_runs_with(
    url: &str,
    app: &App,
    workflow: &str,
    n: usize,
    concurrency: usize,
    plugin: Option<cairn::otel::OtelPlugin>,
) -> Result<(f64, f64, i64), BoxError> {
    let pool = app.pool().clone();
    for i in 0..n {
        app.start(workflow, &i).await?;
    }
    sqlx::query("vacuum analyze cairn.jobs")
        .execute(&pool)
        .await?;
    let worker_app = workflow_app(url).await?;
    if let Some(plugin) = plugin {
        worker_app.plugin(plugin);
    }
    let before = worker_calls(&pool).await?;
    let worker = Running::spawn(
        worker_app
            .worker()
            .queues(["workflows"])
            .concurrency(concurrency),
    );
    let start = Instant::now();
    while sqlx::query_scalar::<_, bool>("select exists (select from cairn.jobs)")
        .fetch_one(&pool)
        .await?
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = secs(start);
    worker.stop().await?;
    worker_app.pool().close().await;
    // The closed backends report their counts as they exit.
    let mut after = worker_calls(&pool).await?;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = worker_calls(&pool).await?;
        if now == after {
            break;
        }
        after = now;
    }
    Ok((n as f64 / elapsed, elapsed, after - before))
}

pub async fn run(url: &str) -> Result<(), BoxError> {
    let app = workflow_app(url).await?;
    app.initialize().await?;
    let pool = app.pool().clone();

    // Register the workflows (a worker does it when it starts).
    app.worker()
        .queues(["workflows"])
        .run_until(async {})
        .await?;

    println!("cairn workflow benchmark (PostgreSQL at {})", redact(url));
    let (ref_rate, ref_us) = insert_reference(&pool, 5_000).await?;
    println!(
        "{:<48} {ref_rate:>9.0} /s   ({ref_us:.0} µs each)",
        "reference: single-row INSERT transactions"
    );
    for (concurrency, n) in [(1, 500), (64, 5_000)] {
        let (zero_rate, zero_s, _) = drain_runs(url, &app, "zero", n, concurrency).await?;
        let (rate, three_s, _) = drain_runs(url, &app, "three", n, concurrency).await?;
        println!(
            "{:<48} {rate:>9.0} /s   {:>6.2} x reference",
            format!("3-step no-op runs, concurrency {concurrency}"),
            rate / ref_rate
        );
        let per_step_us = (three_s - zero_s) * 1e6 / (3 * n) as f64;
        println!(
            "{:<48} {per_step_us:>9.0} µs  {:>6.2} x a bare INSERT   ({zero_rate:.0} 0-step runs/s)",
            "  per-step overhead (3-step minus 0-step)",
            per_step_us / ref_us
        );
    }
    // Start a 0-step run and await its result, one at a time, with a worker
    // already running: the latency a caller sees.
    let worker = Running::spawn(app.worker().queues(["workflows"]).concurrency(16));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut lat = Vec::with_capacity(300);
    for i in 0..300_usize {
        let t = Instant::now();
        let run = app.start("zero", &i).await?;
        let out: usize = app.result(run).await?;
        assert_eq!(out, i);
        lat.push(t.elapsed());
    }
    worker.stop().await?;
    lat.sort();
    println!(
        "{:<48} p50 {:.2} ms, p99 {:.2} ms   ({:.1} x a bare INSERT)",
        "start a 0-step run and await its result",
        lat[lat.len() / 2].as_secs_f64() * 1e3,
        lat[lat.len() * 99 / 100].as_secs_f64() * 1e3,
        lat[lat.len() / 2].as_secs_f64() * 1e6 / ref_us
    );
    // Round trips, counted by Postgres in a separate, untimed pass: counting
    // function calls (track_functions) slows every call down.
    sqlx::query("alter database cairn_bench set track_functions = 'pl'")
        .execute(&pool)
        .await?;
    let n = 300;
    for concurrency in [1, 16] {
        let (_, _, zero_calls) = drain_runs(url, &app, "zero", n, concurrency).await?;
        let (_, _, three_calls) = drain_runs(url, &app, "three", n, concurrency).await?;
        println!(
            "{:<48} {:>9.2}      ({:.2} per 3-step run, {:.2} per 0-step run, claims included)",
            format!("round trips (SQL calls) per step, concurrency {concurrency}"),
            (three_calls - zero_calls) as f64 / (3 * n) as f64,
            three_calls as f64 / n as f64,
            zero_calls as f64 / n as f64
        );
    }
    println!(
        "(a step is one cairn.begin_step, which also records the previous step's outcome; a run adds\n its claim, load_run and complete_run; runs executing at once share one call of each kind)"
    );
    idle_tick(&app).await?;
    app.pool().close().await;
    Ok(())
}

/// The mean time of one statement, run 3,000 times on one connection
/// after a warm-up call.
async fn mean_call_us(conn: &mut sqlx::PgConnection, sql: &'static str) -> Result<f64, BoxError> {
    let n = 3_000;
    sqlx::query(sql).execute(&mut *conn).await?;
    let start = Instant::now();
    for _ in 0..n {
        sqlx::query(sql).execute(&mut *conn).await?;
    }
    Ok(secs(start) * 1e6 / n as f64)
}

/// What a worker pays each second for schedules when nothing is due: one
/// call of cairn.tick_schedules, beside a bare `select 1`, one connection,
/// with 100 schedules stored (none due).
async fn idle_tick(app: &App) -> Result<(), BoxError> {
    let names: Vec<String> = (0..100).map(|i| format!("bench_idle_{i}")).collect();
    for name in &names {
        app.delete_schedule(name).await?;
        app.create_schedule(cairn::Schedule::workflow(name, "0 0 1 1 *", "zero"))
            .await?;
    }
    let mut conn = app.pool().acquire().await?;
    let bare = mean_call_us(&mut conn, "select 1").await?;
    let tick = mean_call_us(&mut conn, "select cairn.tick_schedules(100)").await?;
    drop(conn);
    println!(
        "{:<48} {tick:>9.0} µs  {:>6.2} x a bare `select 1` ({bare:.0} µs)",
        "idle schedule tick (100 schedules, none due)",
        tick / bare
    );
    for name in &names {
        app.delete_schedule(name).await?;
    }
    Ok(())
}
