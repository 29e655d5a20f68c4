//! Flows beside code-first workflows, in the same run: runs drained per
//! second and the cost of a step, for the same three no-op steps written
//! both ways.

use std::time::Instant;

use cairn::prelude::*;
use cairn::{Flow, WorkflowContext};
use sqlx::PgPool;

use super::{BoxError, Running, redact, secs};

/// An app with `code1`/`code3` (code-first, 1 and 3 steps) and
/// `flow1`/`flow3` (flows of the handler `inc`, 1 and 3 steps).
async fn app(url: &str) -> Result<App, BoxError> {
    let app = App::builder()
        .database_url(url)
        .max_connections(16)
        .build()
        .await?;
    app.workflow("code1", |ctx: WorkflowContext, i: i64| async move {
        let a: i64 = ctx.step("one", i, |i| async move { Ok(i + 1) }).await?;
        Ok(a)
    })?;
    app.workflow("code3", |ctx: WorkflowContext, i: i64| async move {
        let a: i64 = ctx.step("one", i, |i| async move { Ok(i + 1) }).await?;
        let b: i64 = ctx.step("two", a, |i| async move { Ok(i + 1) }).await?;
        let c: i64 = ctx.step("three", b, |i| async move { Ok(i + 1) }).await?;
        Ok(c)
    })?;
    app.step_handler("inc", |i: i64, _job| async move { Ok(i + 1) })?;
    app.flow(
        Flow::new("flow1")
            .step("one")
            .handler("inc")
            .input("$.input"),
    )?;
    app.flow(
        Flow::new("flow3")
            .step("one")
            .handler("inc")
            .input("$.input")
            .step("two")
            .handler("inc")
            .after(["one"])
            .input("$.one")
            .step("three")
            .handler("inc")
            .after(["two"])
            .input("$.two")
            .output("$.three"),
    )?;
    Ok(app)
}

/// Starts `n` runs of `name`, then times a worker of its own draining them.
/// Returns the seconds it took.
async fn drain(
    url: &str,
    pool: &PgPool,
    name: &str,
    n: usize,
    concurrency: usize,
) -> Result<f64, BoxError> {
    let producer = app(url).await?;
    for i in 0..n {
        producer.start(name, &(i as i64)).await?;
    }
    producer.pool().close().await;
    sqlx::query("vacuum analyze cairn.jobs")
        .execute(pool)
        .await?;
    let worker_app = app(url).await?;
    let worker = Running::spawn(
        worker_app
            .worker()
            .queues(["workflows"])
            .concurrency(concurrency),
    );
    let start = Instant::now();
    while sqlx::query_scalar::<_, bool>("select exists (select from cairn.jobs)")
        .fetch_one(pool)
        .await?
    {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let elapsed = secs(start);
    worker.stop().await?;
    worker_app.pool().close().await;
    let unfinished: i64 = sqlx::query_scalar(
        "select count(*) from cairn.runs where workflow = $1 and status <> 'completed'",
    )
    .bind(name)
    .fetch_one(pool)
    .await?;
    if unfinished > 0 {
        return Err(format!("{unfinished} runs of {name} did not complete").into());
    }
    Ok(elapsed)
}

/// Runs `n` runs of `name` one at a time on an idle worker, each started
/// when the one before has ended. Returns the mean seconds per run, and how
/// many steps the worker took from an ack rather than claimed.
async fn one_at_a_time(url: &str, name: &str, n: usize) -> Result<(f64, u64), BoxError> {
    let producer = app(url).await?;
    let worker_app = app(url).await?;
    let worker = Running::spawn(worker_app.worker().queues(["workflows"]));
    // A first run warms the worker's connections and plans.
    let run = producer.start(name, &0_i64).await?;
    producer.result::<serde_json::Value>(run).await?;
    let start = Instant::now();
    for i in 0..n {
        let run = producer.start(name, &(i as i64)).await?;
        producer.result::<serde_json::Value>(run).await?;
    }
    let elapsed = secs(start);
    let stats = worker.stop().await?;
    worker_app.pool().close().await;
    producer.pool().close().await;
    Ok((elapsed / n as f64, stats.taken))
}

/// One line of the comparison: the code-first figure, the flow's, and
/// their ratio.
fn compare(what: &str, code: String, flow: String, ratio: f64) {
    println!(
        "  {:<44} {code:>12}   flow {flow:>12}   {ratio:>5.2} x",
        format!("{what}: code-first")
    );
}

fn per_step(code: f64, flow: f64) {
    compare(
        "per step (3-step minus 1-step)",
        format!("{code:.0} µs"),
        format!("{flow:.0} µs"),
        flow / code,
    );
}

pub async fn run(url: &str) -> Result<(), BoxError> {
    let setup = app(url).await?;
    setup.initialize().await?;
    let pool = setup.pool().clone();
    println!("cairn flow benchmark (PostgreSQL at {})", redact(url));
    println!("the same 3 no-op steps, as a code-first workflow and as a flow driven by Postgres");
    for (concurrency, n) in [(1, 300), (64, 3_000)] {
        let code1 = drain(url, &pool, "code1", n, concurrency).await?;
        let code3 = drain(url, &pool, "code3", n, concurrency).await?;
        let flow1 = drain(url, &pool, "flow1", n, concurrency).await?;
        let flow3 = drain(url, &pool, "flow3", n, concurrency).await?;
        let code_step = (code3 - code1) * 1e6 / (2 * n) as f64;
        let flow_step = (flow3 - flow1) * 1e6 / (2 * n) as f64;
        println!("concurrency {concurrency}, {n} runs each:");
        compare(
            "3-step runs drained",
            format!("{:.0} /s", n as f64 / code3),
            format!("{:.0} /s", n as f64 / flow3),
            code3 / flow3,
        );
        per_step(code_step, flow_step);
    }
    let n = 200;
    let (code1, _) = one_at_a_time(url, "code1", n).await?;
    let (code3, _) = one_at_a_time(url, "code3", n).await?;
    let (flow1, _) = one_at_a_time(url, "flow1", n).await?;
    let (flow3, taken) = one_at_a_time(url, "flow3", n).await?;
    let code_step = (code3 - code1) * 1e6 / 2.0;
    let flow_step = (flow3 - flow1) * 1e6 / 2.0;
    println!("one run at a time on an idle worker, {n} runs each:");
    compare(
        "3-step run, start to result",
        format!("{:.2} ms", code3 * 1e3),
        format!("{:.2} ms", flow3 * 1e3),
        flow3 / code3,
    );
    per_step(code_step, flow_step);
    println!(
        "  {:<44} {:>9} of {}",
        "flow steps taken by the ack before them",
        taken,
        2 * (n + 1)
    );
    println!(
        "(a flow step is one job: claimed, or taken by the ack of the step before when a slot is free; its ack starts the next. No replay, no load_run)"
    );
    setup.pool().close().await;
    Ok(())
}
