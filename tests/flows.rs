//! Flows: definitions as data, checked when stored and driven by Postgres.
//! A diamond whose middle steps run at the same time, both branches of a
//! condition, skipped steps whose dependents still run, a map over 1,000
//! elements, sub-flows and code-first workflows as steps, bounded loops,
//! signals, a failed step resumed by retry_run, cancel mid-flow, the
//! FlowSmith quick start from SQL alone, compose/plan/export, every bad
//! definition refused with where and why, and a worker SIGKILLed mid-flow.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn::{
    App, Error, Flow, HandlerError, RunStatus, Uuid, WorkerBuilder, WorkerStats, WorkflowContext,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Runs `worker` until the returned token is cancelled; the handle gives
/// its stats.
fn run_worker(worker: WorkerBuilder) -> (CancellationToken, tokio::task::JoinHandle<WorkerStats>) {
    let stop = CancellationToken::new();
    let until = stop.clone().cancelled_owned();
    let handle = tokio::spawn(async move { worker.run_until(until).await.expect("worker") });
    (stop, handle)
}

/// A worker on `workflows` until the returned token is cancelled.
fn spawn_worker(
    app: &App,
    concurrency: usize,
) -> (CancellationToken, tokio::task::JoinHandle<WorkerStats>) {
    run_worker(
        app.worker()
            .queues(["workflows"])
            .concurrency(concurrency)
            .shutdown_timeout(Duration::from_secs(2)),
    )
}

async fn result(app: &App, run: Uuid) -> Value {
    tokio::time::timeout(Duration::from_secs(60), app.result::<Value>(run))
        .await
        .expect("the run ends within a minute")
        .expect("the run completes")
}

/// The run's steps as (key, status), by name.
async fn steps(pool: &PgPool, run: Uuid) -> HashMap<String, String> {
    sqlx::query_as::<_, (String, String)>("select key, status from cairn.run_steps($1)")
        .bind(run)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// A handler that returns its input, counting its calls.
fn echo(app: &App, name: &str, calls: &Arc<AtomicUsize>) {
    let calls = Arc::clone(calls);
    app.step_handler(name, move |input: Value, _ctx| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move { Ok(input) }
    })
    .unwrap();
}

/// Registers step handlers that finish only if they all run at once: each
/// waits at one barrier (10 s at most), then returns `output(input)`.
fn meet_at_a_barrier(app: &App, names: &[&str], output: fn(&Value) -> Value) {
    let barrier = Arc::new(tokio::sync::Barrier::new(names.len()));
    for name in names {
        let barrier = Arc::clone(&barrier);
        app.step_handler(name, move |input: Value, _ctx| {
            let barrier = Arc::clone(&barrier);
            async move {
                tokio::time::timeout(Duration::from_secs(10), barrier.wait())
                    .await
                    .map_err(|_| HandlerError::fatal("the other branch never ran alongside"))?;
                Ok(output(&input))
            }
        })
        .unwrap();
    }
}

#[sqlx::test(migrations = false)]
async fn a_diamond_runs_its_middle_steps_at_the_same_time(pool: PgPool) {
    let app = common::app(&pool).await;
    // b and c meet at a barrier: neither finishes unless both run at once.
    meet_at_a_barrier(&app, &["b", "c"], |input| {
        json!(input["a"]["n"].as_i64().unwrap() + 1)
    });
    app.step_handler("a", |input: Value, _ctx| async move {
        Ok(json!({"n": input["input"]["n"]}))
    })
    .unwrap();
    app.step_handler("d", |input: Value, _ctx| async move {
        Ok(input["b"].as_i64().unwrap() + input["c"].as_i64().unwrap())
    })
    .unwrap();
    app.flow(
        Flow::new("diamond")
            .step("a")
            .step("b")
            .after(["a"])
            .step("c")
            .after(["a"])
            .step("d")
            .after(["b", "c"])
            .output("$.d"),
    )
    .unwrap();
    app.initialize().await.unwrap();

    let plan = app.plan_flow("diamond").await.unwrap();
    let stages: Vec<(u32, &str)> = plan.iter().map(|p| (p.stage, p.step.as_str())).collect();
    assert_eq!(stages, [(1, "a"), (2, "b"), (2, "c"), (3, "d")]);

    let (stop, worker) = spawn_worker(&app, 4);
    let run = app.start_flow("diamond", &json!({"n": 20})).await.unwrap();
    assert_eq!(result(&app, run).await, json!(42));
    let ran = steps(&pool, run).await;
    assert!(ran.values().all(|s| s == "completed"), "{ran:?}");
    assert_eq!(ran.len(), 4);
    // Each step ran from one job; b and c were enqueued by the same ack.
    let enqueued: Vec<(String, i64)> = sqlx::query_as(
        "select key, extract(epoch from started_at)::bigint from cairn.steps where run_id = $1 order by key",
    )
    .bind(run)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(enqueued.len(), 4);
    stop.cancel();
    worker.await.unwrap();
}

#[sqlx::test(migrations = false)]
async fn the_ack_of_a_step_starts_the_next_in_a_free_slot_without_a_claim(pool: PgPool) {
    let app = common::app(&pool).await;
    let calls = Arc::new(AtomicUsize::new(0));
    {
        let calls = Arc::clone(&calls);
        app.step_handler("hop", move |n: i64, _ctx| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                // Long enough for the claimers to have gone back to sleep.
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(n + 1)
            }
        })
        .unwrap();
    }
    let mut chain = Flow::new("chain")
        .step("s0")
        .handler("hop")
        .input("$.input");
    for i in 1..5 {
        chain = chain
            .step(format!("s{i}"))
            .handler("hop")
            .after([format!("s{}", i - 1)])
            .input(format!("$.s{}", i - 1));
    }
    app.flow(chain.output("$.s4")).unwrap();
    app.initialize().await.unwrap();
    let mut runs = Vec::new();
    for n in 0..4_i64 {
        runs.push((n, app.start_flow("chain", &json!(n * 100)).await.unwrap()));
    }

    // Eight slots for four runs: when a step ends, its ack finds free slots
    // and takes the next step of its run, which no claim can see before the
    // ack commits. No poll: only the first steps are claimed.
    let (stop, worker) = run_worker(
        app.worker()
            .queues(["workflows"])
            .concurrency(8)
            .poll_interval(Duration::from_secs(60)),
    );
    for (n, run) in &runs {
        assert_eq!(result(&app, *run).await, json!(n * 100 + 5));
    }
    stop.cancel();
    let stats = worker.await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 20, "each step ran once");
    assert_eq!(stats.completed, 20);
    assert_eq!(
        stats.taken, 16,
        "every step after the first was taken by an ack: {stats:?}"
    );
    // Each claimer claims at start and once more after finding jobs; the
    // acks that took the next steps sent no NOTIFY to wake one again.
    assert!(stats.claims <= 5, "{stats:?}");
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.jobs").await,
        0,
        "nothing taken was left behind"
    );
}

