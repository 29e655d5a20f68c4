//! A step: its handler, run inline in the worker with its retry policy and
//! timeout, and its checkpoint.
//!
//! An attempt is *begun* in the database before its handler runs
//! (`cairn.begin_step`), so an attempt cut short by a crash is counted, and
//! no step starts once its run is cancelled. Its outcome goes to the
//! [outbox](super::checkpoint::Outbox) and is written by the execution's next
//! call: one round trip per step. On replay a completed step returns its
//! recorded output without calling the handler.

use std::future::{Future, IntoFuture};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tracing::Instrument;

use super::checkpoint::Outcome;
use super::context::{Halt, Slot, WorkflowContext, preview};
use crate::BoxFuture;
use crate::db::{BeginCall, Begun};
use crate::error::{HandlerError, StepError, panic_message};
use crate::json;
use crate::plugin::{Attempt, FailureInfo, StepEvent};
use crate::retry::{RetryPolicy, Verdict};
use crate::run::{StepKind, StepStatus};
use crate::trace::AttemptContext;

/// A step about to run; await it. See [`WorkflowContext::step`].
#[must_use = "a step does nothing until awaited"]
pub struct Step<'c, I, F> {
    ctx: &'c WorkflowContext,
    name: String,
    input: I,
    handler: F,
    policy: RetryPolicy,
    timeout: Option<Duration>,
}

impl<'c, I, F> Step<'c, I, F> {
    pub(super) fn new(ctx: &'c WorkflowContext, name: &str, input: I, handler: F) -> Self {
        Self {
            ctx,
            name: name.to_owned(),
            input,
            handler,
            policy: ctx.inner.step_retry,
            timeout: ctx.inner.step_timeout,
        }
    }

    /// How failures are retried (default: the workflow's
    /// [`step_retry`](crate::WorkflowOptions::step_retry)). Each retry waits
    /// durably: the run is parked for the backoff. Attempts cut short by a
    /// lost worker count too, so a step that crashes its worker every time
    /// gives up.
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

    /// Takes the step's key now, so steps made in a fixed order get the same
    /// keys on every replay whatever order they are first polled in.
    fn into_future(self) -> Self::IntoFuture {
        let input = serde_json::to_string(&self.input);
        let slot = match &input {
            Ok(json) => self.ctx.slot(&self.name, Some((&self.name, json))),
            Err(_) => self.ctx.slot(&self.name, None),
        };
        Box::pin(self.run(slot, input))
    }
}

