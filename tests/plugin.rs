//! Plugin hooks: order, fields, replays not reported, and isolation of a
//! plugin that panics in every hook.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn::{
    App, Backoff, FailureInfo, HandlerError, Plugin, RetryPolicy, RunOutcome, StepEvent, Task,
    TaskEvent, WorkflowContext, WorkflowEvent,
};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Writes one line per hook into a shared log, tagged with its name.
struct Recorder {
    tag: &'static str,
    log: Arc<Mutex<Vec<String>>>,
}

impl Recorder {
    fn push(&self, line: String) {
        self.log
            .lock()
            .unwrap()
            .push(format!("{} {line}", self.tag));
    }
}

impl Plugin for Recorder {
    fn before_workflow(&self, e: &WorkflowEvent) {
        self.push(format!("before_workflow {} {}", e.workflow, e.queue));
    }
    fn after_workflow(&self, e: &WorkflowEvent, outcome: RunOutcome) {
        self.push(format!("after_workflow {} {outcome:?}", e.workflow));
    }
    fn on_workflow_error(&self, e: &WorkflowEvent, err: &FailureInfo) {
        self.push(format!("on_workflow_error {} {}", e.workflow, err.message));
    }
    fn before_step(&self, e: &StepEvent) {
        self.push(format!("before_step {} {}", e.step, e.attempt));
    }
    fn after_step(&self, e: &StepEvent) {
        self.push(format!("after_step {} {}", e.step, e.attempt));
    }
    fn on_step_error(&self, e: &StepEvent, err: &FailureInfo) {
        self.push(format!(
            "on_step_error {} {} retry={} {}",
            e.step, e.attempt, err.will_retry, err.message
        ));
    }
    fn before_task(&self, e: &TaskEvent) {
        self.push(format!("before_task {} {} {}", e.task, e.queue, e.attempt));
    }
    fn after_task(&self, e: &TaskEvent) {
        self.push(format!("after_task {} {}", e.task, e.attempt));
    }
    fn on_task_error(&self, e: &TaskEvent, err: &FailureInfo) {
        self.push(format!(
            "on_task_error {} {} retry={} {}",
            e.task, e.attempt, err.will_retry, err.message
        ));
    }
}

/// Panics in every hook.
struct Saboteur;

impl Plugin for Saboteur {
    fn before_workflow(&self, _: &WorkflowEvent) {
        panic!("before_workflow")
    }
    fn after_workflow(&self, _: &WorkflowEvent, _: RunOutcome) {
        panic!("after_workflow")
    }
    fn on_workflow_error(&self, _: &WorkflowEvent, _: &FailureInfo) {
        panic!("on_workflow_error")
    }
    fn before_step(&self, _: &StepEvent) {
        panic!("before_step")
    }
    fn after_step(&self, _: &StepEvent) {
        panic!("after_step")
    }
    fn on_step_error(&self, _: &StepEvent, _: &FailureInfo) {
        panic!("on_step_error")
    }
    fn before_task(&self, _: &TaskEvent) {
        panic!("before_task")
    }
    fn after_task(&self, _: &TaskEvent) {
        panic!("after_task")
    }
    fn on_task_error(&self, _: &TaskEvent, _: &FailureInfo) {
        panic!("on_task_error")
    }
}

#[derive(Serialize, Deserialize)]
struct Ping {
    fail: bool,
}
impl Task for Ping {
    const QUEUE: &'static str = "pings";
    type Output = ();
    fn retry_policy() -> RetryPolicy {
        RetryPolicy::default().max_attempts(1)
    }
}