#[sqlx::test(migrations = false)]
async fn steps_an_ack_did_not_take_still_wake_the_workers(pool: PgPool) {
    let app = common::app(&pool).await;
    // b and c meet at a barrier: they finish only if both run at once.
    meet_at_a_barrier(&app, &["b", "c"], |_| json!(1));
    app.step_handler("a", |_: Value, _ctx| async move {
        // Long enough for the claimers to have gone back to sleep.
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(0)
    })
    .unwrap();
    app.flow(
        Flow::new("fork")
            .step("a")
            .step("b")
            .after(["a"])
            .step("c")
            .after(["a"]),
    )
    .unwrap();
    app.initialize().await.unwrap();
    // Two slots and no poll: the ack of `a` starts b and c and takes one
    // (one ack, one step taken); the other runs at once only if that ack
    // woke the workers.
    let (stop, worker) = run_worker(
        app.worker()
            .queues(["workflows"])
            .concurrency(2)
            .poll_interval(Duration::from_secs(60)),
    );
    // Started once the worker is idle, so that its claimers sleep.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let run = app.start_flow("fork", &json!({})).await.unwrap();
    result(&app, run).await;
    stop.cancel();
    let stats = worker.await.unwrap();
    assert_eq!(stats.taken, 1, "{stats:?}");
}

#[sqlx::test(migrations = false)]
async fn a_worker_shutting_down_takes_no_next_step(pool: PgPool) {
    let app = common::app(&pool).await;
    let started = Arc::new(AtomicUsize::new(0));
    {
        let started = Arc::clone(&started);
        app.step_handler("slow", move |_: Value, _ctx| {
            started.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(600)).await;
                Ok(1)
            }
        })
        .unwrap();
    }
    let calls = Arc::new(AtomicUsize::new(0));
    echo(&app, "next", &calls);
    app.flow(Flow::new("pair").step("slow").step("next").after(["slow"]))
        .unwrap();
    app.initialize().await.unwrap();
    let (stop, worker) = spawn_worker(&app, 4);
    let run = app.start_flow("pair", &json!({})).await.unwrap();
    common::wait_for(
        "the slow step to start",
        Duration::from_secs(10),
        || async { started.load(Ordering::SeqCst) == 1 },
    )
    .await;
    // Shutdown begins while `slow` runs: it may finish and be acked, but
    // its ack must not start `next` here.
    stop.cancel();
    let stats = worker.await.unwrap();
    assert_eq!((stats.completed, stats.taken), (1, 0), "{stats:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(
        common::scalar_i64(
            &pool,
            "select count(*) from cairn.jobs where task = 'next' and lease is null and attempts = 0"
        )
        .await,
        1,
        "the next step waits in the queue"
    );
    // Another worker picks it up.
    let (stop, worker) = spawn_worker(&app, 4);
    result(&app, run).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    stop.cancel();
    worker.await.unwrap();
}

#[sqlx::test(migrations = false)]
async fn ack_and_take_leases_only_the_steps_its_own_acks_started(pool: PgPool) {
    let app = common::app(&pool).await;
    let calls = Arc::new(AtomicUsize::new(0));
    echo(&app, "a", &calls);
    echo(&app, "b", &calls);
    app.flow(Flow::new("ab").step("a").step("b").after(["a"]))
        .unwrap();
    app.initialize().await.unwrap();
    let first = app.start_flow("ab", &json!(1)).await.unwrap();
    let second = app.start_flow("ab", &json!(2)).await.unwrap();
    let claimed: Vec<(i64, i64, Uuid)> =
        sqlx::query_as("select id, lease, parent_run from cairn.claim('workflows', 30, 2)")
            .fetch_all(&pool)
            .await
            .unwrap();
    let held = |run: Uuid| *claimed.iter().find(|c| c.2 == run).unwrap();
    let (a1, lease1, _) = held(first);
    let (a2, lease2, _) = held(second);
    let take = "select taken, id, task, attempts, lease, parent_run from cairn.ack_and_take($1, $2, $3, 30, $4, '{workflows}', '{a,b}')";
    type Row = (
        bool,
        i64,
        Option<String>,
        Option<i32>,
        Option<i64>,
        Option<Uuid>,
    );
    let call = |ids: i64, lease: i64, qty: i32| {
        sqlx::query_as::<_, Row>(take)
            .bind(vec![ids])
            .bind(vec![lease])
            .bind(vec![json!("out")])
            .bind(qty)
            .fetch_all(&pool)
    };

    // A stale lease acks nothing and takes nothing.
    assert!(call(a1, lease1 + 1, 5).await.unwrap().is_empty());
    // The ack of the first run's `a` takes that run's `b`, and only it:
    // the second run's `a` is visible too, and names a task allowed.
    let rows = call(a1, lease1, 5).await.unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0], (false, a1, None, None, None, None));
    let (taken, b1, task, attempts, lease_b1, run) = rows[1].clone();
    assert!(taken);
    assert_eq!(
        (task.as_deref(), attempts, run),
        (Some("b"), Some(1), Some(first))
    );
    let (lease_in_table, leased_for): (i64, f64) = sqlx::query_as(
        "select lease, extract(epoch from leased_until - now())::float8 from cairn.jobs where id = $1",
    )
    .bind(b1)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(Some(lease_in_table), lease_b1);
    assert!(leased_for > 25.0, "leased for 30 s: {leased_for}");
    // qty 0: an ack, nothing taken; the second run's `b` waits in the queue.
    let rows = call(a2, lease2, 0).await.unwrap();
    assert_eq!(rows, [(false, a2, None, None, None, None)]);
    assert_eq!(
        common::scalar_i64(
            &pool,
            "select count(*) from cairn.jobs where task = 'b' and lease is null and attempts = 0"
        )
        .await,
        1
    );
    // The taken job is the caller's to ack: its run completes.
    let rows = call(b1, lease_b1.unwrap(), 5).await.unwrap();
    assert_eq!(rows, [(false, b1, None, None, None, None)]);
    let status: String = sqlx::query_scalar("select status from cairn.run_status($1)")
        .bind(first)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(status, "completed");

    // Bad input is refused at the boundary, naming what is wrong.
    for (sql, state) in [
        (
            "select * from cairn.ack_and_take('{1}', '{1}', null, 30, -1, '{workflows}', '{a}')",
            "22023",
        ),
        (
            "select * from cairn.ack_and_take('{1}', '{1}', null, 30, null, '{workflows}', '{a}')",
            "22004",
        ),
        (
            "select * from cairn.ack_and_take('{1}', '{1}', null, 0, 1, '{workflows}', '{a}')",
            "22023",
        ),
        (
            "select * from cairn.ack_and_take('{1}', '{1,2}', null, 30, 1, '{workflows}', '{a}')",
            "22023",
        ),
        (
            "select * from cairn.ack_and_take(array[null::bigint], '{1}', null, 30, 1, '{workflows}', '{a}')",
            "22004",
        ),
        (
            "select * from cairn.ack_and_take('{1}', '{1}', '{1,2}', 30, 1, '{workflows}', '{a}')",
            "22023",
        ),
    ] {
        let err = sqlx::query(sql).execute(&pool).await.unwrap_err();
        assert_eq!(
            common::sqlstate(&err).as_deref(),
            Some(state),
            "{sql}: {err}"
        );
    }
}

