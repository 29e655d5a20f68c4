//! # cairn
//!
//! Durable queues (and, next, workflows) that live inside PostgreSQL, with a
//! thin Rust worker. All queueing, leasing and retry scheduling are tables
//! and stored functions in schema `cairn`; any client can enqueue with
//! `SELECT cairn.send('emails', '{"to": "a@b.c"}')`.
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct SendEmail {
//!     to: String,
//! }
//!
//! impl cairn::Task for SendEmail {
//!     const QUEUE: &'static str = "emails";
//!     type Output = ();
//! }
//!
//! # async fn demo() -> cairn::Result<()> {
//! let app = cairn::App::builder()
//!     .database_url("postgres://postgres@127.0.0.1/postgres")
//!     .build()
//!     .await?;
//! app.initialize().await?; // creates or upgrades schema `cairn`
//! app.create_queue("emails").await?;
//! app.task(|email: SendEmail, _ctx| async move {
//!     println!("sending to {}", email.to);
//!     Ok(())
//! })?;
//! app.enqueue(&SendEmail { to: "a@b.c".into() }).await?;
//! app.worker().queues(["emails"]).concurrency(32).run().await?;
//! # Ok(()) }
//! ```
//!
//! Delivery is at-least-once: a job whose worker dies runs again once its
//! lease runs out, so give outside systems [`JobContext::idempotency_key`].
//! Completions are fenced by the lease, so a worker that lost its lease can
//! never complete a job someone else now holds.
#![warn(missing_docs)]

mod app;
mod call;
mod db;
mod enqueue;
mod error;
mod json;
mod migrate;
#[cfg(feature = "otel")]
pub mod otel;
mod plugin;
mod queue;
mod registry;
mod retry;
mod run;
mod start;
mod task;
mod trace;
mod worker;
mod workflow;

pub use app::{App, AppBuilder};
pub use call::Call;
pub use enqueue::{Enqueue, EnqueueBatch};
pub use error::{Error, HandlerError, HandlerErrorKind, Result, ResultExt, StepError};
pub use migrate::{MigrationReport, latest_version};
pub use plugin::{
    FailureInfo, LoggingPlugin, Plugin, RunOutcome, StepEvent, TaskEvent, WorkflowEvent,
};
pub use queue::QueueMetrics;
pub use retry::{Backoff, RetryPolicy};
pub use run::{RunEvent, RunInfo, RunStatus};
pub use start::{OnConflict, Start};
pub use task::{JobContext, Task};
pub use uuid::Uuid;
pub use worker::{WorkerBuilder, WorkerStats};
pub use workflow::{Step, WORKFLOW_QUEUE, WorkflowContext, WorkflowOptions};

/// The names most programs need: `use cairn::prelude::*;`.
pub mod prelude {
    pub use crate::{
        App, Backoff, HandlerError, JobContext, ResultExt, RetryPolicy, RunStatus, StepError, Task,
        WorkflowContext, WorkflowOptions,
    };
}

/// A boxed future: what type-erased handlers and `IntoFuture` impls return.
pub(crate) type BoxFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
