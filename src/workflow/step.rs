//! A step: its handler run inline in the worker, with its retry policy and
//! timeout, and its checkpoint. On replay a completed step returns its
//! recorded output without calling the handler.

use std::future::{Future, IntoFuture};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::context::{Halt, WorkflowContext};
use crate::BoxFuture;
use crate::db::{self, Checkpoint};
use crate::error::{HandlerError, StepError, panic_message};
use crate::plugin::{FailureInfo, StepEvent};
use crate::retry::{RetryPolicy, Verdict};

/// A step about to run; await it. See [`WorkflowContext::step`].
#[must_use = "a step does nothing until awaited"]
pub struct Step<'c, I, F> {
    pub(super) ctx: &'c WorkflowContext,
    pub(super) name: String,
    pub(super) input: I,
    pub(super) handler: F,
    pub(super) policy: RetryPolicy,
    pub(super) timeout: Option<Duration>,
}

impl<'c, I, F> Step<'c, I, F> {
    /// How failures are retried (default: the workflow's
    /// [`step_retry`](crate::WorkflowOptions::step_retry)). Each retry waits
    /// durably: the run is parked for the backoff.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Cancel an attempt that runs longer than this; it counts as a
    /// retryable failure (default: the workflow's
    /// [`step_timeout`](crate::WorkflowOptions::step_timeout), else none).
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }
}

impl<'c, I, O, F, Fut> IntoFuture for Step<'c, I, F>
where
    I: Serialize + Send + 'static,
    O: Serialize + DeserializeOwned + Send + 'static,
    F: FnOnce(I) -> Fut + Send + 'static,
    Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
{
    type Output = Result<O, StepError>;
    type IntoFuture = BoxFuture<'c, Result<O, StepError>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}

impl<'c, I, F> Step<'c, I, F> {
    async fn run<O, Fut>(self) -> Result<O, StepError>
    where
        I: Serialize + Send + 'static,
        O: Serialize + DeserializeOwned + Send + 'static,
        F: FnOnce(I) -> Fut + Send + 'static,
        Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    {
        let ctx = self.ctx;
        let Some(slot) = ctx.slot(&self.name) else {
            return std::future::pending().await;
        };
        let mut attempt = 1;
        if let Some(r) = slot.recorded {
            match r.status.as_str() {
                "completed" => {
                    return serde_json::from_value(r.output.clone().unwrap_or_default()).map_err(
                        |e| StepError::Decode {
                            step: slot.key.clone(),
                            message: format!("recorded output does not fit the expected type: {e}"),
                        },
                    );
                }
                "failed" => {
                    return Err(StepError::Failed {
                        step: slot.key.clone(),
                        message: r.error.clone().unwrap_or_default(),
                    });
                }
                _ => attempt = u32::try_from(r.attempts).unwrap_or(0) + 1,
            }
        }

        let input = serde_json::to_string(&self.input).unwrap_or_else(|_| "null".into());
        ctx.inner.running.fetch_add(1, Ordering::SeqCst);
        let mut event = StepEvent {
            run_id: ctx.inner.at.run,
            workflow: ctx.inner.workflow.clone(),
            step: slot.key.clone(),
            attempt,
            started: SystemTime::now(),
            elapsed: Duration::ZERO,
            traceparent: ctx.inner.traceparent.clone(),
        };
        let plugins = &ctx.inner.plugins;
        plugins.each("before_step", |p| p.before_step(&event));
        let clock = Instant::now();
        let outcome = run_handler(self.handler, self.input, self.timeout).await;
        event.elapsed = clock.elapsed();
        let (status, output, error, retry_in) = match &outcome {
            Ok(out) => match serde_json::to_string(out) {
                Ok(json) => ("completed", Some(json), None, None),
                Err(e) => (
                    "failed",
                    None,
                    Some(format!("cannot serialize the output: {e}")),
                    None,
                ),
            },
            Err(e) => match self.policy.verdict(attempt, e) {
                Verdict::Retry { delay, error } => ("retrying", None, Some(error), Some(delay)),
                Verdict::GiveUp { error } => ("failed", None, Some(error), None),
            },
        };
        let c = Checkpoint {
            key: &slot.key,
            seq: slot.seq,
            kind: "step",
            status,
            input: Some(&input),
            output: output.as_deref(),
            error: error.as_deref(),
            attempts: i32::try_from(attempt).unwrap_or(i32::MAX),
        };
        let written = db::checkpoint(&ctx.inner.pool, ctx.inner.at, c).await;
        ctx.inner.running.fetch_sub(1, Ordering::SeqCst);
        ctx.inner.changed.notify_waiters();
        let recorded = match written {
            Ok(Some(r)) => r,
            Ok(None) => return ctx.abandon("lease lost", "writing a checkpoint").await,
            Err(e) => return ctx.abandon("writing a checkpoint", e).await,
        };
        match (status, &error) {
            ("completed", _) => plugins.each("after_step", |p| p.after_step(&event)),
            (_, e) => {
                let info = FailureInfo {
                    message: e.clone().unwrap_or_default(),
                    will_retry: status == "retrying",
                };
                plugins.each("on_step_error", |p| p.on_step_error(&event, &info));
            }
        }
        // What is recorded is what the run has seen, even if another writer
        // got there first: the stored outcome wins over this attempt's.
        match recorded.status_now.as_str() {
            "completed" => serde_json::from_str(recorded.output_now.as_deref().unwrap_or("null"))
                .map_err(|e| StepError::Decode {
                    step: slot.key,
                    message: format!("recorded output does not fit the expected type: {e}"),
                }),
            "retrying" => {
                // Another writer may have recorded the retry: its backoff then.
                let delay = retry_in.unwrap_or_else(|| self.policy.jittered_delay_after(attempt));
                ctx.park(Halt::Suspend {
                    wake_at: Some(recorded.db_now + delay),
                    waiting: false,
                })
                .await
            }
            _ => Err(StepError::Failed {
                step: slot.key,
                message: recorded.error_now.unwrap_or_default(),
            }),
        }
    }
}

/// Runs a step's handler: a panic or an overrun is a retryable failure.
async fn run_handler<I, O, F, Fut>(
    handler: F,
    input: I,
    limit: Option<Duration>,
) -> Result<O, HandlerError>
where
    F: FnOnce(I) -> Fut,
    Fut: Future<Output = Result<O, HandlerError>>,
{
    let attempt = AssertUnwindSafe(handler(input)).catch_unwind();
    let result = match limit {
        Some(limit) => match tokio::time::timeout(limit, attempt).await {
            Ok(r) => r,
            Err(_) => {
                return Err(HandlerError::retryable(format!(
                    "step timed out after {limit:?}"
                )));
            }
        },
        None => attempt.await,
    };
    result.unwrap_or_else(|panic| {
        Err(HandlerError::retryable(format!(
            "step panicked: {}",
            panic_message(panic)
        )))
    })
}