#[sqlx::test(migrations = false)]
async fn conditions_choose_a_branch_and_skipped_steps_let_their_dependents_run(pool: PgPool) {
    let app = common::app(&pool).await;
    app.step_handler("check", |input: Value, _ctx| async move {
        Ok(json!({"ok": input["input"]["amount"].as_i64().unwrap() < 100}))
    })
    .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    for name in ["approve", "reject"] {
        app.step_handler(name, move |_: Value, _ctx| async move { Ok(name) })
            .unwrap();
    }
    echo(&app, "notify", &calls);
    app.flow(
        Flow::new("review_payment")
            .step("check")
            .step("approve")
            .after(["check"])
            .when("$.check.ok == true")
            .step("reject")
            .after(["check"])
            .when("$.check.ok == false")
            .step("notify")
            .after(["approve", "reject"])
            .input_field("approved", "$.approve")
            .input_field("rejected", "$.reject")
            .output("$.notify"),
    )
    .unwrap();
    app.initialize().await.unwrap();
    let (stop, worker) = spawn_worker(&app, 4);

    let small = app
        .start_flow("review_payment", &json!({"amount": 5}))
        .await
        .unwrap();
    let big = app
        .start_flow("review_payment", &json!({"amount": 500}))
        .await
        .unwrap();
    assert_eq!(
        result(&app, small).await,
        json!({"approved": "approve", "rejected": null})
    );
    assert_eq!(
        result(&app, big).await,
        json!({"approved": null, "rejected": "reject"})
    );
    let s = steps(&pool, small).await;
    assert_eq!(
        (s["approve"].as_str(), s["reject"].as_str()),
        ("completed", "skipped")
    );
    let b = steps(&pool, big).await;
    assert_eq!(
        (b["approve"].as_str(), b["reject"].as_str()),
        ("skipped", "completed")
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2, "notify ran once per run");
    // The history shows the skipped step.
    let skipped: i64 = sqlx::query_scalar(
        "select count(*) from cairn.run_history($1) where outcome = 'skipped' and step = 'reject'",
    )
    .bind(small)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(skipped, 1);
    stop.cancel();
    worker.await.unwrap();
}

#[sqlx::test(migrations = false)]
async fn a_map_over_1000_elements_gathers_their_outputs_in_order(pool: PgPool) {
    let app = common::app(&pool).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    app.step_handler("square", move |n: i64, _ctx| {
        counted.fetch_add(1, Ordering::SeqCst);
        async move { Ok(n * n) }
    })
    .unwrap();
    app.step_handler("sum", |xs: Vec<i64>, _ctx| async move {
        Ok(xs.iter().sum::<i64>())
    })
    .unwrap();
    app.step_handler("label", |v: Value, _ctx| async move {
        Ok(format!("{}#{}", v["name"].as_str().unwrap(), v["i"]))
    })
    .unwrap();
    app.flow(
        Flow::new("squares")
            .step("squares")
            .handler("square")
            .map("$.input.numbers")
            .step("total")
            .handler("sum")
            .after(["squares"])
            .input("$.squares")
            .step("labels")
            .handler("label")
            .map("$.input.names")
            .input_field("name", "$item")
            .input_field("i", "$index"),
    )
    .unwrap();
    app.initialize().await.unwrap();
    let (stop, worker) = spawn_worker(&app, 32);

    let numbers: Vec<i64> = (1..=1000).collect();
    let run = app
        .start_flow("squares", &json!({"numbers": numbers, "names": ["x", "y"]}))
        .await
        .unwrap();
    let out = result(&app, run).await;
    let squares: Vec<i64> = numbers.iter().map(|n| n * n).collect();
    assert_eq!(out["squares"], json!(squares));
    assert_eq!(out["total"], json!(squares.iter().sum::<i64>()));
    assert_eq!(out["labels"], json!(["x#0", "y#1"]));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1000,
        "one job per element, once each"
    );

    // A map over something that is not an array fails its step, saying so.
    let bad = app
        .start_flow("squares", &json!({"numbers": {"one": 1}, "names": []}))
        .await
        .unwrap();
    match app.result::<Value>(bad).await {
        Err(Error::RunFailed { error, .. }) => assert!(
            error.contains(
                "step squares failed: map over $.input.numbers: expected an array, got object"
            ),
            "{error}"
        ),
        other => panic!("expected a failed run, got {other:?}"),
    }
    stop.cancel();
    worker.await.unwrap();
}

#[sqlx::test(migrations = false)]
async fn sub_flows_and_code_first_workflows_run_as_steps(pool: PgPool) {
    let app = common::app(&pool).await;
    app.step_handler("double", |n: i64, _ctx| async move { Ok(n * 2) })
        .unwrap();
    app.workflow("greet", |ctx: WorkflowContext, n: i64| async move {
        let text: String = ctx
            .step("compose", n, |n| async move { Ok(format!("got {n}")) })
            .await?;
        Ok(text)
    })
    .unwrap();
    app.flow(
        Flow::new("inner")
            .step("double")
            .input("$.input")
            .output("$.double"),
    )
    .unwrap();
    app.flow(
        Flow::new("outer")
            .step("first")
            .handler("double")
            .input("$.input.n")
            .step("nested")
            .sub_flow("inner")
            .after(["first"])
            .input("$.first")
            .step("each")
            .sub_flow("inner")
            .map("$.input.more")
            .step("greeting")
            .workflow("greet")
            .after(["nested"])
            .input("$.nested"),
    )
    .unwrap();
    app.initialize().await.unwrap();
    let (stop, worker) = spawn_worker(&app, 8);

    let run = app.start_flow("inner", &json!(21)).await.unwrap();
    assert_eq!(result(&app, run).await, json!(42));
    let run = app
        .start_flow("outer", &json!({"n": 5, "more": [1, 2, 3]}))
        .await
        .unwrap();
    let out = result(&app, run).await;
    assert_eq!(out["first"], json!(10));
    assert_eq!(out["nested"], json!(20));
    assert_eq!(out["each"], json!([2, 4, 6]));
    assert_eq!(out["greeting"], json!("got 20"));
    // The children are runs of their own, with this run as their parent.
    let children: i64 = sqlx::query_scalar(
        "select count(*) from cairn.runs where parent_run = $1 and status = 'completed'",
    )
    .bind(run)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(children, 5, "nested, three elements of each, greeting");
    stop.cancel();
    worker.await.unwrap();
}

