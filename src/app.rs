//! [`App`]: the handle to a cairn database, and its builder.

use std::future::{Future, IntoFuture};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgExecutor, PgPool};
use uuid::Uuid;

use crate::BoxFuture;
use crate::db;
use crate::error::{DbContext, Error, HandlerError, Result};
use crate::migrate::{self, MigrationReport};
use crate::plugin::{Plugin, Plugins};
use crate::queue::{QueueMetrics, validate_queue_name};
use crate::registry::{Registration, Registry};
use crate::run::{RunInfo, RunStatus};
use crate::task::{JobContext, Task};
use crate::worker::WorkerBuilder;
use crate::workflow::{self, WorkflowContext, WorkflowOptions};

/// The handle to a cairn database: migrates it, enqueues jobs, registers
/// handlers and starts workers. Cheap to clone.
#[derive(Clone)]
pub struct App {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    registry: RwLock<Registry>,
    plugins: RwLock<Vec<Arc<dyn Plugin>>>,
}

/// Builds an [`App`]: give it a database URL or an existing pool.
#[derive(Debug, Default)]
pub struct AppBuilder {
    url: Option<String>,
    pool: Option<PgPool>,
    max_connections: Option<u32>,
}

impl AppBuilder {
    /// The Postgres URL to connect to (`postgres://user@host:port/db`).
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Use an existing pool instead of a URL.
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// The pool size when connecting from a URL (default 10). A worker uses
    /// about three connections plus one outside the pool for LISTEN.
    pub fn max_connections(mut self, n: u32) -> Self {
        self.max_connections = Some(n);
        self
    }

    /// Connects (lazily checks nothing else): call [`App::initialize`] next.
    pub async fn build(self) -> Result<App> {
        let pool = match (self.pool, self.url) {
            (Some(pool), _) => pool,
            (None, Some(url)) => {
                let options: PgConnectOptions = url
                    .parse()
                    .map_err(|e| Error::InvalidArgument(format!("invalid database URL: {e}")))?;
                PgPoolOptions::new()
                    .max_connections(self.max_connections.unwrap_or(10))
                    // No ping before every use: it doubles the round trips,
                    // and cairn retries a call that meets a dead connection.
                    .test_before_acquire(false)
                    .connect_with(options.application_name("cairn"))
                    .await
                    .db("connecting to the database")?
            }
            (None, None) => {
                return Err(Error::InvalidArgument(
                    "App::builder() needs database_url(..) or pool(..)".into(),
                ));
            }
        };
        Ok(App {
            inner: Arc::new(Inner {
                pool,
                registry: RwLock::new(Registry::default()),
                plugins: RwLock::new(Vec::new()),
            }),
        })
    }
}

impl App {
    /// Starts building an `App`.
    pub fn builder() -> AppBuilder {
        AppBuilder::default()
    }

    /// The connection pool, for the caller's own queries and transactions.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Creates or upgrades schema `cairn`. Safe to call from many processes
    /// at once (they serialize on an advisory lock), a no-op when current.
    /// Fails with [`Error::SchemaTooNew`] when the database was migrated by a
    /// newer cairn, and with [`Error::MigrationEdited`] when a released
    /// migration was changed.
    pub async fn initialize(&self) -> Result<MigrationReport> {
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .db("connecting for migration")?;
        migrate::run(&mut conn).await
    }

    /// Creates a queue; a no-op if it exists.
    pub async fn create_queue(&self, queue: &str) -> Result<()> {
        validate_queue_name(queue)?;
        db::create_queue(self.pool(), queue).await
    }

    /// Drops a queue with its jobs, archive and dead letters. False if it
    /// did not exist.
    pub async fn drop_queue(&self, queue: &str) -> Result<bool> {
        validate_queue_name(queue)?;
        db::drop_queue(self.pool(), queue).await
    }

    /// Deletes every live job of a queue; returns how many.
    pub async fn purge_queue(&self, queue: &str) -> Result<i64> {
        validate_queue_name(queue)?;
        db::purge_queue(self.pool(), queue).await
    }

    /// One queue's counters.
    pub async fn metrics(&self, queue: &str) -> Result<QueueMetrics> {
        validate_queue_name(queue)?;
        db::metrics(self.pool(), queue).await
    }

    /// Every queue's counters.
    pub async fn metrics_all(&self) -> Result<Vec<QueueMetrics>> {
        db::metrics_all(self.pool()).await
    }

    /// Puts a dead-lettered job back on its queue with a fresh attempt count.
    /// False if there is no such dead letter.
    pub async fn requeue(&self, queue: &str, id: i64) -> Result<bool> {
        validate_queue_name(queue)?;
        db::requeue(self.pool(), queue, id).await
    }

