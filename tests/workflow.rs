//! Durable workflows against a real database: checkpoints and replay, durable
//! sleep on the test clock, signals, idempotent starts, retries, dead letters
//! and retry_run, cancellation, non-determinism, bad input.

mod common;

use std::time::Duration;

use cairn::{App, Backoff, Error, HandlerError, RetryPolicy, WorkflowContext};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Handlers record each real execution here, so tests count in the database.
async fn effects_table(pool: &PgPool) {
    sqlx::query(
        "create table effects (run uuid, step text, at timestamptz default clock_timestamp())",
    )
    .execute(pool)
    .await
    .unwrap();
}

async fn effect(pool: &PgPool, run: cairn::Uuid, step: &str) {
    sqlx::query("insert into effects (run, step) values ($1, $2)")
        .bind(run)
        .bind(step)
        .execute(pool)
        .await
        .unwrap();
}

async fn effects_of(pool: &PgPool, run: cairn::Uuid) -> Vec<String> {
    sqlx::query_scalar("select step from effects where run = $1 order by at")
        .bind(run)
        .fetch_all(pool)
        .await
        .unwrap()
}

struct Worker {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<cairn::Result<cairn::WorkerStats>>,
}

impl Worker {
    fn start(app: &App) -> Self {
        let stop = CancellationToken::new();
        let handle = tokio::spawn(
            app.worker()
                .queues(["workflows"])
                .poll_interval(Duration::from_millis(50))
                .run_until(stop.clone().cancelled_owned()),
        );
        Self { stop, handle }
    }

    async fn stop(self) -> cairn::WorkerStats {
        self.stop.cancel();
        self.handle.await.unwrap().unwrap()
    }
}

async fn status(app: &App, run: cairn::Uuid) -> String {
    app.run_status(run).await.unwrap().status.to_string()
}

async fn wait_status(app: &App, run: cairn::Uuid, want: &str) {
    common::wait_for(
        &format!("run {run} to be {want}"),
        Duration::from_secs(15),
        || async { status(app, run).await == want },
    )
    .await;
}

async fn advance_clock(pool: &PgPool, seconds: f64) {
    sqlx::query("select cairn.advance_test_clock($1)")
        .bind(seconds)
        .execute(pool)
        .await
        .unwrap();
}

#[derive(Serialize, Deserialize, Clone)]
struct Order {
    id: i64,
    cents: i64,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Shipped {
    order: i64,
    receipt: String,
    approved_by: String,
    tracking: String,
}

/// charge → reserve → sleep 1 day → wait for approval → ship.
fn register_order(app: &App, pool: &PgPool) {
    let db = pool.clone();
    app.workflow(
        "process_order",
        move |ctx: WorkflowContext, order: Order| {
            let db = db.clone();
            async move {
                let run = ctx.run_id();
                let d = db.clone();
                let receipt: String = ctx
                    .step("charge", order.cents, move |cents| async move {
                        effect(&d, run, "charge").await;
                        Ok(format!("rcpt-{cents}"))
                    })
                    .await?;
                let d = db.clone();
                ctx.step("reserve", order.id, move |_id| async move {
                    effect(&d, run, "reserve").await;
                    Ok(())
                })
                .await?;
                ctx.sleep(Duration::from_secs(86_400)).await;
                let approval: Option<serde_json::Value> =
                    ctx.wait_for_signal("approved", None).await?;
                let approved_by = approval
                    .and_then(|a| a["by"].as_str().map(String::from))
                    .unwrap_or_default();
                let d = db.clone();
                let tracking: String = ctx
                    .step("ship", order.id, move |id| async move {
                        effect(&d, run, "ship").await;
                        Ok(format!("TRK{id}"))
                    })
                    .await?;
                Ok(Shipped {
                    order: order.id,
                    receipt,
                    approved_by,
                    tracking,
                })
            }
        },
    )
    .unwrap();
}

#[sqlx::test(migrations = false)]
async fn a_run_sleeps_a_day_waits_for_a_signal_and_never_repeats_a_step(pool: PgPool) {
    let app = common::app(&pool).await;
    effects_table(&pool).await;
    register_order(&app, &pool);
    let worker = Worker::start(&app);
    common::wait_for("workflow registration", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.workflows").await == 1
    })
    .await;

