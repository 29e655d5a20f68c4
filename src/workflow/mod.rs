//! Durable workflows: options and registration here; the
//! [context](context) a workflow function gets, its [steps](step), and the
//! [replay](replay) that runs one execution of a run.

mod batch;
mod checkpoint;
mod context;
mod replay;
mod step;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub(crate) use batch::Calls;
pub use context::WorkflowContext;
pub(crate) use replay::{Execution, Settled, execute};
pub use step::Step;

use crate::BoxFuture;
use crate::error::HandlerError;
use crate::retry::RetryPolicy;

/// The queue a workflow's runs go to unless a start names another.
pub const WORKFLOW_QUEUE: &str = "workflows";

/// A workflow function with its types erased: JSON input in, JSON output out.
pub(crate) type ErasedWorkflow = dyn Fn(WorkflowContext, String) -> BoxFuture<'static, Result<String, HandlerError>>
    + Send
    + Sync;

/// A registered workflow: its function and options.
pub(crate) struct WorkflowDef {
    pub run: Arc<ErasedWorkflow>,
    pub options: WorkflowOptions,
}

/// Options of a workflow, for [`App::workflow_with`](crate::App::workflow_with).
///
/// ```
/// use cairn::{RetryPolicy, WorkflowOptions};
/// use std::time::Duration;
///
/// let options = WorkflowOptions::default()
///     .queue("orders")
///     .step_retry(RetryPolicy::default().max_attempts(3))
///     .step_timeout(Duration::from_secs(30))
///     .max_duration(Duration::from_secs(7 * 86_400));
/// ```
#[derive(Clone, Debug)]
pub struct WorkflowOptions {
    pub(crate) queue: String,
    pub(crate) step_retry: RetryPolicy,
    pub(crate) step_timeout: Option<Duration>,
    pub(crate) max_duration: Option<Duration>,
}

impl Default for WorkflowOptions {
    fn default() -> Self {
        Self {
            queue: WORKFLOW_QUEUE.to_owned(),
            step_retry: RetryPolicy::default(),
            step_timeout: None,
            max_duration: None,
        }
    }
}

impl WorkflowOptions {
    /// The queue runs go to unless a start names another (default
    /// `workflows`).
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// The retry policy of steps that do not set their own (default
    /// [`RetryPolicy::default`]).
    pub fn step_retry(mut self, policy: RetryPolicy) -> Self {
        self.step_retry = policy;
        self
    }

    /// The timeout of steps that do not set their own (default none).
    pub fn step_timeout(mut self, limit: Duration) -> Self {
        self.step_timeout = Some(limit);
        self
    }

    /// A run still unfinished this long after it was started fails, whether
    /// it is running, sleeping or waiting (default: no limit).
    pub fn max_duration(mut self, limit: Duration) -> Self {
        self.max_duration = Some(limit);
        self
    }
}

pub(crate) fn erase<I, O, F, Fut>(name: &str, f: F) -> Arc<ErasedWorkflow>
where
    I: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
    F: Fn(WorkflowContext, I) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
{
    let f = Arc::new(f);
    let name = name.to_owned();
    Arc::new(move |ctx: WorkflowContext, input: String| {
        let f = Arc::clone(&f);
        let name = name.clone();
        Box::pin(async move {
            let input: I = serde_json::from_str(&input).map_err(|e| {
                HandlerError::fatal(format!(
                    "input of workflow {name} does not deserialize into {}: {e}",
                    std::any::type_name::<I>()
                ))
            })?;
            let output = f(ctx, input).await?;
            serde_json::to_string(&output)
                .map_err(|e| HandlerError::fatal(format!("cannot serialize the output: {e}")))
        }) as BoxFuture<'static, _>
    })
}