#[sqlx::test(migrations = false)]
async fn a_loop_goes_back_until_approved_or_its_bound(pool: PgPool) {
    let app = common::app(&pool).await;
    // review approves at the `approve_at`-th review of its run.
    let reviews: Arc<Mutex<HashMap<Uuid, i64>>> = Arc::default();
    let seen = Arc::clone(&reviews);
    app.step_handler("review", move |input: Value, ctx| {
        let run = ctx.parent_run().unwrap();
        let n = {
            let mut map = seen.lock().unwrap();
            let n = map.entry(run).or_insert(0);
            *n += 1;
            *n
        };
        async move {
            Ok(json!({"approved": n >= input["input"]["approve_at"].as_i64().unwrap(), "n": n}))
        }
    })
    .unwrap();
    let revisions = Arc::new(AtomicUsize::new(0));
    echo(&app, "revise", &revisions);
    let publishes = Arc::new(AtomicUsize::new(0));
    echo(&app, "publish", &publishes);
    app.flow(
        Flow::new("editorial")
            .step("review")
            .step("revise")
            .after(["review"])
            .when("$.review.approved == false")
            .goto("review", 2)
            .step("publish")
            .after(["review", "revise"])
            .when("$.review.approved == true")
            .input("$.review.n"),
    )
    .unwrap();
    app.initialize().await.unwrap();
    let (stop, worker) = spawn_worker(&app, 4);

    // Approved at the second review: one revision, then publish.
    let run = app
        .start_flow("editorial", &json!({"approve_at": 2}))
        .await
        .unwrap();
    let out = result(&app, run).await;
    assert_eq!(out["publish"], json!(2));
    assert_eq!(reviews.lock().unwrap()[&run], 2);
    assert_eq!(revisions.load(Ordering::SeqCst), 1);

    // Never approved: three reviews and three revisions (two loops, the
    // bound), then on without publishing.
    let run = app
        .start_flow("editorial", &json!({"approve_at": 99}))
        .await
        .unwrap();
    let out = result(&app, run).await;
    assert_eq!(out["review"]["n"], json!(3));
    assert!(out.get("publish").is_none(), "{out}");
    assert_eq!(reviews.lock().unwrap()[&run], 3);
    assert_eq!(revisions.load(Ordering::SeqCst), 1 + 3);
    assert_eq!(publishes.load(Ordering::SeqCst), 1);
    let loops: i64 =
        sqlx::query_scalar("select count(*) from cairn.run_history($1) where event = 'looped'")
            .bind(run)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(loops, 2);
    stop.cancel();
    worker.await.unwrap();
}

#[sqlx::test(migrations = false)]
async fn a_failed_step_fails_the_run_and_retry_run_resumes_at_it(pool: PgPool) {
    let app = common::app(&pool).await;
    let first = Arc::new(AtomicUsize::new(0));
    echo(&app, "prepare", &first);
    let fixed = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicUsize::new(0));
    let (flag, tries) = (Arc::clone(&fixed), Arc::clone(&attempts));
    app.step_handler("charge", move |_: Value, _ctx| {
        tries.fetch_add(1, Ordering::SeqCst);
        let ok = flag.load(Ordering::SeqCst);
        async move {
            if ok {
                Ok("charged")
            } else {
                Err(HandlerError::retryable("the card network is down"))
            }
        }
    })
    .unwrap();
    let last = Arc::new(AtomicUsize::new(0));
    echo(&app, "receipt", &last);
    app.flow(
        Flow::new("checkout")
            .step("prepare")
            .step("charge")
            .after(["prepare"])
            .retry(2, Duration::from_millis(10), Duration::from_millis(10))
            .step("receipt")
            .after(["charge"]),
    )
    .unwrap();
    app.initialize().await.unwrap();
    let (stop, worker) = spawn_worker(&app, 4);

    let run = app.start_flow("checkout", &json!({})).await.unwrap();
    match app.result::<Value>(run).await {
        Err(Error::RunFailed { error, .. }) => {
            assert!(error.contains("step charge failed"), "{error}");
            assert!(error.contains("the card network is down"), "{error}");
        }
        other => panic!("expected a failed run, got {other:?}"),
    }
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        2,
        "the step's own retry policy: 2 attempts"
    );
    assert_eq!(last.load(Ordering::SeqCst), 0);

    fixed.store(true, Ordering::SeqCst);
    assert!(app.retry_run(run).await.unwrap());
    let out = result(&app, run).await;
    assert_eq!(out["charge"], json!("charged"));
    assert_eq!(
        first.load(Ordering::SeqCst),
        1,
        "the completed step did not run again"
    );
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    assert_eq!(last.load(Ordering::SeqCst), 1);
    let retried: i64 =
        sqlx::query_scalar("select count(*) from cairn.run_history($1) where event = 'retried'")
            .bind(run)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(retried, 1);
    stop.cancel();
    worker.await.unwrap();
}

