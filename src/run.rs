//! Workflow runs as callers see them: their status and what
//! `cairn.run_status` reports.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::error::Error;

/// Where a run is in its life. The SQL side stores the same names (the
/// `check` list of `cairn.runs.status`; a test holds the two equal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RunStatus {
    /// Started, not yet picked up by a worker.
    Pending,
    /// A worker is executing it.
    Running,
    /// Parked until a time (a durable sleep or a step's retry backoff).
    Sleeping,
    /// Parked until something happens (a signal, a child run, a step job).
    Waiting,
    /// Finished with an output.
    Completed,
    /// Finished with an error; `retry_run` can revive it.
    Failed,
    /// Cancelled by `cancel_run` (or with its parent).
    Cancelled,
}

impl RunStatus {
    /// Every status, in the order of the SQL `check` list.
    pub const ALL: [RunStatus; 7] = [
        RunStatus::Pending,
        RunStatus::Running,
        RunStatus::Sleeping,
        RunStatus::Waiting,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Cancelled,
    ];

    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Pending => "pending",
            RunStatus::Running => "running",
            RunStatus::Sleeping => "sleeping",
            RunStatus::Waiting => "waiting",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    /// Completed, failed or cancelled: nothing more happens unless a failed
    /// run is retried.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled
        )
    }
}

impl serde::Serialize for RunStatus {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        RunStatus::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| Error::InvalidArgument(format!("unknown run status {s:?}")))
    }
}

impl TryFrom<String> for RunStatus {
    type Error = Error;

    fn try_from(s: String) -> Result<Self, Error> {
        s.parse()
    }
}

/// A run's state, from `cairn.run_status`.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct RunInfo {
    /// The run's id.
    pub id: uuid::Uuid,
    /// The workflow's name.
    pub workflow: String,
    /// Where the run is.
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    /// The output as JSON text, once completed.
    #[serde(serialize_with = "crate::json::embedded_opt")]
    pub output: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// When it was started.
    pub created_at: DateTime<Utc>,
    /// When a worker first ran it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// When a sleeping run wakes (or a waiting one times out).
    pub wake_at: Option<DateTime<Utc>>,
}

/// One entry of a run's history, from `cairn.run_history` (oldest first).
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct RunEvent {
    /// When it happened (for an attempt: when it began).
    pub at: DateTime<Utc>,
    /// When an attempt ended (`None` while it runs, or if it was cut short).
    pub ended_at: Option<DateTime<Utc>>,
    /// What happened: `created`, `started`, `attempt` (a step attempt),
    /// `sleep`, `signal`, `child`, `task`, `value` (durable calls),
    /// `suspended`, `resumed`, `failed`, `retried`, `cancelled`, `completed`.
    pub event: String,
    /// The step's key, for step events.
    pub step: Option<String>,
    /// The attempt's number, from 1.
    pub attempt: Option<i32>,
    /// How an attempt ended: `completed`, `running`, `waiting`, `retrying`,
    /// `failed`, `lost` (cut short by a lost worker) or `cancelled`.
    pub outcome: Option<String>,
    /// The error, for failures.
    pub error: Option<String>,
    /// More about it, as JSON text (a signal's name, a suspend's wake time).
    #[serde(serialize_with = "crate::json::embedded_opt")]
    pub detail: Option<String>,
}

/// One durable step of a run as it stands, from
/// [`App::run_steps`](crate::App::run_steps) (in the order the run made them).
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct RunStep {
    /// Its place in the run, from 0.
    pub seq: i32,
    /// The step's key.
    pub key: String,
    /// What it is: `step`, `sleep`, `signal`, `value`, `child`, `task` or
    /// `map`.
    pub kind: String,
    /// Where it is: `running`, `waiting`, `retrying`, `completed`,
    /// `failed` or `skipped` (a flow step whose condition was false).
    pub status: String,
    /// Its input as JSON text, where it has one (a flow step's).
    #[serde(serialize_with = "crate::json::embedded_opt")]
    pub input: Option<String>,
    /// Its output as JSON text, once completed.
    #[serde(serialize_with = "crate::json::embedded_opt")]
    pub output: Option<String>,
    /// Its latest error.
    pub error: Option<String>,
    /// Attempts made so far.
    pub attempts: i32,
    /// When its latest attempt (or wait) began.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
}

/// A step's state, as `cairn.steps.status` stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StepStatus {
    /// An attempt began and has not reported back.
    Running,
    /// Done; its output is final.
    Completed,
    /// Failed for good.
    Failed,
    /// Failed; another attempt comes after the backoff.
    Retrying,
    /// Waits for a timer, a signal, a child run or a step job.
    Waiting,
    /// A flow's step whose condition did not hold.
    Skipped,
}

