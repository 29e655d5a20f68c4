//! Runs a claimed job: a task's handler, or the replay of the workflow run
//! the job drives. A task's outcome goes to the [completer](super::completer)
//! as a settlement; a run writes its own outcome (complete, park or fail).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;

use super::completer::Settle;
use super::{QueuePlan, Running, Worker};
use crate::db::{ClaimedJob, RunLease};
use crate::error::{HandlerError, panic_message};
use crate::json;
use crate::plugin::{Attempt, FailureInfo, TaskEvent};
use crate::registry::{Handler, Registration};
use crate::retry::{Backoff, RetryPolicy, Verdict};
use crate::task::JobContext;
use crate::trace::AttemptContext;
use crate::workflow::{self, Execution, Settled, WorkflowDef};

impl Worker {
    /// Spawns the job's handler and the task that reports its outcome.
    pub(super) fn start(
        &self,
        plan: &QueuePlan,
        job: ClaimedJob,
        permit: OwnedSemaphorePermit,
        settle: mpsc::UnboundedSender<Settle>,
    ) {
        let attempt = u32::try_from(job.attempts).unwrap_or(u32::MAX);
        let Some(reg) = plan.handlers.get(&job.task).cloned() else {
            // The claim filters by task name, so this cannot happen; settle
            // it loudly rather than leave it leased.
            let _ = settle.send(Settle::fail(
                &job,
                format!("no handler for task {:?}", job.task),
            ));
            return;
        };
        // A flow's step job carries its step's retry policy and timeout.
        let step = match &reg.handler {
            Handler::Step(_) if job.parent_run.is_some() => match open_envelope(&job, reg.policy) {
                Ok(step) => Some(step),
                Err(error) => {
                    let _ = settle.send(Settle::fail(&job, error));
                    return;
                }
            },
            _ => None,
        };
        let policy = step.as_ref().map_or(reg.policy, |s| s.policy);
        let flow_step = step.is_some();
        if attempt > policy.attempts() {
            // Delivered more often than the policy allows without a result:
            // the workers running it were lost (a crash loop). Stop here.
            let error = format!(
                "gave up after {} deliveries without a result (max attempts {}); the worker running it was lost each time",
                attempt - 1,
                policy.attempts()
            );
            let _ = settle.send(Settle::fail(&job, error));
            return;
        }

        let handler = match &reg.handler {
            Handler::Task(h) | Handler::Step(h) => Arc::clone(h),
            Handler::Workflow(w) => {
                return self.start_run(&plan.name, &reg, Arc::clone(w), job, permit, settle);
            }
        };
        let (payload, timeout) = match step {
            Some(s) => (s.input, s.timeout),
            None => (job.payload, None),
        };
        let cancel = CancellationToken::new();
        let ctx = JobContext {
            id: job.id,
            queue: plan.name.clone(),
            task: reg.name.clone(),
            attempt,
            parent_run: job.parent_run,
            cancel: cancel.clone(),
        };
        let (id, lease) = (job.id, job.lease);
        let archive = reg.archive;
        let plugins = self.plugins.clone();
        // Built only for plugins: no clones or clock reads per job otherwise.
        let mut event = (!plugins.is_empty()).then(|| TaskEvent {
            job_id: id,
            task: reg.name.clone(),
            queue: plan.name.clone(),
            attempt,
            parent_run: job.parent_run,
            flow_step,
            started: SystemTime::now(),
            elapsed: Duration::ZERO,
            traceparent: job.traceparent.clone(),
        });
        let attempt_cx = match &event {
            Some(e) => {
                plugins.each("before_task", |p| p.before_task(e));
                AttemptContext::of(&plugins, Attempt::Task(e))
            }
            None => AttemptContext::default(),
        };
        let clock = event.as_ref().map(|_| Instant::now());
        // The user's own `tracing` spans and events inside the handler carry
        // the job's identity.
        let span = tracing::info_span!(
            target: "cairn::attempt",
            "cairn.task",
            cairn.job_id = id,
            cairn.task = %reg.name,
            cairn.queue = %plan.name,
            cairn.attempt = attempt,
            cairn.parent_run = job.parent_run.map(tracing::field::display)
        );
        let call = handler(payload, ctx, job.parent_run.is_some());
        let call = match timeout {
            Some(limit) => Box::pin(async move {
                tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
                    Err(HandlerError::retryable(format!(
                        "timed out after {limit:?}"
                    )))
                })
            }),
            None => call,
        };
        let run = tracing::Instrument::instrument(
            attempt_cx.wrap(AssertUnwindSafe(call).catch_unwind()),
            span,
        );
        let in_flight = Arc::clone(&self.in_flight);
        // Registered before the task can finish: the entry is in place when
        // the task marks it settled, and the completer removes it.
        let mut running = self.in_flight.lock();
        let task = tokio::spawn(async move {
            let result = match run.await {
                Ok(result) => result,
                Err(panic) => Err(HandlerError::retryable(format!(
                    "handler panicked: {}",
                    panic_message(panic)
                ))),
            };
            if let Some(r) = in_flight.lock().get_mut(&id) {
                r.abort = None; // settling now: shutdown must not release it
            }
            let outcome = match result {
                // An output the database would refuse fails the job at once.
                Ok(Some(output)) if json::problem(&output).is_some() => Settle::Fail {
                    id,
                    lease,
                    error: format!("the output {}", json::problem(&output).unwrap_or_default()),
                },
                Ok(output) => Settle::Done {
                    id,
                    lease,
                    output,
                    archive,
                },
                Err(err) => decide(id, lease, attempt, &policy, err),
            };
            if let (Some(event), Some(clock)) = (&mut event, clock) {
                event.elapsed = clock.elapsed();
                attempt_cx.enter(|| match &outcome {
                    Settle::Done { .. } => plugins.each("after_task", |p| p.after_task(event)),
                    Settle::Retry { error, .. } | Settle::Fail { error, .. } => {
                        let info = FailureInfo {
                            message: error.clone(),
                            will_retry: matches!(outcome, Settle::Retry { .. }),
                        };
                        plugins.each("on_task_error", |p| p.on_task_error(event, &info));
                    }
                });
            }
            let _ = settle.send(outcome);
            drop(permit);
        });
        // An aborted task (lease lost, or released at shutdown) sends nothing.
        running.insert(
            id,
            Running {
                lease,
                cancel,
                abort: Some(task.abort_handle()),
            },
        );
    }

    /// Spawns the replay of a workflow run; it writes its own outcome.
    fn start_run(
        &self,
        queue: &str,
        reg: &Registration,
        workflow: Arc<WorkflowDef>,
        job: ClaimedJob,
        permit: OwnedSemaphorePermit,
        settle: mpsc::UnboundedSender<Settle>,
    ) {
        let (id, lease) = (job.id, job.lease);
        let Some(run) = job.run_id else {
            // A job with a workflow's name that drives no run: sent by hand.
            let error = format!(
                "job {id} has the name of workflow {:?} but drives no run: a run's job is made by the run engine only (start runs with cairn.start_workflow)",
                reg.name
            );
            let _ = settle.send(Settle::fail(&job, error));
            return;
        };
        let cancel = CancellationToken::new();
        let execution = Execution {
            pool: self.pool.clone(),
            calls: self.calls.clone(),
            workflow,
            name: reg.name.clone(),
            queue: queue.to_owned(),
            plugins: self.plugins.clone(),
            at: RunLease {
                run,
                job: id,
                lease,
            },
            cancel: cancel.clone(),
        };
        let in_flight = Arc::clone(&self.in_flight);
        let counters = Arc::clone(&self.counters);
        let mut running = self.in_flight.lock();
        let task = tokio::spawn(async move {
            let counter = match workflow::execute(execution).await {
                Settled::Completed => Some(&counters.completed),
                Settled::Failed(_) | Settled::Refused(_) => Some(&counters.dead),
                Settled::Suspended | Settled::Abandoned => None,
            };
            if let Some(c) = counter {
                c.fetch_add(1, Ordering::Relaxed);
            }
            in_flight.lock().remove(&id);
            drop(permit);
        });
        running.insert(
            id,
            Running {
                lease,
                cancel,
                abort: Some(task.abort_handle()),
            },
        );
    }
}

