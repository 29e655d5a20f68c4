//! The registry: task and workflow names mapped to their handlers, with the
//! handlers' types erased (JSON text in, JSON text out) so the worker can
//! dispatch a claimed job by its task name alone.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::BoxFuture;
use crate::error::{Error, HandlerError, Result};
use crate::queue::validate_queue_name;
use crate::retry::RetryPolicy;
use crate::task::{JobContext, Task, validate_task_name};
use crate::workflow::WorkflowDef;

/// A handler with its types erased: JSON text in, JSON text out. The flag
/// asks for the output even when the task does not archive (a workflow step
/// waits for it).
type ErasedHandler = dyn Fn(String, JobContext, bool) -> BoxFuture<'static, Result<Option<String>, HandlerError>>
    + Send
    + Sync;

/// What runs a job of a registered name.
pub(crate) enum Handler {
    Task(Arc<ErasedHandler>),
    /// A flow's step handler: served on every queue (a flow names the
    /// queue), its payload wrapped in the flow's envelope.
    Step(Arc<ErasedHandler>),
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

/// The registry an app and its workers share.
#[derive(Clone, Default)]
pub(crate) struct Handlers(Arc<RwLock<Registry>>);

impl Handlers {
    pub fn read(&self) -> RwLockReadGuard<'_, Registry> {
        self.0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn write(&self) -> RwLockWriteGuard<'_, Registry> {
        self.0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
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
        self.tasks.insert(
            T::NAME.to_owned(),
            Arc::new(Registration {
                name: T::NAME.to_owned(),
                queue: T::QUEUE.to_owned(),
                policy: T::retry_policy(),
                archive: T::ARCHIVE,
                handler: Handler::Task(erase(handler, T::ARCHIVE)),
            }),
        );
        Ok(())
    }

    pub fn register_step<I, O, F, Fut>(
        &mut self,
        name: &str,
        policy: RetryPolicy,
        handler: F,
    ) -> Result<()>
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(I, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    {
        self.check_new(name)?;
        self.tasks.insert(
            name.to_owned(),
            Arc::new(Registration {
                name: name.to_owned(),
                queue: String::new(),
                policy,
                archive: false,
                handler: Handler::Step(erase(handler, false)),
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

    /// What a worker serving `queue` can run: the tasks sent there, every
    /// workflow (a run may be started on any queue) and every step handler
    /// (a flow names the queues of its steps).
    pub fn for_queue(&self, queue: &str) -> Vec<Arc<Registration>> {
        self.tasks
            .values()
            .filter(|r| r.queue == queue || !matches!(r.handler, Handler::Task(_)))
            .cloned()
            .collect()
    }

    /// The names of every registered step handler.
    pub fn step_handlers(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .tasks
            .values()
            .filter(|r| matches!(r.handler, Handler::Step(_)))
            .map(|r| r.name.clone())
            .collect();
        names.sort();
        names
    }

    /// Whether `name` is a registered workflow.
    pub fn is_workflow(&self, name: &str) -> bool {
        self.tasks
            .get(name)
            .is_some_and(|r| matches!(r.handler, Handler::Workflow(_)))
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

/// Erases a typed handler: JSON text in, JSON text out (when `keep`, or
/// when the caller wants the output).
fn erase<I, O, F, Fut>(handler: F, keep: bool) -> Arc<ErasedHandler>
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(I, JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
{
    let handler = Arc::new(handler);
    Arc::new(move |payload: String, ctx: JobContext, want: bool| {
        let handler = Arc::clone(&handler);
        Box::pin(async move {
            let args: I = serde_json::from_str(&payload).map_err(|e| {
                HandlerError::fatal(format!(
                    "payload does not deserialize into {}: {e}",
                    std::any::type_name::<I>()
                ))
            })?;
            let output = handler(args, ctx).await?;
            if !keep && !want {
                return Ok(None);
            }
            serde_json::to_string(&output)
                .map(Some)
                .map_err(|e| HandlerError::fatal(format!("cannot serialize the output: {e}")))
        }) as BoxFuture<'static, _>
    })
}