#[sqlx::test(migrations = false)]
async fn cancel_mid_flow_stops_the_running_step_and_starts_no_other(pool: PgPool) {
    let app = common::app(&pool).await;
    let started = Arc::new(AtomicUsize::new(0));
    let aborted = Arc::new(AtomicUsize::new(0));
    let (s, a) = (Arc::clone(&started), Arc::clone(&aborted));
    /// Counts the handler's end, however it ends (an abort drops it).
    struct Ended(Arc<AtomicUsize>);
    impl Drop for Ended {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    app.step_handler("slow", move |_: Value, _ctx| {
        s.fetch_add(1, Ordering::SeqCst);
        let ended = Ended(Arc::clone(&a));
        async move {
            let _ended = ended;
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        }
    })
    .unwrap();
    let after = Arc::new(AtomicUsize::new(0));
    echo(&app, "after_slow", &after);
    app.flow(
        Flow::new("long")
            .step("slow")
            .step("after_slow")
            .after(["slow"]),
    )
    .unwrap();
    app.initialize().await.unwrap();
    let (stop, worker) = run_worker(
        app.worker()
            .queues(["workflows"])
            .concurrency(2)
            .lease(Duration::from_secs(3)),
    );

    let run = app.start_flow("long", &json!({})).await.unwrap();
    common::wait_for(
        "the slow step to start",
        Duration::from_secs(10),
        || async { started.load(Ordering::SeqCst) == 1 },
    )
    .await;
    assert_eq!(app.cancel_run(run).await.unwrap(), 1);
    assert!(matches!(
        app.result::<Value>(run).await,
        Err(Error::RunCancelled { .. })
    ));
    // The heartbeat finds the job gone and aborts the handler.
    common::wait_for(
        "the handler to be aborted",
        Duration::from_secs(10),
        || async { aborted.load(Ordering::SeqCst) == 1 },
    )
    .await;
    let jobs = common::scalar_i64(&pool, "select count(*) from cairn.jobs").await;
    assert_eq!(jobs, 0);
    assert_eq!(after.load(Ordering::SeqCst), 0);
    assert_eq!(
        app.run_status(run).await.unwrap().status,
        RunStatus::Cancelled
    );
    stop.cancel();
    worker.await.unwrap();
}

#[sqlx::test(migrations = false)]
async fn a_signal_step_waits_for_its_signal(pool: PgPool) {
    let app = common::app(&pool).await;
    app.step_handler("ship", |input: Value, _ctx| async move {
        Ok(format!("shipped by {}", input["by"].as_str().unwrap()))
    })
    .unwrap();
    app.flow(
        Flow::new("approval")
            .step("approved")
            .signal("approve")
            .step("ship")
            .after(["approved"])
            .input_field("by", "$.approved.payload.who")
            .output("$.ship"),
    )
    .unwrap();
    app.initialize().await.unwrap();
    let (stop, worker) = spawn_worker(&app, 2);

    let run = app.start_flow("approval", &json!({})).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(steps(&pool, run).await["approved"], "waiting");
    app.send_signal(run, "approve", &json!({"who": "ann"}))
        .await
        .unwrap();
    assert_eq!(result(&app, run).await, json!("shipped by ann"));

    // A signal sent before the step waits is kept for it.
    let run = app.start_flow("approval", &json!({})).await.unwrap();
    app.send_signal(run, "approve", &json!({"who": "bob"}))
        .await
        .unwrap();
    assert_eq!(result(&app, run).await, json!("shipped by bob"));
    stop.cancel();
    worker.await.unwrap();
}

/// A signal step with a timeout: a signal in time is taken as usual; past
/// the deadline (on the test clock) the step completes with
/// `{"timeout": true}` once, and a condition on it chooses the branch.
#[sqlx::test(migrations = false)]
async fn a_signal_step_times_out_and_a_condition_takes_the_other_branch(pool: PgPool) {
    let app = common::app(&pool).await;
    let shipped = Arc::new(AtomicUsize::new(0));
    let escalated = Arc::new(AtomicUsize::new(0));
    echo(&app, "ship", &shipped);
    echo(&app, "escalate", &escalated);
    app.flow(
        Flow::new("approval_timeout")
            .step("approved")
            .signal("approve")
            .timeout(Duration::from_secs(3600))
            .step("ship")
            .after(["approved"])
            .when("exists($.approved.payload)")
            .step("escalate")
            .after(["approved"])
            .when("$.approved.timeout == true"),
    )
    .unwrap();
    app.initialize().await.unwrap();
    let (stop, worker) = run_worker(
        app.worker()
            .queues(["workflows"])
            .schedule_interval(Duration::from_millis(50)),
    );

    // Signalled in time: shipped, not escalated.
    let in_time = app
        .start_flow("approval_timeout", &json!({}))
        .await
        .unwrap();
    let late = app
        .start_flow("approval_timeout", &json!({}))
        .await
        .unwrap();
    app.send_signal(in_time, "approve", &json!({"who": "ann"}))
        .await
        .unwrap();
    result(&app, in_time).await;
    assert_eq!(steps(&pool, in_time).await["escalate"], "skipped");

    // Still waiting until the deadline passes; then it times out, once.
    assert_eq!(app.fire_timers().await.unwrap(), 0);
    assert_eq!(steps(&pool, late).await["approved"], "waiting");
    sqlx::query("select cairn.advance_test_clock(3601)")
        .execute(&pool)
        .await
        .unwrap();
    let output = result(&app, late).await;
    assert_eq!(output["approved"], json!({"timeout": true}), "{output}");
    let late_steps = steps(&pool, late).await;
    assert_eq!(
        (late_steps["ship"].as_str(), late_steps["escalate"].as_str()),
        ("skipped", "completed")
    );
    assert_eq!(
        (
            shipped.load(Ordering::SeqCst),
            escalated.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
    // The run is over: a late signal is refused.
    let (code, _) = common::refused(
        &pool,
        &format!("select cairn.send_signal('{late}', 'approve', '{{}}')"),
    )
    .await;
    assert_eq!(code, "55000", "the run has ended");
    assert_eq!(app.fire_timers().await.unwrap(), 0, "nothing fires twice");
    stop.cancel();
    worker.await.unwrap();

    // With no worker: a cancelled run's wait, though due first, never
    // fires and never holds up a live run's.
    let cancelled = app
        .start_flow("approval_timeout", &json!({}))
        .await
        .unwrap();
    let live = app
        .start_flow("approval_timeout", &json!({}))
        .await
        .unwrap();
    app.cancel_run(cancelled).await.unwrap();
    sqlx::query("select cairn.advance_test_clock(3601)")
        .execute(&pool)
        .await
        .unwrap();
    // No worker fires it: the doctor says so (the cancelled run's aside).
    let late: String =
        sqlx::query_scalar("select detail from cairn.doctor(0) where check_name = 'timers'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        late.starts_with("1 flow signal wait(s) timed out"),
        "{late}"
    );
    let fired: i32 = sqlx::query_scalar("select cairn.fire_timers(1)")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(fired, 1);
    assert_eq!(steps(&pool, live).await["approved"], "completed");
    assert_eq!(steps(&pool, cancelled).await["approved"], "waiting");
    assert_eq!(app.fire_timers().await.unwrap(), 0);
}

/// Timers fired by several callers at once: each due wait fires exactly
/// once, in total, and no caller deadlocks on another's runs.
#[sqlx::test(migrations = false)]
async fn concurrent_timer_firing_fires_each_wait_once(pool: PgPool) {
    let app = common::app(&pool).await;
    let calls = Arc::new(AtomicUsize::new(0));
    echo(&app, "after", &calls);
    app.flow(
        Flow::new("waits")
            .step("approved")
            .signal("approve")
            .timeout(Duration::from_secs(60))
            .step("after")
            .after(["approved"]),
    )
    .unwrap();
    app.initialize().await.unwrap();
    const RUNS: usize = 300;
    for _ in 0..RUNS {
        app.start_flow("waits", &json!({})).await.unwrap();
    }
    sqlx::query("select cairn.advance_test_clock(61)")
        .execute(&pool)
        .await
        .unwrap();
    // Six callers, small batches: they meet on the same due waits.
    let callers: Vec<_> = (0..6)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut fired = 0i64;
                loop {
                    let n: i32 = sqlx::query_scalar("select cairn.fire_timers(7)")
                        .fetch_one(&pool)
                        .await
                        .expect("no error, no deadlock");
                    fired += i64::from(n);
                    let left = common::scalar_i64(
                        &pool,
                        "select count(*) from cairn.steps where kind = 'signal' and status = 'waiting'",
                    )
                    .await;
                    if left == 0 {
                        return fired;
                    }
                }
            })
        })
        .collect();
    let mut fired = 0;
    for caller in callers {
        fired += caller.await.unwrap();
    }
    assert_eq!(fired, RUNS as i64, "each wait fired once in all");
    assert_eq!(
        common::scalar_i64(
            &pool,
            "select count(*) from cairn.steps where key = 'after' and status = 'waiting'"
        )
        .await,
        RUNS as i64,
        "every run moved on to its next step, once"
    );
}

