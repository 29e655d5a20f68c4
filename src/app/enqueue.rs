//! Enqueueing jobs: [`Enqueue`] and [`EnqueueBatch`], from
//! [`App::enqueue`] and [`App::enqueue_batch`].

use std::future::IntoFuture;
use std::time::Duration;

use sqlx::PgExecutor;

use super::{App, serialize};
use crate::BoxFuture;
use crate::db;
use crate::error::{DbContext, Result};
use crate::task::Task;
use crate::trace::current_traceparent;

/// A pending enqueue of one job; see [`App::enqueue`].
#[must_use = "an enqueue does nothing until awaited or executed"]
pub struct Enqueue<'a, T> {
    app: &'a App,
    tasks: &'a [T],
    delay: Duration,
    priority: i16,
    traceparent: Option<String>,
}

impl<'a, T: Task> Enqueue<'a, T> {
    pub(crate) fn new(app: &'a App, tasks: &'a [T]) -> Self {
        Self {
            app,
            tasks,
            delay: Duration::ZERO,
            priority: 0,
            traceparent: None,
        }
    }

    /// Make the job visible only after `delay` (default none; at most 10 years).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Lower runs first (default 0).
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// The producer's W3C trace context (`00-<trace>-<span>-<flags>`), so
    /// the trace continues in the worker that runs the job. With the `otel`
    /// feature it defaults to the current OpenTelemetry context.
    pub fn traceparent(mut self, traceparent: impl Into<String>) -> Self {
        self.traceparent = Some(traceparent.into());
        self
    }

    /// Enqueues on the given executor: a pool, a connection, or `&mut *tx`.
    pub async fn execute(self, executor: impl PgExecutor<'_>) -> Result<i64> {
        let app = self.app;
        self.send(app.db().on(executor)).await
    }

    async fn send(self, executor: impl PgExecutor<'_>) -> Result<i64> {
        let payload = serialize(&self.tasks[0], "the job's arguments")?;
        let traceparent = self.traceparent.or_else(current_traceparent);
        db::send(
            executor,
            T::QUEUE,
            T::NAME,
            &payload,
            self.delay,
            self.priority,
            traceparent.as_deref(),
        )
        .await
    }

    fn payloads(&self) -> Result<Vec<String>> {
        self.tasks
            .iter()
            .map(|t| serialize(t, "the job's arguments"))
            .collect()
    }
}

impl<'a, T: Task + Sync> IntoFuture for Enqueue<'a, T> {
    type Output = Result<i64>;
    type IntoFuture = BoxFuture<'a, Result<i64>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let app = self.app;
            self.send(app.db()).await
        })
    }
}

/// A pending enqueue of many jobs; see [`App::enqueue_batch`].
#[must_use = "an enqueue does nothing until awaited or executed"]
pub struct EnqueueBatch<'a, T>(Enqueue<'a, T>);

/// The largest batch sent in one call.
const BATCH_CHUNK: usize = 10_000;

impl<'a, T: Task> EnqueueBatch<'a, T> {
    pub(crate) fn new(app: &'a App, tasks: &'a [T]) -> Self {
        Self(Enqueue::new(app, tasks))
    }

    /// Make the jobs visible only after `delay`.
    pub fn delay(self, delay: Duration) -> Self {
        Self(self.0.delay(delay))
    }

    /// Lower runs first (default 0).
    pub fn priority(self, priority: i16) -> Self {
        Self(self.0.priority(priority))
    }

    /// Enqueues on the given connection or transaction (`&mut *tx`). Batches
    /// above 10,000 jobs take one call per 10,000; pass a transaction to make
    /// them all-or-nothing.
    pub async fn execute(self, conn: &mut sqlx::PgConnection) -> Result<Vec<i64>> {
        let payloads = self.0.payloads()?;
        let mut ids = Vec::with_capacity(payloads.len());
        for chunk in payloads.chunks(BATCH_CHUNK) {
            ids.extend(self.send(self.0.app.db().on(&mut *conn), chunk).await?);
        }
        Ok(ids)
    }

    /// One `cairn.send_batch` call of at most [`BATCH_CHUNK`] payloads.
    async fn send(&self, db: impl PgExecutor<'_>, payloads: &[String]) -> Result<Vec<i64>> {
        db::send_batch(
            db,
            T::QUEUE,
            T::NAME,
            payloads,
            self.0.delay,
            self.0.priority,
        )
        .await
    }
}

impl<'a, T: Task + Sync> IntoFuture for EnqueueBatch<'a, T> {
    type Output = Result<Vec<i64>>;
    type IntoFuture = BoxFuture<'a, Result<Vec<i64>>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            if self.0.tasks.is_empty() {
                return Ok(Vec::new());
            }
            if self.0.tasks.len() <= BATCH_CHUNK {
                // One statement is all-or-nothing by itself: no BEGIN and
                // COMMIT round trips around it.
                let payloads = self.0.payloads()?;
                return self.send(self.0.app.db(), &payloads).await;
            }
            let mut tx = self
                .0
                .app
                .pool()
                .begin()
                .await
                .db("starting a transaction")?;
            let ids = self.execute(&mut tx).await?;
            tx.commit().await.db("committing a batch enqueue")?;
            Ok(ids)
        })
    }
}
