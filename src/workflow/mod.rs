//! Durable workflows: registration, the replaying executor, and run handles.

mod context;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::PgPool;

pub use context::{Step, StepError, WorkflowContext};

use crate::db::{self, RunLease};
use crate::error::HandlerError;
use crate::task::BoxFuture;
use context::{Halt, Recorded};

/// The queue a workflow's runs go to unless a start names another.
pub const WORKFLOW_QUEUE: &str = "workflows";

/// A workflow function with its types erased: JSON input in, JSON output out.
pub(crate) type ErasedWorkflow = dyn Fn(WorkflowContext, String) -> BoxFuture<'static, Result<String, HandlerError>>
    + Send
    + Sync;

pub(crate) fn erase<I, O, F, Fut>(name: &str, f: F) -> Arc<ErasedWorkflow>
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(WorkflowContext, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
{
    let f = Arc::new(f);
    let name = name.to_owned();
    Arc::new(move |ctx: WorkflowContext, input: String| {
        let f = Arc::clone(&f);
        let name = name.clone();
        Box::pin(async move {
            let input: I = serde_json::from_str(&input).map_err(|e| {
                HandlerError::fatal(format!(
                    "input of workflow {name} does not deserialize into {}: {e}",
                    std::any::type_name::<I>()
                ))
            })?;
            let output = f(ctx, input).await?;
            serde_json::to_string(&output)
                .map_err(|e| HandlerError::fatal(format!("cannot serialize the output: {e}")))
        }) as BoxFuture<'static, _>
    })
}

/// How one execution of a run ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    Completed,
    Failed,
    Suspended,
    /// Lease lost or database unreachable: nothing written; the run will be
    /// picked up again when its lease runs out.
    Abandoned,
}

/// Replays the run that `job` drives, from its checkpoints, and writes back
/// how it ended: completed, failed, or parked until its wait ends.
pub(crate) async fn execute(
    pool: PgPool,
    workflow: Arc<ErasedWorkflow>,
    name: String,
    job: i64,
    lease: i64,
    payload: &str,
) -> Settled {
    let run = match serde_json::from_str::<serde_json::Value>(payload)
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
            return Settled::Failed;
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
    let recorded: Vec<Recorded> = match serde_json::from_str(&loaded.steps) {
        Ok(r) => r,
        Err(e) => return fail(&pool, at, &format!("unreadable checkpoints: {e}")).await,
    };
    let ctx = WorkflowContext::new(pool.clone(), at, name, loaded.db_now, recorded);
    let body = AssertUnwindSafe(workflow(ctx.clone(), loaded.input)).catch_unwind();
    tokio::pin!(body);
    tokio::select! {
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
                    let m = format!("workflow panicked: {}", crate::worker::panic_message(panic));
                    fail(&pool, at, &m).await
                }
            }
        }
        _ = ctx.halted_and_idle() => {
            match ctx.take_halt() {
                Some(Halt::Suspend { wake_at, waiting }) => {
                    let status = if waiting { "waiting" } else { "sleeping" };
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
            Settled::Failed
        }
        Ok(false) => Settled::Abandoned,
        Err(e) => {
            tracing::warn!(run = %at.run, error = %e, "cannot record the run's failure");
            Settled::Abandoned
        }
    }
}