    let order = Order { id: 7, cents: 1250 };
    let run = app
        .start("process_order", &order)
        .idempotency_key("order-7")
        .await
        .unwrap();
    let again = app
        .start("process_order", &order)
        .idempotency_key("order-7")
        .await
        .unwrap();
    assert_eq!(run, again, "the same key gives the same run");

    wait_status(&app, run, "sleeping").await;
    assert_eq!(effects_of(&pool, run).await, ["charge", "reserve"]);
    // The day passes in an instant on the test clock; then the run waits.
    advance_clock(&pool, 86_400.0).await;
    wait_status(&app, run, "waiting").await;
    app.send_signal(run, "approved", &serde_json::json!({"by": "ann"}))
        .await
        .unwrap();
    let shipped: Shipped = app.result(run).await.unwrap();
    worker.stop().await;

    assert_eq!(
        shipped,
        Shipped {
            order: 7,
            receipt: "rcpt-1250".into(),
            approved_by: "ann".into(),
            tracking: "TRK7".into()
        }
    );
    // Replayed three times (after the sleep, the signal wait and the signal),
    // yet every step's handler ran exactly once.
    assert_eq!(effects_of(&pool, run).await, ["charge", "reserve", "ship"]);
    let trace: Vec<(i32, String, String, String)> =
        sqlx::query_as("select seq, key, kind, status from cairn.run_steps($1)")
            .bind(run)
            .fetch_all(&pool)
            .await
            .unwrap();
    let keys: Vec<_> = trace
        .iter()
        .map(|t| (t.1.as_str(), t.2.as_str(), t.3.as_str()))
        .collect();
    assert_eq!(
        keys,
        [
            ("charge#1", "step", "completed"),
            ("reserve#1", "step", "completed"),
            ("sleep#1", "sleep", "completed"),
            ("signal:approved#1", "signal", "completed"),
            ("ship#1", "step", "completed"),
        ]
    );
    let runs = common::scalar_i64(&pool, "select count(*) from cairn.runs").await;
    assert_eq!(runs, 1);
}

#[sqlx::test(migrations = false)]
async fn started_from_sql_with_status_from_sql(pool: PgPool) {
    let app = common::app(&pool).await;
    app.workflow("double", |ctx: WorkflowContext, n: i64| async move {
        let r: i64 = ctx.step("double", n, |n| async move { Ok(n * 2) }).await?;
        Ok(r)
    })
    .unwrap();
    let worker = Worker::start(&app);
    common::wait_for("registration", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.workflows").await == 1
    })
    .await;
    let run: cairn::Uuid = sqlx::query_scalar("select cairn.start_workflow('double', '21'::jsonb)")
        .fetch_one(&pool)
        .await
        .unwrap();
    let out: i64 = app.result(run).await.unwrap();
    assert_eq!(out, 42);
    let (st, output): (String, String) =
        sqlx::query_as("select status, output::text from cairn.run_status($1)")
            .bind(run)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((st.as_str(), output.as_str()), ("completed", "42"));
    worker.stop().await;
}

async fn register_noop(app: &App, pool: &PgPool) {
    app.workflow(
        "noop",
        |_ctx: WorkflowContext, _: serde_json::Value| async move { Ok(()) },
    )
    .unwrap();
    app.create_queue("workflows").await.unwrap();
    sqlx::query("select cairn.register_workflow('noop', 'workflows')")
        .execute(pool)
        .await
        .unwrap();
}

#[sqlx::test(migrations = false)]
async fn fifty_concurrent_starts_with_one_key_make_one_run(pool: PgPool) {
    let app = common::app(&pool).await;
    register_noop(&app, &pool).await;
    let mut starts = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let app = app.clone();
        starts.spawn(async move { app.start("noop", &1).idempotency_key("same").await.unwrap() });
    }
    let mut ids = std::collections::HashSet::new();
    while let Some(id) = starts.join_next().await {
        ids.insert(id.unwrap());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.runs").await,
        1
    );
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.jobs").await,
        1
    );
}

