//! Crash-resume with real processes: a worker process running a 5-step
//! workflow is SIGKILLed in the middle of each step and right after each
//! step's checkpoint; a new worker finishes every run. Counted in the
//! database: a step whose checkpoint was written never runs again, the
//! interrupted step runs again, and every output equals a crash-free run's.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use cairn::{App, WorkflowContext};
use sqlx::PgPool;

const STEPS: usize = 5;

/// Five steps; each records its execution, then takes 150 ms.
fn register(app: &App) {
    let db = common::direct_pool(app);
    app.workflow("five", move |ctx: WorkflowContext, input: String| {
        let db = db.clone();
        async move {
            let mut acc = input;
            for i in 1..=STEPS {
                let (d, run) = (db.clone(), ctx.run_id());
                acc = ctx
                    .step(&format!("s{i}"), acc, move |acc: String| async move {
                        sqlx::query("insert into effects (run, step, pid) values ($1, $2, $3)")
                            .bind(run)
                            .bind(i as i32)
                            .bind(std::process::id() as i32)
                            .execute(&d)
                            .await?;
                        tokio::time::sleep(Duration::from_millis(150)).await;
                        Ok(format!("{acc}-s{i}"))
                    })
                    .await?;
            }
            Ok(acc)
        }
    })
    .unwrap();
}

/// Child entry: a worker serving the queue CAIRN_QUEUE, lease 1 s.
#[test]
#[ignore = "run as a child process by the tests in this file"]
fn child_workflow_worker() {
    let Some((_, url)) = common::child_mode() else {
        return;
    };
    let queue = std::env::var("CAIRN_QUEUE").unwrap();
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let app = common::builder(&url)
            .max_connections(4)
            .build()
            .await
            .unwrap();
        register(&app);
        app.worker()
            .queues([queue])
            .lease(Duration::from_secs(1))
            .run()
            .await
            .unwrap();
    });
}

async fn effects(pool: &PgPool, run: cairn::Uuid, step: i32) -> i64 {
    sqlx::query_scalar("select count(*) from effects where run = $1 and step = $2")
        .bind(run)
        .bind(step)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn completed_steps(pool: &PgPool, run: cairn::Uuid) -> HashSet<i32> {
    let keys: Vec<String> = sqlx::query_scalar(
        "select key from cairn.steps where run_id = $1 and status = 'completed'",
    )
    .bind(run)
    .fetch_all(pool)
    .await
    .unwrap();
    keys.iter()
        .map(|k| {
            k.trim_start_matches('s')
                .trim_end_matches("#1")
                .parse()
                .unwrap()
        })
        .collect()
}

#[sqlx::test(migrations = false)]
async fn sigkill_mid_step_and_at_step_boundaries_then_resume(pool: PgPool) {
    let app = common::app(&pool).await;
    sqlx::query("create table effects (run uuid, step int, pid int, at timestamptz default clock_timestamp())")
        .execute(&pool)
        .await
        .unwrap();
    register(&app);
    app.create_queue("workflows").await.unwrap();
    sqlx::query("select cairn.register_workflow('five', 'workflows')")
        .execute(&pool)
        .await
        .unwrap();
    let url = common::url_of(&pool);

    // (run, step it was killed at, mid-step or just after the checkpoint,
    //  checkpoints written before the kill)
    let mut scenarios = Vec::new();
    for step in 1..=STEPS as i32 {
        for mid in [true, false] {
            let queue = format!("crash_{step}_{}", if mid { "mid" } else { "after" });
            app.create_queue(&queue).await.unwrap();
            let run = app
                .start("five", &"in".to_string())
                .queue(&queue)
                .await
                .unwrap();
            let mut child = common::spawn_child(
                "child_workflow_worker",
                "worker",
                &url,
                &[("CAIRN_QUEUE", queue.clone())],
            );
            if mid {
                common::wait_for("the step to start", Duration::from_secs(30), || async {
                    effects(&pool, run, step).await == 1
                })
                .await;
            } else {
                common::wait_for("the step's checkpoint", Duration::from_secs(30), || async {
                    completed_steps(&pool, run).await.contains(&step)
                })
                .await;
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            let done_before = completed_steps(&pool, run).await;
            scenarios.push((run, queue, step, mid, done_before));
        }
    }
    let reference = app.start("five", &"in".to_string()).await.unwrap();

    // A new worker (this process) picks every run up once its lease expires.
    let mut queues: Vec<String> = scenarios.iter().map(|s| s.1.clone()).collect();
    queues.push("workflows".into());
    let stop = tokio_util::sync::CancellationToken::new();
    let worker = tokio::spawn(
        app.worker()
            .queues(queues)
            .concurrency(16)
            .lease(Duration::from_secs(1))
            .poll_interval(Duration::from_millis(100))
            .run_until(stop.clone().cancelled_owned()),
    );
    let expected: String = app.result(reference).await.unwrap();
    assert_eq!(expected, "in-s1-s2-s3-s4-s5");
    for (run, queue, step, mid, done_before) in &scenarios {
        let out: String = app.result(*run).await.unwrap();
        assert_eq!(&out, &expected, "{queue}: same output as a crash-free run");
        for s in 1..=STEPS as i32 {
            let n = effects(&pool, *run, s).await;
            if done_before.contains(&s) {
                assert_eq!(
                    n, 1,
                    "{queue}: step {s} was checkpointed before the kill and must not run again"
                );
            } else {
                assert!(n >= 1, "{queue}: step {s} ran");
            }
        }
        if *mid {
            assert!(!done_before.contains(step));
            assert_eq!(
                effects(&pool, *run, *step).await,
                2,
                "{queue}: the interrupted step ran again"
            );
        } else {
            assert!(done_before.contains(step));
        }
    }
    stop.cancel();
    worker.await.unwrap().unwrap();
}
