//! Typed tasks: the [`Task`] trait and [`JobContext`].

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::retry::RetryPolicy;

/// A kind of job: its arguments (the type implementing `Task`), its queue and
/// name, and how it is retried. Implement it on a serde type and register a
/// handler with [`App::task`](crate::App::task).
///
/// ```
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct SendEmail {
///     to: String,
/// }
///
/// impl cairn::Task for SendEmail {
///     const QUEUE: &'static str = "emails";
///     type Output = ();
/// }
/// ```
///
/// A job sent from SQL with `cairn.send('emails', '{"to": "a@b.c"}')` carries
/// the task name `emails` (the queue's name), so it runs this handler too.
pub trait Task: Serialize + DeserializeOwned + Send + 'static {
    /// The queue the jobs go to (a lowercase identifier).
    const QUEUE: &'static str;
    /// The task name stored with each job; defaults to the queue name.
    const NAME: &'static str = Self::QUEUE;
    /// Keep completed jobs, with their output, in `cairn.archive` (default
    /// false: a completed job is deleted).
    const ARCHIVE: bool = false;
    /// What the handler returns.
    type Output: Serialize + Send + 'static;

    /// How failed jobs are retried (default [`RetryPolicy::default`]).
    fn retry_policy() -> RetryPolicy {
        RetryPolicy::default()
    }
}

/// What a running job knows about itself.
#[derive(Clone, Debug)]
pub struct JobContext {
    pub(crate) id: i64,
    pub(crate) queue: String,
    pub(crate) task: String,
    pub(crate) attempt: u32,
    pub(crate) parent_run: Option<uuid::Uuid>,
    pub(crate) cancel: CancellationToken,
}

impl JobContext {
    /// The job's id (stable across attempts).
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The queue the job came from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The task name.
    pub fn task(&self) -> &str {
        &self.task
    }

    /// This delivery's number, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// A key that is the same for every attempt of this job: pass it to
    /// outside systems so that a retried job does not repeat an effect.
    pub fn idempotency_key(&self) -> String {
        format!("cairn:job:{}", self.id)
    }

    /// The workflow run this job is a step of, if it was started with
    /// [`WorkflowContext::task`](crate::WorkflowContext::task).
    pub fn parent_run(&self) -> Option<uuid::Uuid> {
        self.parent_run
    }

    /// Resolves when the worker gives up on this attempt (the lease was lost,
    /// or shutdown's deadline passed); the handler is then aborted at its next
    /// `.await`. Long computations can check [`is_cancelled`](Self::is_cancelled).
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// Whether the worker has given up on this attempt.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

pub(crate) fn validate_task_name(name: &str) -> Result<()> {
    let ok = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b))
        && (name.as_bytes()[0].is_ascii_alphabetic() || name.as_bytes()[0] == b'_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid task name {name:?}: use 1 to 128 characters of A-Z, a-z, 0-9 and _ . : -, starting with a letter or _"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names() {
        assert!(validate_task_name("billing.charge:v2").is_ok());
        assert!(validate_task_name("9lives").is_err());
        assert!(validate_task_name("").is_err());
    }
}