/// Turns a handler error into a retry or a dead letter, by the policy.
fn decide(id: i64, lease: i64, attempt: u32, policy: &RetryPolicy, err: HandlerError) -> Settle {
    match policy.verdict(attempt, &err) {
        Verdict::Retry { delay, error } => Settle::Retry {
            id,
            lease,
            delay,
            error,
        },
        Verdict::GiveUp { error } => Settle::Fail { id, lease, error },
    }
}

/// A flow step job, opened: the step's input, and the retry policy and
/// timeout its definition sets (over the handler's own).
struct StepJob {
    input: String,
    policy: RetryPolicy,
    timeout: Option<Duration>,
}

/// The envelope `cairn.flow_start_step` wraps a step's input in.
#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    input: &'a serde_json::value::RawValue,
    #[serde(default)]
    policy: StepPolicy,
}

#[derive(serde::Deserialize, Default)]
struct StepPolicy {
    max_attempts: Option<u32>,
    backoff: Option<f64>,
    max_backoff: Option<f64>,
    timeout: Option<f64>,
}

fn open_envelope(job: &ClaimedJob, base: RetryPolicy) -> Result<StepJob, String> {
    let envelope: Envelope<'_> = serde_json::from_str(&job.payload)
        .map_err(|e| format!("job {} is not a flow step's job: {e}", job.id))?;
    let p = envelope.policy;
    let seconds = |s: f64| Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO);
    let mut policy = base;
    if let Some(n) = p.max_attempts {
        policy = policy.max_attempts(n);
    }
    if let Some(b) = p.backoff {
        policy = policy.backoff(Backoff::Exponential {
            base: seconds(b),
            factor: 2.0,
        });
    }
    if let Some(m) = p.max_backoff {
        policy = policy.max_delay(seconds(m));
    }
    Ok(StepJob {
        input: envelope.input.get().to_owned(),
        policy,
        timeout: p.timeout.map(seconds),
    })
}