#[sqlx::test(migrations = false)]
async fn signals_sent_early_are_kept_and_waits_time_out(pool: PgPool) {
    let app = common::app(&pool).await;
    app.workflow("gate", |ctx: WorkflowContext, _: ()| async move {
        let early: Option<String> = ctx.wait_for_signal("early", None).await?;
        let late: Option<String> = ctx
            .wait_for_signal("never", Some(Duration::from_secs(3600)))
            .await?;
        Ok((early, late))
    })
    .unwrap();
    app.create_queue("workflows").await.unwrap();
    sqlx::query("select cairn.register_workflow('gate', 'workflows')")
        .execute(&pool)
        .await
        .unwrap();
    // The signal arrives before any worker has even started the run.
    let run = app.start("gate", &()).await.unwrap();
    app.send_signal(run, "early", &"first").await.unwrap();
    let worker = Worker::start(&app);
    wait_status(&app, run, "waiting").await;
    advance_clock(&pool, 3601.0).await;
    let out: (Option<String>, Option<String>) = app.result(run).await.unwrap();
    worker.stop().await;
    assert_eq!(out, (Some("first".into()), None), "kept, then timed out");
}

#[sqlx::test(migrations = false)]
async fn bad_input_gets_clear_errors_and_loses_nothing(pool: PgPool) {
    let app = common::app(&pool).await;
    app.workflow("typed", |_ctx: WorkflowContext, o: Order| async move {
        Ok(o.id)
    })
    .unwrap();
    let worker = Worker::start(&app);
    common::wait_for("registration", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.workflows").await == 1
    })
    .await;

    let err = app.start("no_such_workflow", &1).await.unwrap_err();
    assert!(
        matches!(err, Error::NotFound(ref m) if m.contains("unknown workflow \"no_such_workflow\"")),
        "{err}"
    );
    for (sql, code) in [
        (
            "select cairn.start_workflow('no_such_workflow', '{}')",
            "42704",
        ),
        ("select cairn.start_workflow('typed', null)", "22004"),
        ("select cairn.start_workflow('typed', '{\"id\":')", "22P02"),
        (
            "select cairn.start_workflow('typed', '{}', delay => -1)",
            "22023",
        ),
        ("select cairn.start_workflow(null, '{}')", "22004"),
        ("select cairn.send_signal(gen_random_uuid(), 'x')", "42704"),
        ("select cairn.send_signal(null, 'x')", "22004"),
        ("select cairn.run_status(gen_random_uuid())", "42704"),
    ] {
        let err = sqlx::query(sql).execute(&pool).await.expect_err(sql);
        assert_eq!(
            err.as_database_error().and_then(|e| e.code()).as_deref(),
            Some(code),
            "{sql}: {err}"
        );
    }

    // Input that does not fit the workflow's type: the run fails with serde's message.
    let bad = app
        .start("typed", &serde_json::json!({"id": "seven"}))
        .await
        .unwrap();
    let err = app.result::<i64>(bad).await.unwrap_err();
    assert!(
        matches!(err, Error::RunFailed { ref error, .. } if error.contains("does not deserialize into") && error.contains("Order")),
        "{err}"
    );
    // A signal to a finished run is refused, and a good run still completes.
    let err = app.send_signal(bad, "x", &1).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidState(ref m) if m.contains("is failed")),
        "{err}"
    );
    let good = app
        .start("typed", &Order { id: 3, cents: 1 })
        .await
        .unwrap();
    assert_eq!(app.result::<i64>(good).await.unwrap(), 3);
    worker.stop().await;
}

