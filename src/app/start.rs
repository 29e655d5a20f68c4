//! Starting workflow runs: [`Start`], from [`App::start`].

use std::future::IntoFuture;
use std::time::Duration;

use serde::Serialize;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::{App, serialize};
use crate::BoxFuture;
use crate::db::{self, NewRun};
use crate::error::Result;
use crate::trace::current_traceparent;

/// What starting a run with an idempotency key that already names a run
/// means; see [`Start::on_conflict`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnConflict {
    /// The existing run is returned if it was started with the same input,
    /// queue and priority (a retried start); otherwise the start fails with
    /// [`Error::Conflict`](crate::Error::Conflict) naming what differs. The default.
    #[default]
    Reject,
    /// The existing run is returned, whatever it was started with.
    ReturnExisting,
}

/// A pending start of a workflow run; see [`App::start`].
#[must_use = "a start does nothing until awaited or executed"]
pub struct Start<'a, I> {
    app: &'a App,
    workflow: &'a str,
    input: &'a I,
    key: Option<&'a str>,
    queue: Option<&'a str>,
    priority: i16,
    delay: Duration,
    run_at: Option<chrono::DateTime<chrono::Utc>>,
    traceparent: Option<String>,
    conflict: OnConflict,
}

impl<'a, I: Serialize + Sync> Start<'a, I> {
    pub(crate) fn new(app: &'a App, workflow: &'a str, input: &'a I) -> Self {
        Self {
            app,
            workflow,
            input,
            key: None,
            queue: None,
            priority: 0,
            delay: Duration::ZERO,
            run_at: None,
            traceparent: None,
            conflict: OnConflict::Reject,
        }
    }
    /// Starting again with the same key returns the same run and starts no
    /// second one (per workflow; 1 to 512 characters). A start with the same
    /// key but another input, queue or priority fails with
    /// [`Error::Conflict`](crate::Error::Conflict) unless [`on_conflict`](Self::on_conflict) says
    /// otherwise.
    pub fn idempotency_key(mut self, key: &'a str) -> Self {
        self.key = Some(key);
        self
    }

    /// What an idempotency key that already names a run started with other
    /// arguments means (default [`OnConflict::Reject`]).
    pub fn on_conflict(mut self, conflict: OnConflict) -> Self {
        self.conflict = conflict;
        self
    }

    /// The queue for this run's job (default: the workflow's, `workflows`).
    pub fn queue(mut self, queue: &'a str) -> Self {
        self.queue = Some(queue);
        self
    }

    /// Lower runs first (default 0).
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Start only after `delay`.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Start at `time` (measured against this machine's clock when the call
    /// is made; the database clock decides from then on). A past time starts
    /// at once.
    pub fn run_at(mut self, time: chrono::DateTime<chrono::Utc>) -> Self {
        self.run_at = Some(time);
        self
    }

    /// The producer's W3C trace context; the run's spans continue it. With
    /// the `otel` feature it defaults to the current OpenTelemetry context.
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// Starts the run on the given executor: a pool, a connection, or
    /// `&mut *tx` — the run exists if and only if your transaction commits.
    pub async fn execute(self, executor: impl PgExecutor<'_>) -> Result<Uuid> {
        let app = self.app;
        self.send(app.db().on(executor)).await
    }

    async fn send(self, executor: impl PgExecutor<'_>) -> Result<Uuid> {
        let input = serialize(self.input, "the workflow's input")?;
        let delay = match self.run_at {
            Some(t) => (t - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO),
            None => self.delay,
        };
        let traceparent = self.traceparent.clone().or_else(current_traceparent);
        db::start_workflow(
            executor,
            NewRun {
                workflow: self.workflow,
                input: &input,
                idempotency_key: self.key,
                queue: self.queue,
                priority: self.priority,
                delay,
                traceparent: traceparent.as_deref(),
                conflict: match self.conflict {
                    OnConflict::Reject => "reject",
                    OnConflict::ReturnExisting => "return",
                },
            },
        )
        .await
    }
}

impl<'a, I: Serialize + Sync> IntoFuture for Start<'a, I> {
    type Output = Result<Uuid>;
    type IntoFuture = BoxFuture<'a, Result<Uuid>>;

    /// Starts the run on the app's pool. A workflow this app defines but
    /// has not announced yet (no `initialize`, no worker) is announced first.
    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let app = self.app;
            if app.unannounced(self.workflow) {
                // Best effort: a producer-only role may not register; the
                // start then says what is missing.
                if app.register_workflows().await.is_err() {
                    tracing::debug!(workflow = self.workflow, "could not announce the workflow");
                }
            }
            self.send(app.db()).await
        })
    }
}
