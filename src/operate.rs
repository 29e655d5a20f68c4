//! What an operator reads: the workers that are running, the workflows and
//! flows there are, the dead letters, and the health of the installation.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// A worker process, from [`App::list_workers`](crate::App::list_workers).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// Its id, drawn when it started.
    pub id: uuid::Uuid,
    /// The host it runs on.
    pub host: String,
    /// Its process id there.
    pub pid: i32,
    /// The queues it serves.
    pub queues: Vec<String>,
    /// The tasks, workflows and step handlers it runs.
    pub handlers: Vec<String>,
    /// How many jobs it runs at once.
    pub concurrency: i32,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// When it last said it was alive (every few seconds while it runs).
    pub seen_at: DateTime<Utc>,
    /// Seen in the last 30 s. A worker that stops cleanly removes itself;
    /// one that died stays, not alive, for a day.
    pub alive: bool,
}

/// A workflow or flow, from
/// [`App::list_workflows`](crate::App::list_workflows).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct WorkflowInfo {
    /// Its name.
    pub name: String,
    /// `workflow` (code-first, announced by a worker) or `flow` (data).
    pub kind: String,
    /// The queue a code-first workflow's runs go to.
    pub queue: Option<String>,
    /// When it was announced or first stored.
    pub registered_at: DateTime<Utc>,
    /// Its runs not yet ended.
    pub active: i64,
    /// Its failed runs (not yet pruned).
    pub failed: i64,
    /// Its completed runs (not yet pruned).
    pub completed: i64,
}

/// A job that failed for good, from
/// [`App::list_dead`](crate::App::list_dead).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The job's id.
    pub id: i64,
    /// Its queue.
    pub queue: String,
    /// Its task.
    pub task: String,
    /// Its payload, as JSON text.
    #[serde(serialize_with = "crate::json::embedded")]
    pub payload: String,
    /// How many attempts it had.
    pub attempts: i32,
    /// The last attempt's error.
    pub last_error: Option<String>,
    /// When it was enqueued.
    pub enqueued_at: DateTime<Utc>,
    /// When it was dead-lettered.
    pub died_at: DateTime<Utc>,
    /// The run it drove, for a workflow run's job (requeueing it revives
    /// the run).
    pub run_id: Option<uuid::Uuid>,
    /// The run it was a step of (retry that run instead).
    pub parent_run: Option<uuid::Uuid>,
}

/// What [`App::requeue_dead`](crate::App::requeue_dead) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Requeued {
    /// Dead letters put back (or runs revived).
    pub requeued: i64,
    /// Step jobs left dead: only their run's retry puts them back.
    pub skipped: i64,
}

/// One finding of [`App::doctor`](crate::App::doctor).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct Check {
    /// What was checked: `migrations`, `functions`, `drift`, `roles`,
    /// `oldest ready job`, `workers`, `expired leases`, `long-running
    /// steps`, `orphaned runs`, `dead letters`, `schedules`, `timers`,
    /// `dead rows in <table>`, `xmin horizon`.
    pub name: String,
    /// How it stands.
    #[sqlx(try_from = "String")]
    pub status: Health,
    /// What was found, and what to do about it.
    pub detail: String,
}

impl Check {
    pub(crate) fn new(name: &str, status: Health, detail: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            status,
            detail: detail.into(),
        }
    }
}

/// How a [`Check`] stands, from best to worst.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Nothing to do.
    Ok,
    /// Worth a look: work is waiting, or something drifts.
    Warn,
    /// Broken: cairn cannot do its job until it is fixed.
    Fail,
}

impl Health {
    /// Its name: `ok`, `warn` or `fail`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Ok => "ok",
            Health::Warn => "warn",
            Health::Fail => "fail",
        }
    }
}

impl TryFrom<String> for Health {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "ok" => Ok(Health::Ok),
            "warn" => Ok(Health::Warn),
            "fail" => Ok(Health::Fail),
            _ => Err(format!("unknown health {s:?}")),
        }
    }
}
