//! Plugin hooks around workflow runs, steps and plain tasks.
//!
//! Register with [`App::plugin`](crate::App::plugin). Hooks run in
//! registration order, synchronously, on the worker's task; keep them quick.
//! A hook that panics is caught and logged, and never breaks the run or the
//! plugins after it.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

/// One execution of a workflow run: a worker picked the run up and replays
/// it (the first execution, or a resumption after a wait or a crash).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WorkflowEvent {
    /// The run's id.
    pub run_id: uuid::Uuid,
    /// The workflow's name.
    pub workflow: String,
    /// The queue the run's job came from.
    pub queue: String,
    /// When this execution started.
    pub started: SystemTime,
    /// How long this execution took (zero in `before_workflow`).
    pub elapsed: Duration,
    /// When the run was started (database clock).
    pub run_created: SystemTime,
    /// The producer's W3C trace context, stored when the run was started.
    pub traceparent: Option<String>,
}

/// How an execution of a workflow run ended, for `after_workflow`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RunOutcome {
    /// The run completed.
    Completed,
    /// The run is parked until a timer, signal, child or step job.
    Suspended,
    /// The worker stopped without a result (lease lost, database
    /// unreachable); the run will be picked up again.
    Abandoned,
}

/// One executed attempt of an inline workflow step. Replayed steps, whose
/// stored output is returned without running, are not reported.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct StepEvent {
    /// The run's id.
    pub run_id: uuid::Uuid,
    /// The workflow's name.
    pub workflow: String,
    /// The step's key (`name#n`).
    pub step: String,
    /// The attempt, from 1.
    pub attempt: u32,
    /// When the attempt started.
    pub started: SystemTime,
    /// How long it took (zero in `before_step`).
    pub elapsed: Duration,
    /// The run's stored W3C trace context.
    pub traceparent: Option<String>,
}

/// One attempt of a plain task's job.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TaskEvent {
    /// The job's id.
    pub job_id: i64,
    /// The task's name.
    pub task: String,
    /// The queue.
    pub queue: String,
    /// The attempt (delivery), from 1.
    pub attempt: u32,
    /// The workflow run this job is a step of, if any.
    pub parent_run: Option<uuid::Uuid>,
    /// Whether the job is a step of a flow run (Postgres drives the run: no
    /// worker executes the run itself, so it has no execution of its own
    /// to be a child of).
    pub flow_step: bool,
    /// When the attempt started.
    pub started: SystemTime,
    /// How long it took (zero in `before_task`).
    pub elapsed: Duration,
    /// The producer's W3C trace context, stored with the job.
    pub traceparent: Option<String>,
}

/// A failure, as hooks see it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct FailureInfo {
    /// The error's message.
    pub message: String,
    /// Whether the work will be tried again.
    pub will_retry: bool,
}

/// An attempt about to run, for [`Plugin::attempt_context`].
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum Attempt<'a> {
    /// An execution of a workflow run (its body, around its steps).
    Workflow(&'a WorkflowEvent),
    /// An inline step's attempt.
    Step(&'a StepEvent),
    /// A task's attempt (a flow step's job too).
    Task(&'a TaskEvent),
}

/// Hooks into cairn's lifecycle. Every method has an empty default:
/// implement the ones you need.
#[allow(unused_variables)]
pub trait Plugin: Send + Sync + 'static {
    /// A worker starts an execution of a run.
    fn before_workflow(&self, event: &WorkflowEvent) {}
    /// An execution ended without failing the run.
    fn after_workflow(&self, event: &WorkflowEvent, outcome: RunOutcome) {}
    /// The run failed.
    fn on_workflow_error(&self, event: &WorkflowEvent, error: &FailureInfo) {}
    /// An inline step's attempt starts.
    fn before_step(&self, event: &StepEvent) {}
    /// An inline step's attempt succeeded (its checkpoint is written).
    fn after_step(&self, event: &StepEvent) {}
    /// An inline step's attempt failed.
    fn on_step_error(&self, event: &StepEvent, error: &FailureInfo) {}
    /// A task's attempt starts.
    fn before_task(&self, event: &TaskEvent) {}
    /// A task's attempt succeeded.
    fn after_task(&self, event: &TaskEvent) {}
    /// A task's attempt failed.
    fn on_task_error(&self, event: &TaskEvent, error: &FailureInfo) {}
    /// The OpenTelemetry context an attempt's code runs in (feature `otel`),
    /// asked right after the `before_*` hook. While the handler runs it is
    /// the current context, so spans the code opens are its children and
    /// jobs or runs it starts carry it; the `after_*` and `on_*_error` hooks
    /// run with it current too. The first plugin to return one wins.
    #[cfg(feature = "otel")]
    fn attempt_context(&self, attempt: Attempt<'_>) -> Option<opentelemetry::Context> {
        None
    }
}

/// The plugins an app has, shared with its workers (each takes a snapshot
/// when it starts).
#[derive(Clone, Default)]
pub(crate) struct PluginList(Arc<RwLock<Vec<Arc<dyn Plugin>>>>);

impl PluginList {
    pub fn add(&self, plugin: impl Plugin) {
        self.0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Arc::new(plugin));
    }

    pub fn snapshot(&self) -> Plugins {
        Plugins::new(
            self.0
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        )
    }
}