#[sqlx::test(migrations = false)]
async fn step_retries_back_off_durably_then_the_run_dead_letters_and_retry_run_resumes(
    pool: PgPool,
) {
    let app = common::app(&pool).await;
    effects_table(&pool).await;
    sqlx::query("create table switch (healed boolean)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("insert into switch values (false)")
        .execute(&pool)
        .await
        .unwrap();
    let db = pool.clone();
    app.workflow("flaky", move |ctx: WorkflowContext, _: ()| {
        let db = db.clone();
        async move {
            let run = ctx.run_id();
            let d = db.clone();
            ctx.step("prepare", (), move |_| async move {
                effect(&d, run, "prepare").await;
                Ok(())
            })
            .await?;
            let d = db.clone();
            let n: i64 = ctx
                .step("call", (), move |_| async move {
                    effect(&d, run, "call").await;
                    let healed: bool = sqlx::query_scalar("select healed from switch")
                        .fetch_one(&d)
                        .await?;
                    if healed {
                        Ok(1)
                    } else {
                        Err(HandlerError::retryable("service down"))
                    }
                })
                .retry(
                    RetryPolicy::default()
                        .max_attempts(3)
                        .backoff(Backoff::Fixed(Duration::from_millis(300)))
                        .jitter(0.0),
                )
                .await?;
            Ok(n)
        }
    })
    .unwrap();
    let worker = Worker::start(&app);
    common::wait_for("registration", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.workflows").await == 1
    })
    .await;
    let run = app.start("flaky", &()).await.unwrap();
    let err = app.result::<i64>(run).await.unwrap_err();
    assert!(
        matches!(err, Error::RunFailed { ref error, .. } if error.contains("service down (attempt 3 of 3, giving up)")),
        "{err}"
    );
    assert_eq!(
        effects_of(&pool, run).await,
        ["prepare", "call", "call", "call"]
    );
    // Each retry waited for the backoff on the database clock.
    let gaps: Vec<f64> = sqlx::query_scalar(
        "select (extract(epoch from at - lag(at) over (order by at)) * 1000)::float8
           from effects where run = $1 and step = 'call' order by at offset 1",
    )
    .bind(run)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(gaps.iter().all(|&g| g >= 300.0), "{gaps:?}");
    // The run's job is dead-lettered, kept for a retry by hand.
    let dead = common::scalar_i64(
        &pool,
        "select count(*) from cairn.archive where outcome = 'dead'",
    )
    .await;
    assert_eq!(dead, 1);

    sqlx::query("update switch set healed = true")
        .execute(&pool)
        .await
        .unwrap();
    assert!(app.retry_run(run).await.unwrap());
    assert_eq!(app.result::<i64>(run).await.unwrap(), 1);
    worker.stop().await;
    // It resumed at the failed step: "prepare" did not run again.
    assert_eq!(
        effects_of(&pool, run).await,
        ["prepare", "call", "call", "call", "call"]
    );
}

#[sqlx::test(migrations = false)]
async fn a_replay_that_meets_a_different_step_fails_loudly(pool: PgPool) {
    let v1 = common::app(&pool).await;
    v1.workflow("evolving", |ctx: WorkflowContext, _: ()| async move {
        ctx.step("charge", (), |_| async { Ok(()) }).await?;
        ctx.sleep(Duration::from_secs(60)).await;
        Ok(())
    })
    .unwrap();
    let worker = Worker::start(&v1);
    common::wait_for("registration", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.workflows").await == 1
    })
    .await;
    let run = v1.start("evolving", &()).await.unwrap();
    wait_status(&v1, run, "sleeping").await;
    worker.stop().await;

    // A new deployment changed the order of steps.
    let v2 = common::app(&pool).await;
    v2.workflow("evolving", |ctx: WorkflowContext, _: ()| async move {
        ctx.step("refund", (), |_| async { Ok(()) }).await?;
        ctx.step("charge", (), |_| async { Ok(()) }).await?;
        Ok(())
    })
    .unwrap();
    let worker = Worker::start(&v2);
    advance_clock(&pool, 61.0).await;
    let err = v2.result::<()>(run).await.unwrap_err();
    worker.stop().await;
    assert!(
        matches!(err, Error::RunFailed { ref error, .. }
            if error.contains("non-determinism") && error.contains("refund#1") && error.contains("charge#1")),
        "{err}"
    );
}