impl<'c, I, F> Step<'c, I, F> {
    async fn run<O, Fut>(
        self,
        slot: Option<Slot<'c>>,
        input: serde_json::Result<String>,
    ) -> Result<O, StepError>
    where
        I: Serialize + Send + 'static,
        O: Serialize + DeserializeOwned + Send + 'static,
        F: FnOnce(I) -> Fut + Send + 'static,
        Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    {
        let ctx = self.ctx;
        let Some(slot) = slot else {
            return std::future::pending().await;
        };
        if let Some(r) = slot.recorded {
            match r.status {
                StepStatus::Completed => return decode(&slot.key, r.output.as_deref()),
                StepStatus::Failed => {
                    return Err(StepError::Failed {
                        step: slot.key.clone(),
                        message: r.error.clone().unwrap_or_default(),
                    });
                }
                // Backing off: wait out the rest of the backoff.
                StepStatus::Retrying if r.wake_at.is_some_and(|w| w > ctx.db_now()) => {
                    return ctx
                        .park(Halt::Suspend {
                            wake_at: r.wake_at,
                            retry_in: None,
                            waiting: false,
                        })
                        .await;
                }
                _ => {}
            }
        }
        let input = match input {
            Ok(json) => json,
            Err(e) => {
                return Err(StepError::Failed {
                    step: slot.key,
                    message: format!("cannot serialize the step's input: {e}"),
                });
            }
        };
        if ctx.halted() {
            return std::future::pending().await;
        }
        let inner = &ctx.inner;
        let at = inner.at;
        let call = |done, durable| BeginCall {
            at,
            done,
            durable,
            key: slot.key.clone(),
            seq: slot.seq,
            fingerprint: slot.fingerprint.clone(),
            input: input.clone(),
        };
        let begun = ctx
            .call("beginning a step", |done, durable| {
                inner.calls.begin_step(call(done, durable))
            })
            .await;
        let attempt = match begun {
            Begun::Started(attempt) => attempt,
            Begun::Recorded {
                status: StepStatus::Completed,
                output,
                ..
            } => return decode(&slot.key, output.as_deref()),
            Begun::Recorded { error, .. } => {
                return Err(StepError::Failed {
                    step: slot.key,
                    message: error.unwrap_or_default(),
                });
            }
            Begun::Mismatch => {
                let message = format!(
                    "non-determinism in workflow {}: step {} was recorded for another input than this replay gives it ({})",
                    inner.workflow,
                    slot.key,
                    preview(&input)
                );
                return ctx.park(Halt::Fail(message)).await;
            }
        };
        let attempt_u32 = u32::try_from(attempt).unwrap_or(u32::MAX);
        let outcome = |status, output, error, retry_in| Outcome {
            key: slot.key.clone(),
            seq: slot.seq,
            kind: StepKind::Step,
            attempt,
            status,
            output,
            error,
            fingerprint: slot.fingerprint.clone(),
            retry_in,
        };
        if attempt_u32 > self.policy.attempts() {
            // Earlier attempts were all cut short: their workers were lost.
            let error = format!(
                "gave up: attempt {attempt} of {} began, and the {} before it never reported back (the worker running it was lost each time)",
                self.policy.attempts(),
                attempt - 1
            );
            ctx.record(outcome(StepStatus::Failed, None, Some(error.clone()), None));
            return Err(StepError::Failed {
                step: slot.key,
                message: error,
            });
        }

        let busy = ctx.busy();
        let mut event = StepEvent {
            run_id: at.run,
            workflow: inner.workflow.clone(),
            step: slot.key.clone(),
            attempt: attempt_u32,
            started: SystemTime::now(),
            elapsed: Duration::ZERO,
            traceparent: inner.traceparent.clone(),
        };
        let plugins = &inner.plugins;
        plugins.each("before_step", |p| p.before_step(&event));
        let attempt_cx = AttemptContext::of(plugins, Attempt::Step(&event));
        let span = tracing::info_span!(
            target: "cairn::attempt",
            "cairn.step",
            cairn.run_id = %at.run,
            cairn.workflow = %inner.workflow,
            cairn.step = %slot.key,
            cairn.attempt = attempt
        );
        let clock = Instant::now();
        let result = attempt_cx
            .wrap(run_handler(self.handler, self.input, self.timeout))
            .instrument(span)
            .await;
        event.elapsed = clock.elapsed();

        // The outcome: the output as recorded JSON, or the failure.
        let settled = match result {
            Ok(out) => match serde_json::to_string(&out) {
                Ok(text) => match json::problem(&text) {
                    None => Ok((out, RawValue::from_string(text).ok())),
                    Some(p) => Err((StepStatus::Failed, format!("the output {p}"), None)),
                },
                Err(e) => Err((
                    StepStatus::Failed,
                    format!("cannot serialize the output: {e}"),
                    None,
                )),
            },
            Err(e) => match self.policy.verdict(attempt_u32, &e) {
                Verdict::Retry { delay, error } => Err((StepStatus::Retrying, error, Some(delay))),
                Verdict::GiveUp { error } => Err((StepStatus::Failed, error, None)),
            },
        };
        match settled {
            Ok((out, output)) => {
                ctx.record(outcome(StepStatus::Completed, output, None, None));
                drop(busy);
                attempt_cx.enter(|| plugins.each("after_step", |p| p.after_step(&event)));
                Ok(out)
            }
            Err((status, error, delay)) => {
                ctx.record(outcome(
                    status,
                    None,
                    Some(error.clone()),
                    delay.map(|d| d.as_secs_f64()),
                ));
                let info = FailureInfo {
                    message: error.clone(),
                    will_retry: delay.is_some(),
                };
                attempt_cx
                    .enter(|| plugins.each("on_step_error", |p| p.on_step_error(&event, &info)));
                match delay {
                    Some(delay) => {
                        ctx.halt_now(Halt::Suspend {
                            wake_at: None,
                            retry_in: Some(delay),
                            waiting: false,
                        });
                        drop(busy);
                        std::future::pending().await
                    }
                    None => {
                        drop(busy);
                        Err(StepError::Failed {
                            step: slot.key,
                            message: error,
                        })
                    }
                }
            }
        }
    }
}

fn decode<O: DeserializeOwned>(key: &str, output: Option<&str>) -> Result<O, StepError> {
    serde_json::from_str(output.unwrap_or("null")).map_err(|e| StepError::Decode {
        step: key.to_owned(),
        message: format!("recorded output does not fit the expected type: {e}"),
    })
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