/// The FlowSmith quick start (create an order: validate it, get the
/// product, total it, charge it, each step reading earlier outputs by
/// name), defined and started from SQL alone; the handlers are Rust.
#[sqlx::test(migrations = false)]
async fn the_flowsmith_quick_start_from_sql_alone(pool: PgPool) {
    let app = common::app(&pool).await;
    app.step_handler("validate_order", |ctx: Value, _| async move {
        let qty = ctx["input"]["quantity"].as_i64().unwrap_or(0);
        if qty < 1 {
            return Err(HandlerError::fatal("quantity must be at least 1"));
        }
        Ok(json!({"valid": true}))
    })
    .unwrap();
    app.step_handler("get_product", |id: i64, _| async move {
        Ok(json!({"id": id, "name": "widget", "price": 250}))
    })
    .unwrap();
    app.step_handler("calculate_total", |v: Value, _| async move {
        Ok(v["price"].as_i64().unwrap() * v["quantity"].as_i64().unwrap())
    })
    .unwrap();
    app.step_handler("charge", |total: i64, _| async move {
        Ok(json!({"charged": total, "status": "paid"}))
    })
    .unwrap();
    app.initialize().await.unwrap();
    let (stop, worker) = spawn_worker(&app, 4);

    sqlx::raw_sql(
        r#"select cairn.create_flow('create_order', '{
             "steps": [
               {"name": "validate_order"},
               {"name": "get_product", "after": ["validate_order"], "input": "$.input.product_id"},
               {"name": "calculate_total", "after": ["get_product"],
                "input": {"price": "$.get_product.price", "quantity": "$.input.quantity"}},
               {"name": "charge", "after": ["calculate_total"], "input": "$.calculate_total",
                "retry": {"max_attempts": 3, "backoff": 0.1}}
             ]}')"#,
    )
    .execute(&pool)
    .await
    .unwrap();
    let run: Uuid = sqlx::query_scalar(
        "select cairn.start_flow('create_order', '{\"product_id\": 7, \"quantity\": 3}', idempotency_key => 'order-7')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let again: Uuid = sqlx::query_scalar(
        "select cairn.start_flow('create_order', '{\"product_id\": 7, \"quantity\": 3}', idempotency_key => 'order-7')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(run, again, "the same key names the same run");
    let out = result(&app, run).await;
    assert_eq!(out["get_product"]["name"], json!("widget"));
    assert_eq!(out["calculate_total"], json!(750));
    assert_eq!(out["charge"], json!({"charged": 750, "status": "paid"}));
    // Also through start_workflow, which starts flows too.
    let run: Uuid = sqlx::query_scalar(
        "select cairn.start_workflow('create_order', '{\"product_id\": 7, \"quantity\": 0}')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    match app.result::<Value>(run).await {
        Err(Error::RunFailed { error, .. }) => {
            assert!(error.contains("quantity must be at least 1"), "{error}")
        }
        other => panic!("expected a failed run, got {other:?}"),
    }
    stop.cancel();
    worker.await.unwrap();
}

