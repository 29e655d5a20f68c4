//! One execution of a run: load its checkpoints, replay the workflow
//! function from the start, and write back how this execution ended —
//! completed, failed, or parked until its wait ends.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use sqlx::PgPool;

use super::context::{Halt, Recorded, WorkflowContext};
use super::{WorkflowDef, WorkflowOptions};
use crate::db::{self, RunLease};
use crate::error::panic_message;
use crate::plugin::{FailureInfo, Plugins, RunOutcome, WorkflowEvent};

/// How one execution of a run ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    Completed,
    /// The run failed, with this error.
    Failed(String),
    Suspended,
    /// Lease lost or database unreachable: nothing written; the run will be
    /// picked up again when its lease runs out.
    Abandoned,
}

/// Replays the run that `job` drives, from its checkpoints, and writes back
/// how it ended: completed, failed, or parked until its wait ends.
pub(crate) async fn execute(
    pool: PgPool,
    workflow: Arc<WorkflowDef>,
    name: String,
    queue: String,
    plugins: Plugins,
    claimed: &db::ClaimedJob,
) -> Settled {
    let (job, lease) = (claimed.id, claimed.lease);
    let run = match serde_json::from_str::<serde_json::Value>(&claimed.payload)
        .ok()
        .and_then(|v| v["run_id"].as_str().and_then(|s| s.parse().ok()))
    {
        Some(run) => run,
        None => {
            tracing::error!(job, "a workflow job without a run id; dead-lettering it");
            let _ = db::fail(
                &pool,
                job,
                lease,
                "not a workflow job: no run_id in the payload",
            )
            .await;
            return Settled::Failed("not a workflow job".into());
        }
    };
    let at = RunLease { run, job, lease };
    let loaded = match db::load_run(&pool, at).await {
        Ok(Some(l)) => l,
        Ok(None) => return Settled::Abandoned,
        Err(e) => {
            tracing::warn!(%run, error = %e, "cannot load run; it will be retried");
            return Settled::Abandoned;
        }
    };
    if matches!(loaded.status.as_str(), "completed" | "failed" | "cancelled") {
        let _ = db::ack(&pool, &[job], &[lease]).await;
        return Settled::Abandoned;
    }
    let mut event = WorkflowEvent {
        run_id: run,
        workflow: name.clone(),
        queue,
        started: SystemTime::now(),
        elapsed: Duration::ZERO,
        run_created: loaded.created_at.into(),
        traceparent: loaded.traceparent.clone(),
    };
    plugins.each("before_workflow", |p| p.before_workflow(&event));
    let clock = Instant::now();
    let settled = replay(pool, workflow, name, at, loaded, plugins.clone()).await;
    event.elapsed = clock.elapsed();
    match &settled {
        Settled::Completed => plugins.each("after_workflow", |p| {
            p.after_workflow(&event, RunOutcome::Completed)
        }),
        Settled::Suspended => plugins.each("after_workflow", |p| {
            p.after_workflow(&event, RunOutcome::Suspended)
        }),
        Settled::Abandoned => plugins.each("after_workflow", |p| {
            p.after_workflow(&event, RunOutcome::Abandoned)
        }),
        Settled::Failed(message) => {
            let info = FailureInfo {
                message: message.clone(),
                will_retry: false,
            };
            plugins.each("on_workflow_error", |p| p.on_workflow_error(&event, &info))
        }
    }
    settled
}

/// Replays a loaded run and writes back how this execution ended.
async fn replay(
    pool: PgPool,
    workflow: Arc<WorkflowDef>,
    name: String,
    at: RunLease,
    loaded: db::LoadedRun,
    plugins: Plugins,
) -> Settled {
    let run = at.run;
    let recorded: Vec<Recorded> = match serde_json::from_str(&loaded.steps) {
        Ok(r) => r,
        Err(e) => return fail(&pool, at, &format!("unreadable checkpoints: {e}")).await,
    };
    // The deadline, if the workflow has a maximum duration, on the
    // database clock; `left` is how much of it remains.
    let deadline = workflow
        .options
        .max_duration
        .map(|max| loaded.created_at + max);
    let left = deadline.map(|d| (d - loaded.db_now).to_std().unwrap_or(Duration::ZERO));
    if left == Some(Duration::ZERO) {
        return fail(&pool, at, &overdue(&workflow.options)).await;
    }
    let ctx = WorkflowContext::new(
        pool.clone(),
        at,
        name,
        &loaded,
        recorded,
        &workflow.options,
        plugins,
    );
    let body = AssertUnwindSafe((workflow.run)(ctx.clone(), loaded.input)).catch_unwind();
    tokio::pin!(body);
    let overrun = async {
        match left {
            Some(left) => tokio::time::sleep(left).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = overrun => fail(&pool, at, &overdue(&workflow.options)).await,
        result = &mut body => {
            // The function returned although a replay check failed (it
            // caught the step's error): the failure stands.
            if let Some(Halt::Fail(m)) = ctx.take_halt() {
                return fail(&pool, at, &m).await;
            }
            match result {
                Ok(Ok(output)) => match db::complete_run(&pool, at, &output).await {
                    Ok(true) => Settled::Completed,
                    Ok(false) => Settled::Abandoned,
                    Err(e) => {
                        tracing::warn!(%run, error = %e, "cannot record the run's output; it will replay");
                        Settled::Abandoned
                    }
                },
                Ok(Err(e)) => fail(&pool, at, &e.to_string()).await,
                Err(panic) => {
                    let m = format!("workflow panicked: {}", panic_message(panic));
                    fail(&pool, at, &m).await
                }
            }
        }
        _ = ctx.halted_and_idle() => {
            match ctx.take_halt() {
                Some(Halt::Suspend { wake_at, waiting }) => {
                    let status = if waiting { "waiting" } else { "sleeping" };
                    // Wake at the deadline at the latest, to be failed then.
                    let wake_at = match (wake_at, deadline) {
                        (Some(w), Some(d)) => Some(w.min(d)),
                        (w, d) => w.or(d),
                    };
                    match db::suspend_run(&pool, at, wake_at, status).await {
                        Ok(true) => Settled::Suspended,
                        Ok(false) => Settled::Abandoned,
                        Err(e) => {
                            tracing::warn!(%run, error = %e, "cannot park the run; it will replay");
                            Settled::Abandoned
                        }
                    }
                }
                Some(Halt::Fail(m)) => fail(&pool, at, &m).await,
                Some(Halt::Abandon(reason)) => {
                    tracing::warn!(%run, %reason, "run abandoned; it replays once the lease runs out");
                    Settled::Abandoned
                }
                None => Settled::Abandoned,
            }
        }
    }
}

async fn fail(pool: &PgPool, at: RunLease, error: &str) -> Settled {
    match db::fail_run(pool, at, error).await {
        Ok(true) => {
            tracing::warn!(run = %at.run, error, "run failed");
            Settled::Failed(error.to_owned())
        }
        Ok(false) => Settled::Abandoned,
        Err(e) => {
            tracing::warn!(run = %at.run, error = %e, "cannot record the run's failure");
            Settled::Abandoned
        }
    }
}

fn overdue(options: &WorkflowOptions) -> String {
    format!(
        "the run exceeded its maximum duration of {:?}",
        options.max_duration.unwrap_or_default()
    )
}
