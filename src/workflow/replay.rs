//! One execution of a run: load its checkpoints, replay the workflow
//! function from the start, and write back how this execution ended —
//! completed, failed, or parked until its wait ends.
//!
//! While the function runs, the outcomes of finished steps ride on its next
//! durable call. When the function cannot go on by itself (it waits on a
//! step still running in a concurrent branch, or on something that is not a
//! durable call), the outbox is flushed at once with `cairn.record_steps`.
//! Handlers run inside the function's future, so after each poll the replay
//! knows exactly what is pending.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use crate::pooler::Db;
use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

use super::batch::Calls;
use super::checkpoint::Outbox;
use super::context::{Halt, Loaded, WorkflowContext};
use super::{WorkflowDef, WorkflowOptions};
use crate::BoxFuture;
use crate::db::{self, CompleteCall, RunLease};
use crate::error::{HandlerError, panic_message};
use crate::json;
use crate::plugin::{Attempt, FailureInfo, Plugins, RunOutcome, WorkflowEvent};
use crate::trace::AttemptContext;

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
    /// The job was not the run's job (sent by hand); it was dead-lettered.
    Refused(String),
}

/// What a worker needs to execute a run's job.
pub(crate) struct Execution {
    pub pool: Db,
    /// The worker's batched calls, shared by its executions.
    pub calls: Calls,
    pub workflow: Arc<WorkflowDef>,
    pub name: String,
    pub queue: String,
    pub plugins: Plugins,
    pub at: RunLease,
    pub cancel: CancellationToken,
}

/// Replays the run that the job drives, from its checkpoints, and writes
/// back how this execution ended.
pub(crate) async fn execute(x: Execution) -> Settled {
    let loaded = match x.calls.load_run(x.at).await {
        Ok(Some(l)) => l,
        Ok(None) => return Settled::Abandoned,
        Err(e) => {
            tracing::warn!(run = %x.at.run, error = %e, "cannot load run; it will be retried");
            return Settled::Abandoned;
        }
    };
    if let Some(reason) = loaded.refused {
        tracing::warn!(run = %x.at.run, job = x.at.job, %reason, "job refused and dead-lettered");
        return Settled::Refused(reason);
    }
    let mut event = WorkflowEvent {
        run_id: x.at.run,
        workflow: x.name.clone(),
        queue: x.queue.clone(),
        started: SystemTime::now(),
        elapsed: Duration::ZERO,
        run_created: loaded.created_at.into(),
        traceparent: loaded.traceparent.clone(),
    };
    let plugins = x.plugins.clone();
    plugins.each("before_workflow", |p| p.before_workflow(&event));
    let attempt_cx = AttemptContext::of(&plugins, Attempt::Workflow(&event));
    let clock = Instant::now();
    let span = tracing::info_span!(
        target: "cairn::attempt",
        "cairn.run",
        cairn.run_id = %x.at.run,
        cairn.workflow = %x.name
    );
    let settled = tracing::Instrument::instrument(attempt_cx.wrap(replay(x, loaded)), span).await;
    event.elapsed = clock.elapsed();
    attempt_cx.enter(|| match &settled {
        Settled::Completed => plugins.each("after_workflow", |p| {
            p.after_workflow(&event, RunOutcome::Completed)
        }),
        Settled::Suspended => plugins.each("after_workflow", |p| {
            p.after_workflow(&event, RunOutcome::Suspended)
        }),
        Settled::Abandoned | Settled::Refused(_) => plugins.each("after_workflow", |p| {
            p.after_workflow(&event, RunOutcome::Abandoned)
        }),
        Settled::Failed(message) => {
            let info = FailureInfo {
                message: message.clone(),
                will_retry: false,
            };
            plugins.each("on_workflow_error", |p| p.on_workflow_error(&event, &info))
        }
    });
    settled
}

/// How the function's execution stopped.
enum Stop {
    Returned(std::thread::Result<Result<String, HandlerError>>),
    Overrun,
    Halted,
}