    /// Registers the handler of task `T`, whose type the closure's first
    /// argument names. Fails if `T`'s names are invalid or `T` already has a
    /// handler.
    ///
    /// ```no_run
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Serialize, Deserialize)] struct SendEmail { to: String }
    /// # impl cairn::Task for SendEmail { const QUEUE: &'static str = "emails"; type Output = (); }
    /// # async fn demo(app: cairn::App) -> cairn::Result<()> {
    /// app.task(|email: SendEmail, _ctx| async move {
    ///     println!("sending to {}", email.to);
    ///     Ok(())
    /// })?;
    /// # Ok(()) }
    /// ```
    pub fn task<T, F, Fut>(&self, handler: F) -> Result<()>
    where
        T: Task,
        F: Fn(T, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T::Output, HandlerError>> + Send + 'static,
    {
        self.inner
            .registry
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .register(handler)
    }

    pub(crate) fn registrations_for(&self, queue: &str) -> Vec<Arc<Registration>> {
        self.inner
            .registry
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .for_queue(queue)
    }

    /// Registers workflow `name`: an async function of a [`WorkflowContext`]
    /// and a serde-typed input, returning a serde-typed output. Its runs go to
    /// the queue `workflows` unless a start names another; serve it with
    /// `app.worker().queues(["workflows"])`. See also
    /// [`workflow_with`](Self::workflow_with).
    ///
    /// ```no_run
    /// # async fn demo(app: cairn::App) -> cairn::Result<()> {
    /// app.workflow("greet", |ctx: cairn::WorkflowContext, name: String| async move {
    ///     let greeting: String = ctx
    ///         .step("compose", name, |n| async move { Ok(format!("hello {n}")) })
    ///         .await?;
    ///     ctx.sleep(std::time::Duration::from_secs(3600)).await; // durable
    ///     Ok(greeting)
    /// })?;
    /// # Ok(()) }
    /// ```
    pub fn workflow<I, O, F, Fut>(&self, name: &str, f: F) -> Result<()>
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(WorkflowContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    {
        self.workflow_with(name, WorkflowOptions::default(), f)
    }

    /// [`workflow`](Self::workflow) with options: its queue, its steps'
    /// default retry policy and timeout, its maximum run duration.
    pub fn workflow_with<I, O, F, Fut>(
        &self,
        name: &str,
        options: WorkflowOptions,
        f: F,
    ) -> Result<()>
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(WorkflowContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    {
        let def = workflow::WorkflowDef {
            run: workflow::erase(name, f),
            options,
        };
        self.inner
            .registry
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .register_workflow(name, def)
    }

    pub(crate) fn workflows(&self) -> Vec<Arc<Registration>> {
        self.inner
            .registry
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .workflows()
    }

    /// Starts a run of `workflow` with `input`; resolves to its id. Options:
    /// [`idempotency_key`](Start::idempotency_key), [`queue`](Start::queue),
    /// [`priority`](Start::priority), [`delay`](Start::delay),
    /// [`run_at`](Start::run_at); [`execute`](Start::execute) starts it
    /// inside your own transaction.
    pub fn start<'a, I: Serialize + Sync>(
        &'a self,
        workflow: &'a str,
        input: &'a I,
    ) -> Start<'a, I> {
        Start {
            app: self,
            workflow,
            input,
            key: None,
            queue: None,
            priority: 0,
            delay: Duration::ZERO,
            run_at: None,
            traceparent: None,
        }
    }

    /// Waits until the run ends; its output, or [`Error::RunFailed`] /
    /// [`Error::RunCancelled`].
    pub async fn result<T: DeserializeOwned>(&self, run: Uuid) -> Result<T> {
        let mut pause = Duration::from_millis(5);
        loop {
            let status = db::run_status(self.pool(), run).await?;
            match status.status {
                RunStatus::Completed => {
                    let output = status.output.unwrap_or_else(|| "null".into());
                    return serde_json::from_str(&output).map_err(|source| Error::Deserialize {
                        what: "the run's output",
                        source,
                    });
                }
                RunStatus::Failed => {
                    return Err(Error::RunFailed {
                        run,
                        error: status.error.unwrap_or_default(),
                    });
                }
                RunStatus::Cancelled => return Err(Error::RunCancelled(run)),
                _ => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(250));
                }
            }
        }
    }

    /// A run's status, output or error, and timings.
    pub async fn run_status(&self, run: Uuid) -> Result<RunInfo> {
        db::run_status(self.pool(), run).await
    }

    /// Delivers signal `name` with `payload` to a run. Fails with
    /// [`Error::NotFound`] for an unknown run and [`Error::InvalidState`] for
    /// a finished one.
    pub async fn send_signal<P: Serialize>(
        &self,
        run: Uuid,
        name: &str,
        payload: &P,
    ) -> Result<i64> {
        let payload = serde_json::to_string(payload).map_err(|source| Error::Serialize {
            what: "the signal's payload",
            source,
        })?;
        db::send_signal(self.pool(), run, name, &payload).await
    }

    /// Cancels a run and its child runs; returns how many were still active.
    pub async fn cancel_run(&self, run: Uuid) -> Result<i32> {
        db::cancel_run(self.pool(), run).await
    }

    /// Runs a failed run again from its failed step (completed steps are
    /// kept). False if the run is not failed.
    pub async fn retry_run(&self, run: Uuid) -> Result<bool> {
        db::retry_run(self.pool(), run).await
    }

    /// Enqueues one job of task `T`. Await it to enqueue on the pool, or
    /// call [`execute`](Enqueue::execute) with your own transaction so the job
    /// exists if and only if your transaction commits.
    pub fn enqueue<'a, T: Task>(&'a self, task: &'a T) -> Enqueue<'a, T> {
        Enqueue {
            app: self,
            tasks: std::slice::from_ref(task),
            delay: Duration::ZERO,
            priority: 0,
            traceparent: None,
        }
    }

    /// Enqueues many jobs of task `T` in one round trip per 10,000 jobs;
    /// resolves to their ids in order. Same options as [`enqueue`](Self::enqueue).
    pub fn enqueue_batch<'a, T: Task>(&'a self, tasks: &'a [T]) -> EnqueueBatch<'a, T> {
        EnqueueBatch(Enqueue {
            app: self,
            tasks,
            delay: Duration::ZERO,
            priority: 0,
            traceparent: None,
        })
    }

    /// Adds a plugin; its hooks run after those of plugins added before.
    /// Workers started afterwards call it.
    pub fn plugin(&self, plugin: impl Plugin) {
        self.inner
            .plugins
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Arc::new(plugin));
    }

    pub(crate) fn plugins(&self) -> Plugins {
        Plugins::new(
            self.inner
                .plugins
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        )
    }

    /// A worker over this app's registered tasks; see [`WorkerBuilder`].
    pub fn worker(&self) -> WorkerBuilder {
        WorkerBuilder::new(self.clone())
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

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
        let payload = serde_json::to_string(&self.tasks[0]).map_err(|source| Error::Serialize {
            what: "the job's arguments",
            source,
        })?;
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
            .map(|t| {
                serde_json::to_string(t).map_err(|source| Error::Serialize {
                    what: "the job's arguments",
                    source,
                })
            })
            .collect()
    }
}