/// What a durable call was, as `cairn.steps.kind` stores it. The worker
/// writes steps and values; the SQL functions write the other kinds (listed
/// so that a test holds this enum equal to the `check` list).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum StepKind {
    /// `ctx.step`: a handler run inline.
    Step,
    /// `ctx.sleep`.
    Sleep,
    /// `ctx.wait_for_signal`.
    Signal,
    /// `ctx.now`, `ctx.random`, `ctx.uuid`.
    Value,
    /// `ctx.child`.
    Child,
    /// `ctx.task`, or a flow's handler step.
    Task,
    /// A flow's fan-out (`map`).
    Map,
}

impl StepStatus {
    pub(crate) const ALL: [StepStatus; 6] = [
        StepStatus::Running,
        StepStatus::Completed,
        StepStatus::Failed,
        StepStatus::Retrying,
        StepStatus::Waiting,
        StepStatus::Skipped,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StepStatus::Running => "running",
            StepStatus::Completed => "completed",
            StepStatus::Failed => "failed",
            StepStatus::Retrying => "retrying",
            StepStatus::Waiting => "waiting",
            StepStatus::Skipped => "skipped",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

#[cfg_attr(not(test), allow(dead_code))]
impl StepKind {
    pub(crate) const ALL: [StepKind; 7] = [
        StepKind::Step,
        StepKind::Sleep,
        StepKind::Signal,
        StepKind::Value,
        StepKind::Child,
        StepKind::Task,
        StepKind::Map,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            StepKind::Step => "step",
            StepKind::Sleep => "sleep",
            StepKind::Signal => "signal",
            StepKind::Value => "value",
            StepKind::Child => "child",
            StepKind::Task => "task",
            StepKind::Map => "map",
        }
    }
}

/// Everything about one run, from [`App::run`](crate::App::run).
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct RunDetail {
    /// The run's id.
    pub id: uuid::Uuid,
    /// The workflow's name.
    pub workflow: String,
    /// Where the run is.
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    /// The input as JSON text.
    #[serde(serialize_with = "crate::json::embedded")]
    pub input: String,
    /// The output as JSON text, once completed.
    #[serde(serialize_with = "crate::json::embedded_opt")]
    pub output: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// The idempotency key it was started with.
    pub idempotency_key: Option<String>,
    /// The queue its job runs on.
    pub queue: Option<String>,
    /// Its priority (lower runs first).
    pub priority: i32,
    /// The run that started it as a child, if any.
    pub parent_run: Option<uuid::Uuid>,
    /// The parent's step that waits for it.
    pub parent_step: Option<String>,
    /// The child runs it started, oldest first.
    pub children: Vec<uuid::Uuid>,
    /// When it was started.
    pub created_at: DateTime<Utc>,
    /// When a worker first ran it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// When a sleeping run wakes (or a waiting one times out).
    pub wake_at: Option<DateTime<Utc>>,
}

/// One line of [`App::list_runs`](crate::App::list_runs), newest first.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct RunSummary {
    /// The run's id.
    pub id: uuid::Uuid,
    /// The workflow's name.
    pub workflow: String,
    /// Where the run is.
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    /// When it was started.
    pub created_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Why it failed.
    pub error: Option<String>,
    /// The run that started it as a child, if any.
    pub parent_run: Option<uuid::Uuid>,
}

/// Which runs [`App::list_runs`](crate::App::list_runs) returns: all (the
/// newest 100) unless narrowed.
#[derive(Clone, Debug)]
pub struct RunFilter {
    pub(crate) workflow: Option<String>,
    pub(crate) status: Option<RunStatus>,
    pub(crate) since: Option<DateTime<Utc>>,
    pub(crate) limit: u32,
}

impl Default for RunFilter {
    fn default() -> Self {
        Self {
            workflow: None,
            status: None,
            since: None,
            limit: 100,
        }
    }
}

impl RunFilter {
    /// Only runs of this workflow.
    pub fn workflow(mut self, workflow: &str) -> Self {
        self.workflow = Some(workflow.to_owned());
        self
    }

    /// Only runs in this status.
    pub fn status(mut self, status: RunStatus) -> Self {
        self.status = Some(status);
        self
    }

    /// Only runs started at or after this time.
    pub fn since(mut self, since: DateTime<Utc>) -> Self {
        self.since = Some(since);
        self
    }

    /// At most this many (1 to 10,000; default 100).
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = limit;
        self
    }
}