/// Replays a loaded run and writes back how this execution ended.
async fn replay(x: Execution, loaded: db::LoadedRun) -> Settled {
    let at = x.at;
    // The deadline, if the workflow has a maximum duration, on the
    // database clock; `left` is how much of it remains.
    let deadline = x
        .workflow
        .options
        .max_duration
        .map(|max| loaded.created_at + max);
    let left = deadline.map(|d| (d - loaded.db_now).to_std().unwrap_or(Duration::ZERO));
    if left == Some(Duration::ZERO) {
        return fail(
            &x.pool,
            at,
            &Outbox::default(),
            &overdue(&x.workflow.options),
        )
        .await;
    }
    let ctx = WorkflowContext::new(
        x.pool.clone(),
        x.calls.clone(),
        at,
        Loaded {
            workflow: x.name.clone(),
            db_now: loaded.db_now,
            traceparent: loaded.traceparent,
            recorded: loaded.steps,
        },
        &x.workflow.options,
        x.plugins.clone(),
        x.cancel.clone(),
    );
    let stop = {
        let mut body =
            pin!(AssertUnwindSafe((x.workflow.run)(ctx.clone(), loaded.input)).catch_unwind());
        let mut overrun = pin!(async {
            match left {
                Some(left) => tokio::time::sleep(left).await,
                None => std::future::pending().await,
            }
        });
        let mut flush: Option<BoxFuture<'_, ()>> = None;
        std::future::poll_fn(|cx| {
            ctx.register_replay(cx.waker());
            if let Poll::Ready(result) = body.as_mut().poll(cx) {
                return Poll::Ready(Stop::Returned(result));
            }
            if overrun.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Stop::Overrun);
            }
            // The function waits: write the outcomes no call is about to carry.
            loop {
                if let Some(f) = flush.as_mut() {
                    if f.as_mut().poll(cx).is_pending() {
                        break;
                    }
                    flush = None;
                }
                if ctx.inner.outbox.is_empty() || ctx.halted_and_idle() {
                    break;
                }
                flush = Some(Box::pin(record_steps(&ctx)));
            }
            if flush.is_none() && ctx.halted_and_idle() {
                return Poll::Ready(Stop::Halted);
            }
            Poll::Pending
        })
        .await
    };
    let outbox = &ctx.inner.outbox;
    match stop {
        Stop::Overrun => fail(&x.pool, at, outbox, &overdue(&x.workflow.options)).await,
        Stop::Returned(result) => {
            // The function returned although a durable call halted (it
            // caught the error, or a select! dropped the branch).
            match ctx.take_halt() {
                Some(Halt::Fail(m)) => return fail(&x.pool, at, outbox, &m).await,
                Some(Halt::Replay) => {
                    return suspend(&x.pool, at, outbox, None, Some(Duration::ZERO), false).await;
                }
                Some(Halt::Abandon(_)) => return Settled::Abandoned,
                Some(Halt::Suspend { .. }) | None => {}
            }
            match result {
                Ok(Ok(output)) => complete(&x.pool, &x.calls, at, outbox, output).await,
                Ok(Err(e)) => fail(&x.pool, at, outbox, &e.to_string()).await,
                Err(panic) => {
                    let m = format!("workflow panicked: {}", panic_message(panic));
                    fail(&x.pool, at, outbox, &m).await
                }
            }
        }
        Stop::Halted => match ctx.take_halt() {
            Some(Halt::Suspend {
                wake_at,
                retry_in,
                waiting,
            }) => {
                // Wake at the deadline at the latest, to be failed then.
                let wake_at = match (wake_at, deadline) {
                    (Some(w), Some(d)) => Some(w.min(d)),
                    (w, d) => w.or(d),
                };
                suspend(&x.pool, at, outbox, wake_at, retry_in, waiting).await
            }
            Some(Halt::Replay) => {
                suspend(&x.pool, at, outbox, None, Some(Duration::ZERO), false).await
            }
            Some(Halt::Fail(m)) => fail(&x.pool, at, outbox, &m).await,
            Some(Halt::Abandon(reason)) => {
                tracing::warn!(run = %at.run, %reason, "run abandoned; it replays once the lease runs out");
                Settled::Abandoned
            }
            None => Settled::Abandoned,
        },
    }
}