#[sqlx::test(migrations = false)]
async fn cancelling_a_waiting_run_ends_it(pool: PgPool) {
    let app = common::app(&pool).await;
    app.workflow("patient", |ctx: WorkflowContext, _: ()| async move {
        let _: Option<()> = ctx.wait_for_signal("go", None).await?;
        Ok(())
    })
    .unwrap();
    let worker = Worker::start(&app);
    common::wait_for("registration", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.workflows").await == 1
    })
    .await;
    let run = app.start("patient", &()).await.unwrap();
    wait_status(&app, run, "waiting").await;
    assert_eq!(app.cancel_run(run).await.unwrap(), 1);
    assert!(matches!(app.result::<()>(run).await, Err(Error::RunCancelled(r)) if r == run));
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.jobs").await,
        0
    );
    let err = app.send_signal(run, "go", &()).await.unwrap_err();
    assert!(matches!(err, Error::InvalidState(_)), "{err}");
    worker.stop().await;
}

#[derive(Serialize, Deserialize)]
struct Resize {
    px: u32,
}
impl cairn::Task for Resize {
    const QUEUE: &'static str = "gpu";
    type Output = String;
}

#[sqlx::test(migrations = false)]
async fn children_remote_steps_and_fan_out_fan_in(pool: PgPool) {
    let app = common::app(&pool).await;
    effects_table(&pool).await;
    app.workflow("square", |ctx: WorkflowContext, n: i64| async move {
        ctx.sleep(Duration::from_millis(50)).await;
        Ok(n * n)
    })
    .unwrap();
    let db = pool.clone();
    app.workflow("parent", move |ctx: WorkflowContext, n: i64| {
        let db = db.clone();
        async move {
            let run = ctx.run_id();
            // Fan-out of three inline steps, joined; each checkpointed once.
            let step = |i: i64| {
                let d = db.clone();
                ctx.step(&format!("part{i}"), i, move |i| async move {
                    effect(&d, run, &format!("part{i}")).await;
                    Ok(i * 10)
                })
            };
            let (a, b, c) = tokio::join!(
                step(1).into_future(),
                step(2).into_future(),
                step(3).into_future()
            );
            let parts = a? + b? + c?;
            let squared: i64 = ctx.child("square", &n).await?;
            let resized: String = ctx.task(&Resize { px: 64 }).await?;
            Ok(format!("{parts}/{squared}/{resized}"))
        }
    })
    .unwrap();
    // The "gpu" queue is served by a separate worker that only runs tasks.
    let gpu_db = pool.clone();
    app.task(move |r: Resize, ctx: cairn::JobContext| {
        let d = gpu_db.clone();
        async move {
            effect(&d, ctx.parent_run().unwrap(), "resize").await;
            Ok(format!("{}px", r.px))
        }
    })
    .unwrap();
    let flows = Worker::start(&app);
    let gpu_stop = CancellationToken::new();
    let gpu = tokio::spawn(
        app.worker()
            .queues(["gpu"])
            .run_until(gpu_stop.clone().cancelled_owned()),
    );
    common::wait_for("registration", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.workflows").await == 2
    })
    .await;

    let run = app.start("parent", &7_i64).await.unwrap();
    let out: String = app.result(run).await.unwrap();
    assert_eq!(out, "60/49/64px");
    let mut ran = effects_of(&pool, run).await;
    ran.sort();
    assert_eq!(
        ran,
        ["part1", "part2", "part3", "resize"],
        "each ran once across the replays"
    );
    let kinds: Vec<(String, String)> = sqlx::query_as("select key, kind from cairn.run_steps($1)")
        .bind(run)
        .fetch_all(&pool)
        .await
        .unwrap();
    let kinds: Vec<(&str, &str)> = kinds
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("part1#1", "step"),
            ("part2#1", "step"),
            ("part3#1", "step"),
            ("child:square#1", "child"),
            ("task:gpu#1", "task"),
        ]
    );
    let children = common::scalar_i64(
        &pool,
        "select count(*) from cairn.runs where parent_run is not null",
    )
    .await;
    assert_eq!(children, 1);

    flows.stop().await;
    gpu_stop.cancel();
    gpu.await.unwrap().unwrap();
}