async fn setup(pool: &PgPool, log: &Arc<Mutex<Vec<String>>>) -> App {
    let app = common::app(pool).await;
    app.plugin(Saboteur);
    app.plugin(Recorder {
        tag: "A",
        log: Arc::clone(log),
    });
    app.plugin(Recorder {
        tag: "B",
        log: Arc::clone(log),
    });
    app.workflow("flow", |ctx: WorkflowContext, _: ()| async move {
        ctx.step("first", (), |_| async { Ok::<_, HandlerError>(()) })
            .await?;
        let n: u32 = ctx
            .step("once", (), |_| async {
                static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                if CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    Err(HandlerError::retryable("first try fails"))
                } else {
                    Ok(7)
                }
            })
            .retry(
                RetryPolicy::default()
                    .backoff(Backoff::Fixed(Duration::from_millis(20)))
                    .jitter(0.0),
            )
            .await?;
        Ok(n)
    })
    .unwrap();
    app.workflow("doomed", |_ctx: WorkflowContext, _: ()| async move {
        Err::<(), _>(HandlerError::fatal("no way"))
    })
    .unwrap();
    app.task(|p: Ping, _ctx| async move {
        if p.fail {
            Err(HandlerError::fatal("ping failed"))
        } else {
            Ok(())
        }
    })
    .unwrap();
    app
}

#[sqlx::test(migrations = false)]
async fn hooks_run_in_order_skip_replays_and_survive_a_panicking_plugin(pool: PgPool) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let app = setup(&pool, &log).await;
    let stop = CancellationToken::new();
    let worker = tokio::spawn(
        app.worker()
            .queues(["workflows", "pings"])
            .poll_interval(Duration::from_millis(20))
            .run_until(stop.clone().cancelled_owned()),
    );
    common::wait_for("registration", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.workflows").await == 2
    })
    .await;

    // Every run and task completes although the first plugin panics in
    // every hook.
    let run = app.start("flow", &()).await.unwrap();
    assert_eq!(app.result::<u32>(run).await.unwrap(), 7);
    let doomed = app.start("doomed", &()).await.unwrap();
    assert!(app.result::<()>(doomed).await.is_err());
    // One at a time, so that their hooks do not interleave in the log.
    app.enqueue(&Ping { fail: false }).await.unwrap();
    common::wait_for("the first ping", Duration::from_secs(10), || async {
        common::scalar_i64(&pool, "select count(*) from cairn.jobs").await == 0
    })
    .await;
    app.enqueue(&Ping { fail: true }).await.unwrap();
    common::wait_for("the second ping", Duration::from_secs(10), || async {
        app.metrics("pings").await.unwrap().dead == 1
    })
    .await;
    stop.cancel();
    worker.await.unwrap().unwrap();

    let log = log.lock().unwrap().clone();
    let of = |tag: &str, pat: &str| -> Vec<String> {
        log.iter()
            .filter(|l| l.starts_with(tag) && l.contains(pat))
            .map(|l| l[2..].to_string())
            .collect()
    };
    // Plugins run in registration order: each A line comes right before its B twin.
    for pair in log.chunks(2) {
        assert_eq!(
            pair[0].replacen("A ", "", 1),
            pair[1].replacen("B ", "", 1),
            "{log:#?}"
        );
    }
    let flow: Vec<String> = log
        .iter()
        .filter(|l| l.starts_with("A ") && (l.contains(" flow") || l.contains("#1")))
        .map(|l| l[2..].to_string())
        .collect();
    assert_eq!(
        flow,
        [
            "before_workflow flow workflows",
            "before_step first#1 1",
            "after_step first#1 1",
            "before_step once#1 1",
            "on_step_error once#1 1 retry=true first try fails",
            "after_workflow flow Suspended",
            // The replay: first#1 is not reported again.
            "before_workflow flow workflows",
            "before_step once#1 2",
            "after_step once#1 2",
            "after_workflow flow Completed",
        ]
    );
    assert_eq!(
        of("A", "doomed"),
        [
            "before_workflow doomed workflows",
            "on_workflow_error doomed no way"
        ]
    );
    assert_eq!(
        of("A", "_task"),
        [
            "before_task pings pings 1",
            "after_task pings 1",
            "before_task pings pings 1",
            "on_task_error pings 1 retry=false ping failed",
        ]
    );
}
