//! Benchmarks, printed as figures and as ratios to a reference measured in
//! the same run on the same database (this machine is shared and noisy).
//!
//! ```text
//! cargo run --release --example bench -- queue
//! cargo run --release --example bench -- workflow
//! cargo run --release --example bench -- otel
//! ```
//!
//! Uses a scratch database `cairn_bench` on the server of DATABASE_URL
//! (default the local Postgres), created fresh and dropped at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cairn::WorkflowContext;
use cairn::prelude::*;
use serde::{Deserialize, Serialize};
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::sync::{Notify, mpsc};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Serialize, Deserialize)]
struct Noop {
    n: u32,
}
impl Task for Noop {
    const QUEUE: &'static str = "bench";
    type Output = ();
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let what = std::env::args().nth(1).unwrap_or_else(|| "queue".into());
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
        "queue" => queue(&url).await,
        "workflow" => workflow(&url).await,
        "otel" => otel_overhead(&url).await,
        other => Err(format!("unknown benchmark {other:?}; try: queue, workflow, otel").into()),
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

fn line(label: &str, rate: f64, reference: f64) {
    println!(
        "{label:<44} {rate:>10.0} /s   {:>6.2} x reference",
        rate / reference
    );
}

async fn queue(url: &str) -> Result<(), BoxError> {
    let app = App::builder()
        .database_url(url)
        .max_connections(16)
        .build()
        .await?;
    app.initialize().await?;
    app.create_queue("bench").await?;
    let pool = app.pool().clone();
    let done = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(Notify::new());
    let target = Arc::new(AtomicUsize::new(usize::MAX));
    let (picked_tx, mut picked_rx) = mpsc::unbounded_channel::<Instant>();
    {
        let (done, all_done, target) = (done.clone(), all_done.clone(), target.clone());
        app.task(move |_job: Noop, _ctx| {
            let (done, all_done, target, picked) = (
                done.clone(),
                all_done.clone(),
                target.clone(),
                picked_tx.clone(),
            );
            async move {
                let _ = picked.send(Instant::now());
                if done.fetch_add(1, Ordering::Relaxed) + 1 == target.load(Ordering::Relaxed) {
                    all_done.notify_one();
                }
                Ok(())
            }
        })?;
    }

    println!("cairn queue benchmark (PostgreSQL at {})", redact(url));
    let (ref_rate, ref_p50) = reference(&pool, 5_000).await?;
    println!(
        "{:<44} {ref_rate:>10.0} /s   (p50 round trip {:.3} ms)",
        "reference: single-row UPDATE transactions",
        ms(ref_p50)
    );

    // Enqueue, one by one.
    let n = 5_000;
    let start = Instant::now();
    for i in 0..n {
        app.enqueue(&Noop { n: i }).await?;
    }
    line(
        "enqueue one by one (5,000)",
        f64::from(n) / secs(start),
        ref_rate,
    );
    let mut conn = pool.acquire().await?;
    let start = Instant::now();
    for i in 0..n {
        app.enqueue(&Noop { n: i }).execute(&mut *conn).await?;
    }
    drop(conn);
    line(
        "enqueue one by one, one connection (5,000)",
        f64::from(n) / secs(start),
        ref_rate,
    );
    app.purge_queue("bench").await?;

    // Enqueue, batched: 1,000 per call, 200,000 in all.
    let batch: Vec<Noop> = (0..1_000).map(|n| Noop { n }).collect();
    let start = Instant::now();
    for _ in 0..200 {
        app.enqueue_batch(&batch).await?;
    }
    line(
        "enqueue batched, 1,000 per call (200,000)",
        200_000.0 / secs(start),
        ref_rate,
    );
    app.purge_queue("bench").await?;
    vacuum(&pool).await?;

    // Drain 50,000 no-op jobs at several concurrencies.
    let jobs: Vec<Noop> = (0..50_000).map(|n| Noop { n }).collect();
    for concurrency in [1, 16, 64] {
        app.enqueue_batch(&jobs).await?;
        vacuum(&pool).await?;
        done.store(0, Ordering::Relaxed);
        target.store(jobs.len(), Ordering::Relaxed);
        let stop = Arc::new(Notify::new());
        let worker = {
            let stop = stop.clone();
            let w = app.worker().queues(["bench"]).concurrency(concurrency);
            tokio::spawn(async move { w.run_until(async move { stop.notified().await }).await })
        };
        let start = Instant::now();
        all_done.notified().await;
        // Handlers are done; wait for the last acknowledgements to land.
        while sqlx::query_scalar::<_, bool>("select exists (select from cairn.jobs)")
            .fetch_one(&pool)
            .await?
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let elapsed = secs(start);
        stop.notify_one();
        let stats = worker.await??;
        while picked_rx.try_recv().is_ok() {}
        line(
            &format!("drain 50,000 no-op jobs, concurrency {concurrency}"),
            50_000.0 / elapsed,
            ref_rate,
        );
        println!(
            "{:<44} {:>10.1} jobs per claim ({} claims)",
            "",
            50_000.0 / stats.claims as f64,
            stats.claims
        );
    }
    vacuum(&pool).await?;

    // Pickup latency: one job at a time to an idle worker (NOTIFY path).
    target.store(usize::MAX, Ordering::Relaxed);
    let stop = Arc::new(Notify::new());
    let worker = {
        let stop = stop.clone();
        let w = app.worker().queues(["bench"]).concurrency(16);
        tokio::spawn(async move { w.run_until(async move { stop.notified().await }).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut lat = Vec::with_capacity(500);
    for i in 0..500 {
        tokio::time::sleep(Duration::from_millis(3)).await; // let it go idle
        let sent = Instant::now();
        app.enqueue(&Noop { n: i }).await?;
        let started = picked_rx.recv().await.ok_or("worker stopped")?;
        lat.push(started - sent);
    }
    stop.notify_one();
    worker.await??;
    lat.sort();
    println!(
        "{:<44} p50 {:.3} ms, p99 {:.3} ms   ({:.1} x / {:.1} x reference round trip)",
        "pickup latency, idle worker (500 jobs)",
        ms(lat[lat.len() / 2]),
        ms(lat[lat.len() * 99 / 100]),
        ms(lat[lat.len() / 2]) / ms(ref_p50),
        ms(lat[lat.len() * 99 / 100]) / ms(ref_p50),
    );
    println!("(latency is from before the enqueue call to the handler's start)");
    app.pool().close().await;
    Ok(())
}

async fn vacuum(pool: &PgPool) -> Result<(), BoxError> {
    sqlx::query("vacuum analyze cairn.jobs")
        .execute(pool)
        .await?;
    Ok(())
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
            and funcname in ('claim', 'load_run', 'begin_step', 'record_steps', 'sleep_step',
                             'await_signal', 'start_child', 'start_task_step', 'suspend_run',
                             'complete_run', 'fail_run', 'extend', 'ack')",
    )
    .fetch_one(pool)
    .await?)
}

/// An app with the benchmark's workflows: `zero` (no step) and `three`.
async fn workflow_app(url: &str) -> Result<App, BoxError> {
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
async fn drain_runs_with(
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
    let stop = Arc::new(Notify::new());
    let worker = {
        let stop = stop.clone();
        let w = worker_app
            .worker()
            .queues(["workflows"])
            .concurrency(concurrency);
        tokio::spawn(async move { w.run_until(async move { stop.notified().await }).await })
    };
    let start = Instant::now();
    while sqlx::query_scalar::<_, bool>("select exists (select from cairn.jobs)")
        .fetch_one(&pool)
        .await?
    {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = secs(start);
    stop.notify_one();
    worker.await??;
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

async fn workflow(url: &str) -> Result<(), BoxError> {
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
    // Round trips, counted by Postgres in a separate, untimed pass: counting
    // function calls (track_functions) slows every call down.
    sqlx::query("alter database cairn_bench set track_functions = 'pl'")
        .execute(&pool)
        .await?;
    let n = 300;
    let (_, _, zero_calls) = drain_runs(url, &app, "zero", n, 16).await?;
    let (_, _, three_calls) = drain_runs(url, &app, "three", n, 16).await?;
    println!(
        "{:<48} {:>9.2}      ({:.2} per 3-step run, {:.2} per 0-step run, claims included)",
        "round trips (SQL calls) per step",
        (three_calls - zero_calls) as f64 / (3 * n) as f64,
        three_calls as f64 / n as f64,
        zero_calls as f64 / n as f64
    );
    println!(
        "(a step is one call of cairn.begin_step, which also records the previous step's outcome;\n a run adds its claim, load_run and complete_run)"
    );
    app.pool().close().await;
    Ok(())
}

/// An OTLP/gRPC receiver that counts the spans it is sent.
mod receiver {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
        MetricsService, MetricsServiceServer,
    };
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };

    pub struct Counter(pub Arc<AtomicUsize>);

    #[tonic::async_trait]
    impl TraceService for Counter {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let n: usize = request
                .into_inner()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.0.fetch_add(n, Ordering::Relaxed);
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    /// Accepts metrics and drops them: only spans are counted here.
    pub struct Metrics;

    #[tonic::async_trait]
    impl MetricsService for Metrics {
        async fn export(
            &self,
            _request: tonic::Request<ExportMetricsServiceRequest>,
        ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
            Ok(tonic::Response::new(ExportMetricsServiceResponse {
                partial_success: None,
            }))
        }
    }

    /// Serves on a free loopback port; returns the port and the span count.
    pub async fn start() -> Result<(u16, Arc<AtomicUsize>), super::BoxError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        drop(listener);
        let count = Arc::new(AtomicUsize::new(0));
        let service = TraceServiceServer::new(Counter(count.clone()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .add_service(MetricsServiceServer::new(Metrics))
                .serve(([127, 0, 0, 1], port).into()),
        );
        Ok((port, count))
    }
}

/// The workflow benchmark's 3-step runs at concurrency 64, with the
/// OpenTelemetry plugin off and on (exporting to a real OTLP receiver).
async fn otel_overhead(url: &str) -> Result<(), BoxError> {
    let app = workflow_app(url).await?;
    app.initialize().await?;
    app.worker()
        .queues(["workflows"])
        .run_until(async {})
        .await?;
    let (port, spans) = receiver::start().await?;
    let otel = cairn::otel::OtelPlugin::builder()
        .endpoint(format!("http://127.0.0.1:{port}"))
        .build()?;
    println!(
        "cairn OpenTelemetry overhead (PostgreSQL at {})",
        redact(url)
    );
    let n = 4_000;
    let (mut off, mut on) = (Vec::new(), Vec::new());
    // Alternate, so that drift on this shared machine hits both alike.
    for _ in 0..3 {
        off.push(drain_runs_with(url, &app, "three", n, 64, None).await?.0);
        on.push(
            drain_runs_with(url, &app, "three", n, 64, Some(otel.clone()))
                .await?
                .0,
        );
    }
    otel.shutdown().await?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (off, on) = (mean(&off), mean(&on));
    println!(
        "{:<48} {off:>9.0} /s",
        "3-step runs, concurrency 64, plugin off"
    );
    println!(
        "{:<48} {on:>9.0} /s",
        "3-step runs, concurrency 64, OTel plugin on"
    );
    println!(
        "{:<48} {:>9.3} x   ({} spans received over OTLP/gRPC)",
        "time with the plugin / time without",
        off / on,
        spans.load(Ordering::Relaxed)
    );
    Ok(())
}