#[sqlx::test(migrations = false)]
async fn a_failed_child_fails_the_parents_step_and_cancel_cascades(pool: PgPool) {
    let app = common::app(&pool).await;
    app.workflow("boom", |_ctx: WorkflowContext, _: ()| async move {
        Err::<(), _>(HandlerError::fatal("child exploded"))
    })
    .unwrap();
    app.workflow("forever", |ctx: WorkflowContext, _: ()| async move {
        let _: Option<()> = ctx.wait_for_signal("never", None).await?;
        Ok(())
    })
    .unwrap();
    app.workflow(
        "parent_of",
        |ctx: WorkflowContext, child: String| async move {
            match ctx.child::<_, ()>(&child, &()).await {
                Ok(()) => Ok("ok".to_string()),
                // The saga pattern: the parent sees the failure and compensates.
                Err(e) => Ok(format!("compensated after: {e}")),
            }
        },
    )
    .unwrap();
    let worker = Worker::start(&app);
    common::wait_for("registration", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.workflows").await == 3
    })
    .await;

    let run = app.start("parent_of", &"boom").await.unwrap();
    let out: String = app.result(run).await.unwrap();
    assert!(
        out.starts_with("compensated after: step child:boom#1 failed: child run"),
        "{out}"
    );
    assert!(out.ends_with("failed: child exploded"), "{out}");

    let unknown = app.start("parent_of", &"no_such_child").await.unwrap();
    let out: String = app.result(unknown).await.unwrap();
    assert!(out.contains("unknown workflow \"no_such_child\""), "{out}");

    let parent = app.start("parent_of", &"forever").await.unwrap();
    common::wait_for("the child to wait", Duration::from_secs(10), || async {
        common::scalar_i64(
            &pool,
            "select count(*) from cairn.runs where workflow = 'forever' and status = 'waiting'",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        app.cancel_run(parent).await.unwrap(),
        2,
        "the parent and its child"
    );
    let cancelled: i64 = sqlx::query_scalar(
        "select count(*) from cairn.runs where (id = $1 or parent_run = $1) and status = 'cancelled'",
    )
    .bind(parent)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(cancelled, 2);
    assert!(matches!(
        app.result::<String>(parent).await,
        Err(Error::RunCancelled(_))
    ));
    worker.stop().await;
}

#[sqlx::test(migrations = false)]
async fn now_random_and_uuid_are_the_same_on_every_replay(pool: PgPool) {
    let app = common::app(&pool).await;
    sqlx::query("create table seen (t timestamptz, r float8, u uuid)")
        .execute(&pool)
        .await
        .unwrap();
    let db = pool.clone();
    app.workflow("values", move |ctx: WorkflowContext, _: ()| {
        let db = db.clone();
        async move {
            let (t, r, u) = (ctx.now().await, ctx.random().await, ctx.uuid().await);
            let d = db.clone();
            // Runs once: what the first execution saw.
            ctx.step("record", (t, r, u), move |(t, r, u)| async move {
                sqlx::query("insert into seen values ($1, $2, $3)")
                    .bind(t)
                    .bind(r)
                    .bind(u)
                    .execute(&d)
                    .await?;
                Ok(())
            })
            .await?;
            ctx.sleep(Duration::from_secs(60)).await;
            // Reached only by a later replay, which must see the same values.
            Ok((t, r, u))
        }
    })
    .unwrap();
    let worker = Worker::start(&app);
    common::wait_for("registration", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.workflows").await == 1
    })
    .await;
    let run = app.start("values", &()).await.unwrap();
    wait_status(&app, run, "sleeping").await;
    advance_clock(&pool, 61.0).await;
    let (t, r, u): (chrono::DateTime<chrono::Utc>, f64, cairn::Uuid) =
        app.result(run).await.unwrap();
    worker.stop().await;
    let first: (chrono::DateTime<chrono::Utc>, f64, cairn::Uuid) =
        sqlx::query_as("select t, r, u from seen")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((t, r, u), first);
    assert!((0.0..1.0).contains(&r));
}