#[sqlx::test(migrations = false)]
async fn bad_definitions_are_refused_saying_where_and_nothing_is_stored(pool: PgPool) {
    let app = common::app(&pool).await;
    for name in ["a", "b"] {
        sqlx::query("select cairn.register_step_handler($1)")
            .bind(name)
            .execute(&pool)
            .await
            .unwrap();
    }
    let cases: &[(&str, &str, &str)] = &[
        (
            r#"{"steps": [{"name": "a", "after": ["b"]}, {"name": "b", "after": ["a"]}]}"#,
            "22023",
            r#"flow "f": step "a": a cycle in "after": a → b → a"#,
        ),
        (
            r#"{"steps": [{"name": "a", "after": ["nope"]}]}"#,
            "42704",
            r#"step "a": "after" names "nope", which is not a step of this flow"#,
        ),
        (
            r#"{"steps": [{"name": "pay", "handler": "pya"}]}"#,
            "42704",
            r#"step "pay": unknown handler "pya""#,
        ),
        (
            r#"{"steps": [{"name": "a", "when": "$.x ==="}]}"#,
            "22023",
            r#"step "a": condition "$.x ===" does not parse"#,
        ),
        (
            r#"{"steps": [{"name": "a"}, {"name": "a"}]}"#,
            "22023",
            r#"step "a": duplicate step name"#,
        ),
        (
            r#"{"steps": [{"name": "a"}, {"name": "b", "after": ["a"], "goto": {"step": "a"}}]}"#,
            "22023",
            r#"step "b": a loop without a bound: goto needs "max""#,
        ),
        (
            r#"{"steps": [{"name": "a", "goto": {"step": "b", "max": 2}}, {"name": "b", "after": ["a"]}]}"#,
            "22023",
            r#"step "a": goto "b" must go back"#,
        ),
        (
            r#"{"steps": [{"name": "a", "map": "$.x[", "input": "$item"}]}"#,
            "22023",
            r#"step "a": map "$.x[" does not parse"#,
        ),
        (
            r#"{"steps": [{"name": "a", "input": "$nothere"}]}"#,
            "22023",
            r#"step "a": input "$nothere" does not parse: could not find jsonpath variable "nothere""#,
        ),
        (
            r#"{"steps": [{"name": "a", "retry": {"max_attempts": 0}}]}"#,
            "22023",
            r#"step "a": retry.max_attempts = 0 is out of range"#,
        ),
        (
            r#"{"steps": [{"name": "a", "flow": "ghost"}]}"#,
            "42704",
            r#"step "a": unknown flow "ghost""#,
        ),
        (
            r#"{"steps": [{"name": "a", "signal": "go", "retry": {"max_attempts": 2}}]}"#,
            "22023",
            r#"step "a": "retry" applies to handler steps only; this step runs a signal"#,
        ),
        (
            r#"{"steps": [{"name": "a", "signal": "go", "timeout": 0}]}"#,
            "22023",
            r#"step "a": timeout = 0: seconds above 0"#,
        ),
        (
            r#"{"steps": [{"name": "a", "handler": "a", "signal": "go"}]}"#,
            "22023",
            r#"step "a": names both a handler and a signal"#,
        ),
        (
            r#"{"steps": [{"name": "a", "afterr": ["b"]}]}"#,
            "22023",
            r#"step "a": unknown key "afterr""#,
        ),
        (
            r#"{"steps": []}"#,
            "22023",
            r#""steps" must be a non-empty array"#,
        ),
        (
            r#"{"steps": [{"name": "input"}]}"#,
            "22023",
            r#"step "input": "input" is reserved"#,
        ),
    ];
    for (definition, code, message) in cases {
        let sql = format!("select cairn.create_flow('f', '{definition}')");
        let (got_code, got) = common::refused(&pool, &sql).await;
        assert_eq!(&got_code, code, "{definition}: {got}");
        assert!(
            got.contains(message),
            "{definition}:\n  got {got}\n  want {message}"
        );
    }
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.flows").await,
        0
    );
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.flow_versions").await,
        0
    );

    // A flow that runs itself, directly or through another.
    sqlx::raw_sql(r#"select cairn.create_flow('g', '{"steps": [{"name": "a"}]}')"#)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::raw_sql(r#"select cairn.create_flow('f', '{"steps": [{"name": "x", "flow": "g"}]}')"#)
        .execute(&pool)
        .await
        .unwrap();
    let (_, got) = common::refused(
        &pool,
        r#"select cairn.create_flow('g', '{"steps": [{"name": "y", "flow": "f"}]}')"#,
    )
    .await;
    assert!(
        got.contains(r#"flow "f" runs this flow as a step, directly or not"#),
        "{got}"
    );
    assert_eq!(
        common::scalar_i64(
            &pool,
            "select count(*) from cairn.flow_versions where flow = 'g'"
        )
        .await,
        1
    );

    // From Rust: the same errors, typed.
    let err = app
        .create_flow(&Flow::new("h").step("a").after(["zzz"]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");
    let err = app
        .create_flow(&Flow::new("h").step("a").when("$.("))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
    let err = app.flow(Flow::new("h").after(["a"])).unwrap_err();
    assert!(err.to_string().contains("after before any step"), "{err}");

    // compose_flow names an unknown handler at once.
    let (code, got) = common::refused(
        &pool,
        "select cairn.compose_flow('on_call', array['a', 'diagnose', 'b'])",
    )
    .await;
    assert_eq!(
        (code.as_str(), got.as_str()),
        ("42704", r#"cairn: unknown handler "diagnose""#)
    );
}

#[sqlx::test(migrations = false)]
async fn flows_are_composed_planned_versioned_and_exported_to_another_database(pool: PgPool) {
    let app = common::app(&pool).await;
    let calls = Arc::new(AtomicUsize::new(0));
    for name in ["check_health", "diagnose", "remediate"] {
        echo(&app, name, &calls);
    }
    app.initialize().await.unwrap();
    let v: i32 = sqlx::query_scalar(
        "select cairn.compose_flow('on_call', array['check_health', 'diagnose', 'remediate', 'check_health'])",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(v, 1);
    let plan: Vec<(i32, String, String, Vec<String>)> =
        sqlx::query_as("select stage, step, target, after from cairn.plan_flow('on_call')")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        plan,
        [
            (
                1,
                "check_health".to_owned(),
                "check_health".to_owned(),
                vec![]
            ),
            (
                2,
                "diagnose".into(),
                "diagnose".into(),
                vec!["check_health".to_owned()]
            ),
            (
                3,
                "remediate".into(),
                "remediate".into(),
                vec!["diagnose".to_owned()]
            ),
            (
                4,
                "check_health_2".into(),
                "check_health".into(),
                vec!["remediate".to_owned()]
            ),
        ]
    );
    // A dry run of a definition that is not stored.
    let stages: Vec<(i32, String)> = sqlx::query_as(
        r#"select stage, step from cairn.plan_flow('{"steps": [{"name": "diagnose"}, {"name": "check_health"}, {"name": "remediate", "after": ["diagnose", "check_health"]}]}'::jsonb)"#,
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        stages,
        [
            (1, "diagnose".to_owned()),
            (1, "check_health".into()),
            (2, "remediate".into())
        ]
    );
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.flows").await,
        1
    );

    // A run keeps its version: start one, store version 2, the run goes on
    // with version 1's four steps.
    let run = app.start_flow("on_call", &json!({})).await.unwrap();
    let v2: i32 = sqlx::query_scalar(
        "select cairn.compose_flow('on_call', array['check_health', 'remediate'])",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(v2, 2);
    let same: i32 = sqlx::query_scalar(
        "select cairn.compose_flow('on_call', array['check_health', 'remediate'])",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(same, 2, "an unchanged definition is no new version");
    let (stop, worker) = spawn_worker(&app, 2);
    let out = result(&app, run).await;
    assert_eq!(out.as_object().unwrap().len(), 4, "{out}");
    let run2 = app.start_flow("on_call", &json!({})).await.unwrap();
    assert_eq!(result(&app, run2).await.as_object().unwrap().len(), 2);
    stop.cancel();
    worker.await.unwrap();

    // Export, then recreate in another database with the same handlers.
    let script: String = sqlx::query_scalar("select cairn.export_flows()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let exported = app.export_flow("on_call").await.unwrap();
    assert!(script.contains(&exported));
    // Short: a name over 63 bytes would be cut to the test database's own.
    let other = format!(
        "cairn_export_{}",
        &cairn::Uuid::new_v4().simple().to_string()[..12]
    );
    for sql in [
        format!("drop database if exists {other}"),
        format!("create database {other}"),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
    }
    let url = common::url_of(&pool).rsplit_once('/').unwrap().0.to_owned() + "/" + &other;
    {
        let prod = common::builder(&url).build().await.unwrap();
        for name in ["check_health", "diagnose", "remediate"] {
            echo(&prod, name, &calls);
        }
        prod.initialize().await.unwrap();
        let prod_pool = PgPool::connect(&url).await.unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(script))
            .execute(&prod_pool)
            .await
            .unwrap();
        let (here, there): (Value, Value) = (
            sqlx::query_scalar("select definition from cairn.list_flows()")
                .fetch_one(&pool)
                .await
                .unwrap(),
            sqlx::query_scalar("select definition from cairn.list_flows()")
                .fetch_one(&prod_pool)
                .await
                .unwrap(),
        );
        assert_eq!(here, there);
        prod_pool.close().await;
        prod.pool().close().await;
    }
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "drop database {other} with (force)"
    )))
    .execute(&pool)
    .await
    .unwrap();
}

#[sqlx::test(migrations = false)]
async fn roles_producers_start_and_plan_admins_define(pool: PgPool) {
    let app = common::app(&pool).await;
    let calls = Arc::new(AtomicUsize::new(0));
    echo(&app, "a", &calls);
    app.flow(Flow::new("simple").step("a")).unwrap();
    app.initialize().await.unwrap();
    let producer = common::Login::create(&pool, "cairn_producer", "flowprod").await;
    let run: Uuid = sqlx::query_scalar("select cairn.start_flow('simple', '{}')")
        .fetch_one(&producer.pool)
        .await
        .unwrap();
    let planned = sqlx::query("select * from cairn.plan_flow('simple')")
        .fetch_all(&producer.pool)
        .await
        .unwrap();
    assert_eq!(planned.len(), 1);
    let err = sqlx::query(r#"select cairn.create_flow('x', '{"steps": [{"name": "a"}]}')"#)
        .execute(&producer.pool)
        .await
        .unwrap_err();
    assert_eq!(common::sqlstate(&err).as_deref(), Some("42501"));
    // Nothing a producer sends moves the run: its step job is the engine's.
    for sql in [
        "select cairn.register_step_handler('evil')",
        "select * from cairn.ack_and_take('{1}', '{1}', null, 30, 1, '{workflows}', '{a}')",
    ] {
        let err = sqlx::query(sql).execute(&producer.pool).await.unwrap_err();
        assert_eq!(common::sqlstate(&err).as_deref(), Some("42501"), "{sql}");
    }
    producer.drop(&pool).await;
    let (stop, worker) = spawn_worker(&app, 2);
    result(&app, run).await;
    stop.cancel();
    worker.await.unwrap();
}

/// The child worker of the kill test: runs the `work` handler, recording
/// every execution (run, step, job, attempt) in the database.
#[test]
#[ignore = "a child process of worker_killed_mid_flow"]
fn child_flow_worker() {
    let Some((_mode, url)) = common::child_mode() else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let app = common::builder(&url)
            .max_connections(6)
            .build()
            .await
            .unwrap();
        let pool = common::direct_pool(&app);
        app.step_handler("work", move |input: Value, ctx| {
            let pool = pool.clone();
            async move {
                sqlx::query(
                    "insert into effects (run, step, job, attempt) values ($1, $2, $3, $4)",
                )
                .bind(ctx.parent_run())
                .bind(input["step"].as_str())
                .bind(ctx.id())
                .bind(ctx.attempt() as i32)
                .execute(&pool)
                .await
                .map_err(HandlerError::retryable)?;
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(json!(input["step"]))
            }
        })
        .unwrap();
        app.worker()
            .queues(["workflows"])
            .concurrency(8)
            .lease(Duration::from_secs(2))
            .run()
            .await
            .unwrap();
    });
}

#[sqlx::test(migrations = false)]
async fn worker_killed_mid_flow_the_runs_finish_and_completed_steps_never_run_again(pool: PgPool) {
    let app = common::app(&pool).await;
    sqlx::raw_sql(
        "create table effects (run uuid, step text, job bigint, attempt integer, \
                               at timestamptz not null default clock_timestamp()); \
         select cairn.register_step_handler('work');
         select cairn.create_flow('three', '{\"steps\": [
             {\"name\": \"one\", \"handler\": \"work\", \"input\": {\"step\": \"\\\"one\\\"\"}},
             {\"name\": \"two\", \"handler\": \"work\", \"after\": [\"one\"], \"input\": {\"step\": \"\\\"two\\\"\"}},
             {\"name\": \"three\", \"handler\": \"work\", \"after\": [\"two\"], \"input\": {\"step\": \"\\\"three\\\"\"}}]}')",
    )
    .execute(&pool)
    .await
    .unwrap();
    const RUNS: i64 = 150;
    for i in 0..RUNS {
        app.start_flow("three", &json!({"i": i})).await.unwrap();
    }
    let url = common::url_of(&pool);
    let mut workers: Vec<_> = (0..2)
        .map(|_| common::spawn_child("child_flow_worker", "work", &url, &[]))
        .collect();
    common::wait_for("a third of the steps", Duration::from_secs(60), || async {
        common::scalar_i64(
            &pool,
            "select count(*) from cairn.steps where status = 'completed'",
        )
        .await
            >= RUNS
    })
    .await;
    let killed = Command::new("kill")
        .args(["-KILL", &workers[0].id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    workers[0].wait().unwrap();
    common::wait_for(
        "every run to complete",
        Duration::from_secs(120),
        || async {
            common::scalar_i64(
                &pool,
                "select count(*) from cairn.runs where status = 'completed'",
            )
            .await
                == RUNS
        },
    )
    .await;
    drop(workers);

    let completed = common::scalar_i64(
        &pool,
        "select count(*) from cairn.steps where status = 'completed'",
    )
    .await;
    assert_eq!(completed, 3 * RUNS);
    // Every step ran from one job only: a completed step never got another.
    let jobs_per_step = common::scalar_i64(
        &pool,
        "select coalesce(max(n), 0) from (select count(distinct job) n from effects group by run, step) x",
    )
    .await;
    assert_eq!(jobs_per_step, 1);
    let executed =
        common::scalar_i64(&pool, "select count(distinct (run, step)) from effects").await;
    assert_eq!(executed, 3 * RUNS);
    // What ran twice was held by the killed worker and had not completed:
    // no execution began after its step was recorded completed.
    let after_done = common::scalar_i64(
        &pool,
        "select count(*) from effects e join cairn.steps s on s.run_id = e.run and s.key = e.step \
          where e.at > s.finished_at",
    )
    .await;
    assert_eq!(after_done, 0, "a completed step ran again");
    assert_eq!(
        common::scalar_i64(&pool, "select count(*) from cairn.jobs").await,
        0
    );
}