impl<'a, T: Task + Sync> IntoFuture for Enqueue<'a, T> {
    type Output = Result<i64>;
    type IntoFuture = BoxFuture<'a, Result<i64>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let pool = self.app.pool().clone();
            self.execute(&pool).await
        })
    }
}

/// A pending enqueue of many jobs; see [`App::enqueue_batch`].
#[must_use = "an enqueue does nothing until awaited or executed"]
pub struct EnqueueBatch<'a, T>(Enqueue<'a, T>);

/// The largest batch sent in one call.
const BATCH_CHUNK: usize = 10_000;

impl<'a, T: Task> EnqueueBatch<'a, T> {
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
            ids.extend(
                db::send_batch(
                    &mut *conn,
                    T::QUEUE,
                    T::NAME,
                    chunk,
                    self.0.delay,
                    self.0.priority,
                )
                .await?,
            );
        }
        Ok(ids)
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
}

impl<'a, I: Serialize + Sync> Start<'a, I> {
    /// Starting again with the same key returns the same run and starts no
    /// second one (per workflow; 1 to 512 characters).
    pub fn idempotency_key(mut self, key: &'a str) -> Self {
        self.key = Some(key);
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
        let input = serde_json::to_string(self.input).map_err(|source| Error::Serialize {
            what: "the workflow's input",
            source,
        })?;
        let delay = match self.run_at {
            Some(t) => (t - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO),
            None => self.delay,
        };
        let traceparent = self.traceparent.or_else(current_traceparent);
        db::start_workflow(
            executor,
            self.workflow,
            &input,
            self.key,
            self.queue,
            self.priority,
            delay,
            traceparent.as_deref(),
        )
        .await
    }
}

impl<'a, I: Serialize + Sync> IntoFuture for Start<'a, I> {
    type Output = Result<Uuid>;
    type IntoFuture = BoxFuture<'a, Result<Uuid>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let pool = self.app.pool().clone();
            self.execute(&pool).await
        })
    }
}

/// The current OpenTelemetry context as a W3C `traceparent`, if it has a span.
#[cfg(feature = "otel")]
fn current_traceparent() -> Option<String> {
    crate::otel::traceparent_of(&opentelemetry::Context::current())
}

#[cfg(not(feature = "otel"))]
fn current_traceparent() -> Option<String> {
    None
}