/// Flushes the outbox on its own (`cairn.record_steps`). Unlike a durable
/// call it always resolves: a lost lease or a conflict halts the execution.
async fn record_steps(ctx: &WorkflowContext) {
    let (pool, at) = (&ctx.inner.pool, ctx.inner.at);
    let carried = ctx.inner.outbox.carry().await;
    let written = db::record_steps(pool, at, &carried.done).await;
    drop(carried);
    match written {
        Ok(true) => {}
        Ok(false) => ctx.halt_now(Halt::Abandon(
            "lease lost while recording finished steps".into(),
        )),
        Err(e) if e.is_replay_conflict() => ctx.halt_now(Halt::Replay),
        Err(e) => ctx.halt_now(Halt::Abandon(format!("recording finished steps: {e}"))),
    }
}

async fn complete(
    pool: &Db,
    calls: &Calls,
    at: RunLease,
    outbox: &Outbox,
    output: String,
) -> Settled {
    if let Some(problem) = json::problem(&output) {
        return fail(pool, at, outbox, &format!("the run's output {problem}")).await;
    }
    let carried = outbox.carry().await;
    let call = CompleteCall {
        at,
        done: carried.done.clone(),
        output,
    };
    match calls.complete_run(call).await {
        Ok(Some(true)) => Settled::Completed,
        Ok(Some(false)) => Settled::Failed("the run's output broke the JSON limits".into()),
        Ok(None) => Settled::Abandoned,
        Err(e) if e.is_replay_conflict() => {
            drop(carried);
            suspend(pool, at, outbox, None, Some(Duration::ZERO), false).await
        }
        Err(e) => {
            tracing::warn!(run = %at.run, error = %e, "cannot record the run's output; it will replay");
            Settled::Abandoned
        }
    }
}

async fn suspend(
    pool: &Db,
    at: RunLease,
    outbox: &Outbox,
    wake_at: Option<chrono::DateTime<chrono::Utc>>,
    retry_in: Option<Duration>,
    waiting: bool,
) -> Settled {
    let status = if waiting { "waiting" } else { "sleeping" };
    let carried = outbox.carry().await;
    match db::suspend_run(pool, at, &carried.done, wake_at, retry_in, status).await {
        Ok(true) => Settled::Suspended,
        Ok(false) => Settled::Abandoned,
        Err(e) if e.is_replay_conflict() => {
            // The outcomes it carried were refused with the call: park for
            // no time without them, and replay from the record.
            drop(carried);
            match db::suspend_run(pool, at, "[]", None, Some(Duration::ZERO), "sleeping").await {
                Ok(true) => Settled::Suspended,
                _ => Settled::Abandoned,
            }
        }
        Err(e) => {
            tracing::warn!(run = %at.run, error = %e, "cannot park the run; it will replay");
            Settled::Abandoned
        }
    }
}

async fn fail(pool: &Db, at: RunLease, outbox: &Outbox, error: &str) -> Settled {
    let carried = outbox.carry().await;
    let mut done = carried.done.clone();
    loop {
        match db::fail_run(pool, at, &done, error).await {
            Ok(true) => {
                tracing::warn!(run = %at.run, error, "run failed");
                return Settled::Failed(error.to_owned());
            }
            Ok(false) => return Settled::Abandoned,
            // Its outcomes conflict with the record: fail without them.
            Err(e) if e.is_replay_conflict() && done != "[]" => done = "[]".to_owned(),
            Err(e) => {
                tracing::warn!(run = %at.run, error = %e, "cannot record the run's failure");
                return Settled::Abandoned;
            }
        }
    }
}

fn overdue(options: &WorkflowOptions) -> String {
    format!(
        "the run exceeded its maximum duration of {:?}",
        options.max_duration.unwrap_or_default()
    )
}