#[sqlx::test(migrations = false)]
async fn workflow_options_set_step_defaults_and_a_maximum_duration(pool: PgPool) {
    let app = common::app(&pool).await;
    let options = cairn::WorkflowOptions::default()
        .queue("bounded")
        .step_retry(
            RetryPolicy::default()
                .max_attempts(2)
                .backoff(Backoff::Fixed(Duration::from_millis(50)))
                .jitter(0.0),
        )
        .step_timeout(Duration::from_millis(100))
        .max_duration(Duration::from_secs(600));
    app.workflow_with(
        "bounded",
        options.clone(),
        |ctx: WorkflowContext, slow: bool| async move {
            if slow {
                // Each attempt overruns the default timeout; two attempts in all.
                ctx.step("slow", (), |_| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok(())
                })
                .await?;
            } else {
                ctx.sleep(Duration::from_secs(3600)).await;
            }
            Ok(())
        },
    )
    .unwrap();
    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        app.worker()
            .queues(["bounded"])
            .poll_interval(Duration::from_millis(50))
            .run_until(stop.clone().cancelled_owned()),
    );
    common::wait_for("registration", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.workflows").await == 1
    })
    .await;

    let slow = app.start("bounded", &true).await.unwrap();
    let err = app.result::<()>(slow).await.unwrap_err();
    assert!(
        matches!(err, Error::RunFailed { ref error, .. } if error.contains("step timed out after 100ms (attempt 2 of 2, giving up)")),
        "{err}"
    );

    // A run that would sleep an hour is failed at its ten-minute limit.
    let sleepy = app.start("bounded", &false).await.unwrap();
    wait_status(&app, sleepy, "sleeping").await;
    let wake: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "select wake_at - created_at + '2000-01-01'::timestamptz from cairn.runs where id = $1",
    )
    .bind(sleepy)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        wake.timestamp() - 946_684_800,
        600,
        "parked until the deadline, not the hour"
    );
    advance_clock(&pool, 601.0).await;
    let err = app.result::<()>(sleepy).await.unwrap_err();
    assert!(
        matches!(err, Error::RunFailed { ref error, .. } if error.contains("exceeded its maximum duration of 600s")),
        "{err}"
    );
    stop.cancel();
    worker.await.unwrap().unwrap();
}

/// A run that ends notifies `cairn_run` with its id, whatever ended it:
/// App::result waits on that rather than polling.
#[sqlx::test(migrations = false)]
async fn a_run_that_ends_notifies_its_id(pool: PgPool) {
    let app = common::app(&pool).await;
    app.workflow("noop", |_ctx: WorkflowContext, i: u32| async move { Ok(i) })
        .unwrap();
    let mut listener = sqlx::postgres::PgListener::connect_with(&pool)
        .await
        .unwrap();
    listener.listen("cairn_run").await.unwrap();
    let done = app.start("noop", &7_u32).await.unwrap();
    let cancelled = app.start("noop", &8_u32).await.unwrap();
    app.cancel_run(cancelled).await.unwrap();
    let worker = app.worker().queues(["workflows"]);
    let handle = tokio::spawn(worker.run_until(async {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }));
    let out: u32 = app.result(done).await.unwrap();
    assert_eq!(out, 7);
    let mut ended = Vec::new();
    while ended.len() < 2 {
        let n = tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .expect("a notification")
            .unwrap();
        ended.push(n.payload().parse::<uuid::Uuid>().unwrap());
    }
    ended.sort();
    let mut want = vec![done, cancelled];
    want.sort();
    assert_eq!(ended, want);
    handle.await.unwrap().unwrap();
}

/// A lost notification only slows `result` down: with the trigger that
/// sends it disabled, the waiter still learns of the end from its timer.
#[sqlx::test(migrations = false)]
async fn result_returns_when_the_notification_is_lost(pool: PgPool) {
    let app = common::app(&pool).await;
    app.workflow("noop", |_ctx: WorkflowContext, i: u32| async move { Ok(i) })
        .unwrap();
    sqlx::query("alter table cairn.runs disable trigger runs_ended")
        .execute(&pool)
        .await
        .unwrap();
    let run = app.start("noop", &9_u32).await.unwrap();
    let worker = app.worker().queues(["workflows"]);
    let handle = tokio::spawn(worker.run_until(async {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }));
    let out: u32 = tokio::time::timeout(Duration::from_secs(5), app.result(run))
        .await
        .expect("result returns without the notification")
        .unwrap();
    assert_eq!(out, 9);
    handle.await.unwrap().unwrap();
}