/// The registered plugins, called in order, each isolated from the others.
#[derive(Clone, Default)]
pub(crate) struct Plugins(Arc<[Arc<dyn Plugin>]>);

impl Plugins {
    pub fn new(plugins: Vec<Arc<dyn Plugin>>) -> Self {
        Self(plugins.into())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Calls `hook` on every plugin; a panic is logged and the next runs.
    pub fn each(&self, hook: &'static str, call: impl Fn(&dyn Plugin)) {
        for plugin in self.0.iter() {
            if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| call(plugin.as_ref())))
            {
                tracing::error!(
                    hook,
                    panic = %crate::error::panic_message(panic),
                    "a plugin panicked; ignored"
                );
            }
        }
    }
}

#[cfg(feature = "otel")]
impl Plugins {
    /// The first context a plugin gives the attempt.
    pub fn attempt_context(&self, attempt: Attempt<'_>) -> Option<opentelemetry::Context> {
        self.0.iter().find_map(|plugin| {
            std::panic::catch_unwind(AssertUnwindSafe(|| plugin.attempt_context(attempt)))
                .unwrap_or_else(|panic| {
                    tracing::error!(
                        hook = "attempt_context",
                        panic = %crate::error::panic_message(panic),
                        "a plugin panicked; ignored"
                    );
                    None
                })
        })
    }
}

/// Logs every hook as a structured `tracing` event (target `cairn`):
/// ids, names, attempt and timings, never payloads.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoggingPlugin;

impl Plugin for LoggingPlugin {
    fn before_workflow(&self, e: &WorkflowEvent) {
        tracing::info!(target: "cairn", run_id = %e.run_id, workflow = %e.workflow, queue = %e.queue, "workflow execution started");
    }
    fn after_workflow(&self, e: &WorkflowEvent, outcome: RunOutcome) {
        tracing::info!(target: "cairn", run_id = %e.run_id, workflow = %e.workflow, queue = %e.queue,
            elapsed_ms = e.elapsed.as_secs_f64() * 1e3, ?outcome, "workflow execution ended");
    }
    fn on_workflow_error(&self, e: &WorkflowEvent, err: &FailureInfo) {
        tracing::warn!(target: "cairn", run_id = %e.run_id, workflow = %e.workflow, queue = %e.queue,
            elapsed_ms = e.elapsed.as_secs_f64() * 1e3, error = %err.message, "workflow run failed");
    }
    fn before_step(&self, e: &StepEvent) {
        tracing::debug!(target: "cairn", run_id = %e.run_id, workflow = %e.workflow, step = %e.step,
            attempt = e.attempt, "step started");
    }
    fn after_step(&self, e: &StepEvent) {
        tracing::info!(target: "cairn", run_id = %e.run_id, workflow = %e.workflow, step = %e.step,
            attempt = e.attempt, elapsed_ms = e.elapsed.as_secs_f64() * 1e3, "step completed");
    }
    fn on_step_error(&self, e: &StepEvent, err: &FailureInfo) {
        tracing::warn!(target: "cairn", run_id = %e.run_id, workflow = %e.workflow, step = %e.step,
            attempt = e.attempt, elapsed_ms = e.elapsed.as_secs_f64() * 1e3, error = %err.message,
            will_retry = err.will_retry, "step failed");
    }
    fn before_task(&self, e: &TaskEvent) {
        tracing::debug!(target: "cairn", job_id = e.job_id, task = %e.task, queue = %e.queue,
            attempt = e.attempt, "task started");
    }
    fn after_task(&self, e: &TaskEvent) {
        tracing::info!(target: "cairn", job_id = e.job_id, task = %e.task, queue = %e.queue,
            attempt = e.attempt, elapsed_ms = e.elapsed.as_secs_f64() * 1e3, "task completed");
    }
    fn on_task_error(&self, e: &TaskEvent, err: &FailureInfo) {
        tracing::warn!(target: "cairn", job_id = e.job_id, task = %e.task, queue = %e.queue,
            attempt = e.attempt, elapsed_ms = e.elapsed.as_secs_f64() * 1e3, error = %err.message,
            will_retry = err.will_retry, "task failed");
    }
}
