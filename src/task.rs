//! Typed tasks: the [`Task`] trait, the handler registry and [`JobContext`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, HandlerError, Result};
use crate::retry::RetryPolicy;
use crate::workflow::WorkflowDef;

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

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A handler with its types erased: JSON text in, JSON text out. The flag
/// asks for the output even when the task does not archive (a workflow step
/// waits for it).
type ErasedHandler = dyn Fn(String, JobContext, bool) -> BoxFuture<'static, Result<Option<String>, HandlerError>>
    + Send
    + Sync;

/// What runs a job of a registered name.
pub(crate) enum Handler {
    Task(Arc<ErasedHandler>),
    Workflow(Arc<WorkflowDef>),
}

/// One registered task or workflow.
pub(crate) struct Registration {
    pub name: String,
    pub queue: String,
    pub policy: RetryPolicy,
    /// Keep completed jobs in the archive (`Task::ARCHIVE`).
    pub archive: bool,
    pub handler: Handler,
}

/// Task and workflow names → registrations (one name space: a job's task
/// column names either).
#[derive(Default)]
pub(crate) struct Registry {
    tasks: HashMap<String, Arc<Registration>>,
}

impl Registry {
    pub fn register<T, F, Fut>(&mut self, handler: F) -> Result<()>
    where
        T: Task,
        F: Fn(T, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T::Output, HandlerError>> + Send + 'static,
    {
        validate_queue_name(T::QUEUE)?;
        self.check_new(T::NAME)?;
        let handler = Arc::new(handler);
        let erased: Arc<ErasedHandler> =
            Arc::new(move |payload: String, ctx: JobContext, want: bool| {
                let handler = Arc::clone(&handler);
                Box::pin(async move {
                    let args: T = serde_json::from_str(&payload).map_err(|e| {
                        HandlerError::fatal(format!(
                            "payload does not deserialize into {}: {e}",
                            std::any::type_name::<T>()
                        ))
                    })?;
                    let output = handler(args, ctx).await?;
                    if !T::ARCHIVE && !want {
                        return Ok(None);
                    }
                    serde_json::to_string(&output).map(Some).map_err(|e| {
                        HandlerError::fatal(format!("cannot serialize the output: {e}"))
                    })
                }) as BoxFuture<'static, _>
            });
        self.tasks.insert(
            T::NAME.to_owned(),
            Arc::new(Registration {
                name: T::NAME.to_owned(),
                queue: T::QUEUE.to_owned(),
                policy: T::retry_policy(),
                archive: T::ARCHIVE,
                handler: Handler::Task(erased),
            }),
        );
        Ok(())
    }

    pub fn register_workflow(&mut self, name: &str, workflow: WorkflowDef) -> Result<()> {
        self.check_new(name)?;
        validate_queue_name(&workflow.options.queue)?;
        self.tasks.insert(
            name.to_owned(),
            Arc::new(Registration {
                name: name.to_owned(),
                queue: workflow.options.queue.clone(),
                policy: RetryPolicy::default(),
                archive: false,
                handler: Handler::Workflow(Arc::new(workflow)),
            }),
        );
        Ok(())
    }

    fn check_new(&self, name: &str) -> Result<()> {
        validate_task_name(name)?;
        if self.tasks.contains_key(name) {
            return Err(Error::InvalidArgument(format!(
                "{name:?} is registered twice (tasks and workflows share one name space)"
            )));
        }
        Ok(())
    }

    /// What a worker serving `queue` can run: the tasks sent there, and every
    /// workflow (a run may be started on any queue).
    pub fn for_queue(&self, queue: &str) -> Vec<Arc<Registration>> {
        self.tasks
            .values()
            .filter(|r| r.queue == queue || matches!(r.handler, Handler::Workflow(_)))
            .cloned()
            .collect()
    }

    /// Every registered workflow.
    pub fn workflows(&self) -> Vec<Arc<Registration>> {
        self.tasks
            .values()
            .filter(|r| matches!(r.handler, Handler::Workflow(_)))
            .cloned()
            .collect()
    }
}

/// Rust-side twin of `cairn.check_queue_name`: reject before the database.
pub(crate) fn validate_queue_name(name: &str) -> Result<()> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid queue name {name:?}: use 1 to 63 characters of a-z, 0-9 and _, not starting with a digit"
        )))
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
    fn names() {
        for ok in ["emails", "_x", "q1_b"] {
            assert!(validate_queue_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Emails", "1q", "a-b", "a b", "a;drop", &"x".repeat(64)] {
            assert!(validate_queue_name(bad).is_err(), "{bad}");
        }
        assert!(validate_task_name("billing.charge:v2").is_ok());
        assert!(validate_task_name("9lives").is_err());
        assert!(validate_task_name("").is_err());
    }
}
