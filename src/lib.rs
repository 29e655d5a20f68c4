//! # cairn
//!
//! Durable workflows and queues that live inside PostgreSQL, with a thin
//! Rust worker. Queueing, leasing, retries, timers, signals and checkpoints
//! are tables and stored functions in schema `cairn`, with no extension: any
//! client can enqueue a job with `SELECT cairn.send('emails', '{"to":
//! "a@b.c"}')` or start a workflow with `SELECT
//! cairn.start_workflow('greet', '"ann"')`. A run that crashed anywhere walks
//! on from its last completed step.
//!
//! ```no_run
//! use cairn::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct SendEmail {
//!     to: String,
//! }
//!
//! impl Task for SendEmail {
//!     const QUEUE: &'static str = "emails";
//!     type Output = ();
//! }
//!
//! # async fn demo() -> cairn::Result<()> {
//! let app = App::builder()
//!     .database_url("postgres://postgres@127.0.0.1/postgres")
//!     .build()
//!     .await?;
//! // A task: a typed job on a queue.
//! app.task(|email: SendEmail, _ctx| async move {
//!     println!("sending to {}", email.to);
//!     Ok(())
//! })?;
//! // A workflow: an async function whose steps are checkpointed.
//! app.workflow("greet", |ctx: WorkflowContext, name: String| async move {
//!     let text: String = ctx
//!         .step("compose", name, |n| async move { Ok(format!("hello {n}")) })
//!         .await?;
//!     ctx.sleep(std::time::Duration::from_secs(60)).await; // durable
//!     ctx.task(&SendEmail { to: "a@b.c".into() }).await?;  // a step on another queue
//!     Ok(text)
//! })?;
//! app.initialize().await?; // creates or upgrades schema `cairn`
//! app.enqueue(&SendEmail { to: "a@b.c".into() }).await?;
//! let run = app.start("greet", &"ann").idempotency_key("greet-ann").await?;
//! app.worker().queues(["emails", "workflows"]).concurrency(32).run().await?;
//! let greeting: String = app.result(run).await?;
//! # Ok(()) }
//! ```
//!
//! Delivery is at-least-once: a job whose worker dies runs again once its
//! lease runs out, so give outside systems [`JobContext::idempotency_key`].
//! Every settlement and every workflow call is fenced by the lease, so a
//! worker that lost its lease can never complete a job or move a run that
//! someone else now holds. A workflow step that completed never runs again;
//! a replay returns its recorded output, or fails loudly if the code now
//! reaches another call at that place (see [`WorkflowContext`]).
#![warn(missing_docs)]

mod app;
mod db;
mod error;
mod flow;
#[cfg(feature = "http")]
pub mod http;
mod json;
mod migrate;
mod operate;
#[cfg(feature = "otel")]
pub mod otel;
mod plugin;
mod pooler;
mod queue;
mod registry;
mod retention;
mod retry;
mod run;
mod schedule;
mod task;
mod trace;
mod worker;
mod workflow;

pub use app::{App, AppBuilder, Call, Enqueue, EnqueueBatch, OnConflict, Start};
pub use error::{Error, HandlerError, HandlerErrorKind, Result, ResultExt, StepError};
pub use flow::{Flow, FlowInfo, PlannedStep};
pub use migrate::{MigrationReport, latest_version};
pub use operate::{Check, DeadLetter, Health, Requeued, WorkerInfo, WorkflowInfo};
pub use plugin::{
    Attempt, FailureInfo, LoggingPlugin, Plugin, RunOutcome, StepEvent, TaskEvent, WorkflowEvent,
};
pub use queue::QueueMetrics;
pub use retention::{Pruned, Retention};
pub use retry::{Backoff, RetryPolicy};
pub use run::{RunDetail, RunEvent, RunFilter, RunInfo, RunStatus, RunStep, RunSummary};
pub use schedule::{Fired, Missed, Overlap, Schedule, ScheduleChange, ScheduleInfo};
pub use task::{JobContext, Task};
pub use uuid::Uuid;
pub use worker::{WorkerBuilder, WorkerStats, shutdown_signal};
pub use workflow::{Step, WORKFLOW_QUEUE, WorkflowContext, WorkflowOptions};

/// The names most programs need: `use cairn::prelude::*;`.
pub mod prelude {
    pub use crate::{
        App, Backoff, Flow, HandlerError, JobContext, ResultExt, RetryPolicy, RunStatus, StepError,
        Task, WorkflowContext, WorkflowOptions,
    };
}

/// A boxed future: what type-erased handlers and `IntoFuture` impls return.
pub(crate) type BoxFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