/// `result_within` gives up after its limit with `NotEnded`, leaving the run
/// alone; once a worker runs it, the same call returns its output.
#[sqlx::test(migrations = false)]
async fn result_within_gives_up_without_touching_the_run(pool: PgPool) {
    let app = common::app(&pool).await;
    app.workflow("noop", |_ctx: WorkflowContext, i: u32| async move { Ok(i) })
        .unwrap();
    let run = app.start("noop", &4_u32).await.unwrap();
    let clock = std::time::Instant::now();
    let err = app
        .result_within::<u32>(run, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::NotEnded { run: r, .. } if r == run),
        "{err}"
    );
    assert!(clock.elapsed() < Duration::from_secs(2));
    assert_eq!(
        app.run_status(run).await.unwrap().status,
        cairn::RunStatus::Pending
    );
    let handle = tokio::spawn(app.worker().queues(["workflows"]).run_until(async {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }));
    let out = app
        .result_within::<u32>(run, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(out, 4);
    handle.await.unwrap().unwrap();
}

/// Runs executing at once share their calls: a worker sends the step begins
/// (and the loads and completions) its runs make at the same moment as one
/// batch. 300 three-step runs at concurrency 64 all complete with the right
/// output, in fewer round trips than they have steps (counted by Postgres).
#[sqlx::test(migrations = false)]
async fn runs_executing_at_once_share_their_calls(pool: PgPool) {
    let database: String = sqlx::query_scalar("select current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "alter database \"{database}\" set track_functions = 'pl'"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let register = |app: &App| {
        app.workflow("three", |ctx: WorkflowContext, i: i64| async move {
            let a: i64 = ctx.step("one", i, |i| async move { Ok(i + 1) }).await?;
            let b: i64 = ctx.step("two", a, |i| async move { Ok(i + 1) }).await?;
            Ok(ctx.step("three", b, |i| async move { Ok(i + 1) }).await?)
        })
        .unwrap();
    };
    let app = common::app(&pool).await;
    register(&app);
    app.register_workflows().await.unwrap();
    let mut runs = Vec::new();
    for i in 0..300_i64 {
        runs.push((i, app.start("three", &i).await.unwrap()));
    }
    // The worker on connections of its own, closed afterwards so that
    // their backends report their counts.
    let worker_app = common::builder(&common::url_of(&pool))
        .build()
        .await
        .unwrap();
    register(&worker_app);
    let stop = CancellationToken::new();
    let handle = tokio::spawn(
        worker_app
            .worker()
            .queues(["workflows"])
            .concurrency(64)
            .run_until(stop.clone().cancelled_owned()),
    );
    common::wait_for("300 runs to complete", Duration::from_secs(60), || async {
        common::scalar_i64(
            &pool,
            "select count(*) from cairn.runs where status = 'completed'",
        )
        .await
            == 300
    })
    .await;
    stop.cancel();
    handle.await.unwrap().unwrap();
    worker_app.pool().close().await;
    for (i, run) in runs {
        let out: i64 = app.result(run).await.unwrap();
        assert_eq!(out, i + 3);
    }
    // Behind a transaction pooler the server's backends outlive the pool:
    // they report once idle, within about ten seconds.
    let calls = |f: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query("select pg_stat_clear_snapshot()")
                .execute(&pool)
                .await
                .unwrap();
            sqlx::query_scalar::<_, i64>(
                "select coalesce(sum(calls), 0)::bigint from pg_stat_user_functions
                  where schemaname = 'cairn' and funcname = $1",
            )
            .bind(f)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    common::wait_for(
        "the worker's call counts",
        Duration::from_secs(30),
        || async {
            calls("complete_runs").await + calls("complete_run").await > 0
                && calls("begin_steps").await > 0
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let begins = calls("begin_steps").await + calls("begin_step").await;
    assert!(begins < 900, "{begins} calls for 900 step begins");
    assert!(calls("load_runs").await > 0, "the loads were batched");
}
