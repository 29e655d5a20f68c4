//! The public API: [`App`], the handle to a cairn database, and its
//! builder; the pending writes it returns ([`Enqueue`], [`Start`], [`Call`])
//! live in the files beside this one.

mod call;
mod ended;
mod enqueue;
mod flows;
mod operate;
mod schedules;
mod start;

pub use call::Call;
pub use enqueue::{Enqueue, EnqueueBatch};
pub use start::{OnConflict, Start};

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

use crate::db;
use crate::error::{DbContext, Error, HandlerError, Result};
use crate::json;
use crate::migrate::{self, MigrationReport};
use crate::plugin::{Plugin, PluginList};
use crate::pooler::{Db, Via};
use crate::queue::{QueueMetrics, validate_queue_name};
use crate::registry::{Handlers, Registration};
use crate::retention::{Pruned, Retention};
use crate::run::{RunDetail, RunEvent, RunFilter, RunInfo, RunStatus, RunStep, RunSummary};
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
    db: Db,
    registry: Handlers,
    plugins: PluginList,
    /// Workflows this app has announced to the database.
    announced: Mutex<HashSet<String>>,
    /// Flows to store at `initialize`.
    flows: Mutex<Vec<crate::flow::Flow>>,
    /// Wakes `result` when a run ends.
    ended: Arc<ended::RunEnded>,
}

/// Builds an [`App`]: give it a database URL or an existing pool.
#[derive(Debug, Default)]
pub struct AppBuilder {
    url: Option<String>,
    pool: Option<PgPool>,
    max_connections: Option<u32>,
    direct_url: Option<String>,
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

    /// The database URL (or pool) goes through a pooler in transaction mode,
    /// such as PgBouncer with `pool_mode = transaction`; `direct_url` reaches
    /// Postgres itself. cairn then sends every statement unnamed inside a
    /// transaction of its own (or of yours, with `execute`), so no prepared
    /// statement outlives the server connection it was made on; `LISTEN`
    /// (workers' wake-ups, [`App::result`]) and [`App::initialize`] connect
    /// to `direct_url`, as they need a session.
    pub fn transaction_pooler(mut self, direct_url: impl Into<String>) -> Self {
        self.direct_url = Some(direct_url.into());
        self
    }

    /// Connects (lazily checks nothing else): call [`App::initialize`] next.
    pub async fn build(self) -> Result<App> {
        let parse = |url: &str| -> Result<PgConnectOptions> {
            url.parse()
                .map_err(|e| Error::InvalidArgument(format!("invalid database URL: {e}")))
        };
        let direct = match &self.direct_url {
            Some(url) => Some(parse(url)?.application_name("cairn")),
            None => None,
        };
        let pool = match (self.pool, self.url) {
            (Some(pool), _) => pool,
            (None, Some(url)) => {
                let options = parse(&url)?;
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
                db: Db::new(pool, direct),
                registry: Handlers::default(),
                plugins: PluginList::default(),
                announced: Mutex::new(HashSet::new()),
                flows: Mutex::default(),
                ended: Arc::default(),
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
        self.inner.db.pool()
    }

    /// The pool as cairn's own calls use it.
    pub(crate) fn db(&self) -> &Db {
        &self.inner.db
    }

    /// Creates or upgrades schema `cairn`, announces the workflows and step
    /// handlers registered so far (so producers can start them before any
    /// worker has run), and stores the flows added with [`flow`](Self::flow). Safe to call from many processes at once (they serialize
    /// on an advisory lock), a no-op when current.
    ///
    /// It refuses a schema `cairn` that another role owns or has put
    /// objects in ([`Error::UnsafeSchema`]), a database migrated by a newer
    /// cairn ([`Error::SchemaTooNew`], [`Error::FunctionsTooNew`]), and a
    /// released migration that was changed ([`Error::MigrationEdited`]).
    /// What it finds changed since the last install — a function's body,
    /// settings or grants, a dropped function or index, a trigger someone
    /// added — it puts back, and says so in [`MigrationReport::repaired`].
    pub async fn initialize(&self) -> Result<MigrationReport> {
        let report = self
            .in_own_session("connecting for migration", |conn| {
                Box::pin(migrate::run(conn))
            })
            .await?;
        self.register_workflows().await?;
        self.register_flows().await?;
        Ok(report)
    }

    /// Runs `work` on one session throughout (a migration's advisory lock,
    /// the schema check's read-only transaction): a connection of the pool,
    /// or behind a transaction pooler, one made to Postgres directly.
    pub(crate) async fn in_own_session<T>(
        &self,
        connecting: &'static str,
        work: impl for<'c> FnOnce(&'c mut PgConnection) -> crate::BoxFuture<'c, Result<T>>,
    ) -> Result<T> {
        if let Some(direct) = self.db().direct() {
            let mut conn = PgConnection::connect_with(direct).await.db(connecting)?;
            let done = work(&mut conn).await;
            let _ = conn.close().await;
            done
        } else {
            let mut conn = self.pool().acquire().await.db(connecting)?;
            work(&mut conn).await
        }
    }

    /// Announces this app's workflows to the database (creating their
    /// queues), so `cairn.start_workflow` accepts their names.
    /// [`initialize`](Self::initialize) and workers do it; call it yourself
    /// after registering workflows later. Needs the `cairn_worker` role.
    pub async fn register_workflows(&self) -> Result<()> {
        for w in self.workflows() {
            db::create_queue(self.db(), &w.queue).await?;
            db::register_workflow(self.db(), &w.name, &w.queue).await?;
            self.announced(&w.name);
        }
        Ok(())
    }

    pub(crate) fn announced(&self, workflow: &str) {
        self.inner
            .announced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(workflow.to_owned());
    }

    /// Whether this app defines `workflow` but has not announced it yet.
    pub(crate) fn unannounced(&self, workflow: &str) -> bool {
        let known = self.inner.registry.read().is_workflow(workflow);
        known
            && !self
                .inner
                .announced
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(workflow)
    }

    /// Creates a queue; a no-op if it exists.
    pub fn create_queue(&self, queue: &str) -> Call<'_, ()> {
        let queue = queue.to_owned();
        self.call(validate_queue_name(&queue), move |conn| {
            Box::pin(async move { db::create_queue(conn, &queue).await })
        })
    }

    /// Drops a queue with its jobs, archive and dead letters; runs driven by
    /// its jobs fail. False if it did not exist.
    pub fn drop_queue(&self, queue: &str) -> Call<'_, bool> {
        let queue = queue.to_owned();
        self.call(validate_queue_name(&queue), move |conn| {
            Box::pin(async move { db::drop_queue(conn, &queue).await })
        })
    }

    /// Deletes every live job of a queue; returns how many. Runs driven by
    /// those jobs fail, and steps run as those jobs fail.
    pub fn purge_queue(&self, queue: &str) -> Call<'_, i64> {
        let queue = queue.to_owned();
        self.call(validate_queue_name(&queue), move |conn| {
            Box::pin(async move { db::purge_queue(conn, &queue).await })
        })
    }

    /// Deletes the `limit` (1 to 100,000) oldest live jobs of a queue, as
    /// [`purge_queue`](Self::purge_queue) deletes all: call it until it
    /// returns less than `limit` to empty a queue too big for one
    /// transaction. Returns how many.
    pub fn purge_queue_batch(&self, queue: &str, limit: u32) -> Call<'_, i64> {
        let queue = queue.to_owned();
        let valid = validate_queue_name(&queue).and_then(|()| {
            if (1..=100_000).contains(&limit) {
                Ok(())
            } else {
                Err(Error::InvalidArgument(format!(
                    "limit must be between 1 and 100000, got {limit}"
                )))
            }
        });
        self.call(valid, move |conn| {
            Box::pin(async move { db::purge_queue_batch(conn, &queue, limit).await })
        })
    }

    /// Deletes one live job, leased or not (an operator's tool). A run it
    /// drives fails; a step it runs fails. False if there is no such job.
    pub fn delete_job(&self, queue: &str, id: i64) -> Call<'_, bool> {
        let queue = queue.to_owned();
        self.call(validate_queue_name(&queue), move |conn| {
            Box::pin(async move { db::delete(conn, &queue, id).await })
        })
    }

    /// One queue's counters.
    pub async fn metrics(&self, queue: &str) -> Result<QueueMetrics> {
        validate_queue_name(queue)?;
        db::metrics(self.db(), queue).await
    }

    /// Every queue's counters.
    pub async fn metrics_all(&self) -> Result<Vec<QueueMetrics>> {
        db::metrics_all(self.db()).await
    }

    /// Puts a dead-lettered job back on its queue with a fresh attempt count.
    /// The dead job of a failed run revives the run (as
    /// [`retry_run`](Self::retry_run) does); a dead step job is refused with
    /// [`Error::InvalidState`] (retry its run). False if there is no such
    /// dead letter.
    pub fn requeue(&self, queue: &str, id: i64) -> Call<'_, bool> {
        let queue = queue.to_owned();
        self.call(validate_queue_name(&queue), move |conn| {
            Box::pin(async move { db::requeue(conn, &queue, id).await })
        })
    }

    /// Sets how long finished runs and archived jobs are kept (the default is
    /// [`Retention::default`]: 7 days for completed work, 30 for failures).
    /// Workers prune what is older in the background. Needs `cairn_admin`.
    pub fn set_retention(&self, keep: Retention) -> Call<'_, ()> {
        Call::new(self.db(), move |conn| {
            Box::pin(async move { db::set_retention(conn, keep).await })
        })
    }

    /// The retention windows in force.
    pub async fn retention(&self) -> Result<Retention> {
        db::retention(self.db()).await
    }

    /// Deletes one batch (up to 500 runs and 500 archived jobs) of finished
    /// work older than the retention windows, and says how much; call it
    /// again while it finds a full batch. Workers do this on their own; this
    /// is for an operator, or an installation that runs no worker.
    pub async fn prune(&self) -> Result<Pruned> {
        db::prune(self.db(), crate::worker::PRUNE_BATCH).await
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
        self.inner.registry.write().register(handler)
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
        self.inner.registry.write().register_workflow(name, def)
    }

    pub(crate) fn workflows(&self) -> Vec<Arc<Registration>> {
        self.inner.registry.read().workflows()
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
        Start::new(self, workflow, input)
    }

    /// Waits until the run ends; its output, or [`Error::RunFailed`] /
    /// [`Error::RunCancelled`]. Woken by the database's notification when
    /// the run ends (one shared `LISTEN` connection per app), with a read
    /// of the run's status every half second should a notification be lost.
    pub async fn result<T: DeserializeOwned>(&self, run: Uuid) -> Result<T> {
        let ended = Arc::clone(&self.inner.ended);
        ended.listen(self.db()).await;
        let notify = ended.watch(run);
        loop {
            let woken = notify.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let status = db::run_status(self.db(), run).await?;
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
                    let _ = tokio::time::timeout(ended::RECHECK, woken).await;
                }
            }
        }
    }

    /// [`result`](Self::result), waiting at most `limit`:
    /// [`Error::NotEnded`] if the run is still going by then (it goes on).
    pub async fn result_within<T: DeserializeOwned>(
        &self,
        run: Uuid,
        limit: Duration,
    ) -> Result<T> {
        tokio::time::timeout(limit, self.result(run))
            .await
            .unwrap_or(Err(Error::NotEnded { run, waited: limit }))
    }

    /// Everything about one run: status, input, output, error, key, queue,
    /// parent and children, timings. [`Error::NotFound`] if there is none.
    pub async fn run(&self, run: Uuid) -> Result<RunDetail> {
        db::get_run(self.db(), run).await
    }

    /// Runs, newest first, narrowed by `filter` (the newest 100 by default).
    ///
    /// ```no_run
    /// # async fn demo(app: cairn::App) -> cairn::Result<()> {
    /// use cairn::{RunFilter, RunStatus};
    /// for run in app.list_runs(RunFilter::default().status(RunStatus::Failed).limit(20)).await? {
    ///     println!("{} {} {:?}", run.id, run.workflow, run.error);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn list_runs(&self, filter: RunFilter) -> Result<Vec<RunSummary>> {
        db::list_runs(self.db(), &filter).await
    }

    /// A run's status, output or error, and timings.
    pub async fn run_status(&self, run: Uuid) -> Result<RunInfo> {
        db::run_status(self.db(), run).await
    }

    /// A run's history, oldest first: every step attempt with its start, end,
    /// outcome and error, and the run's suspends, resumes, signals, failures,
    /// retries and cancellation. Nothing is erased by a retry.
    pub async fn run_history(&self, run: Uuid) -> Result<Vec<RunEvent>> {
        db::run_history(self.db(), run).await
    }

    /// A run's durable steps as they stand, in the order the run made them:
    /// each with its input, output, latest error, attempts and timing.
    pub async fn run_steps(&self, run: Uuid) -> Result<Vec<RunStep>> {
        db::run_steps(self.db(), run).await
    }

    /// Delivers signal `name` with `payload` to a run; resolves to the
    /// signal's id. Fails with [`Error::NotFound`] for an unknown run and
    /// [`Error::InvalidState`] for a finished one.
    pub fn send_signal<P: Serialize>(&self, run: Uuid, name: &str, payload: &P) -> Call<'_, i64> {
        let payload = serialize(payload, "the signal's payload");
        let name = name.to_owned();
        match payload {
            Ok(payload) => Call::new(self.db(), move |conn| {
                Box::pin(async move { db::send_signal(conn, run, &name, &payload).await })
            }),
            Err(e) => Call::failed(self.db(), e),
        }
    }

    /// Cancels a run and its child runs; resolves to how many were still
    /// active. Once it commits, no step of theirs starts; one already running
    /// is stopped within a heartbeat.
    pub fn cancel_run(&self, run: Uuid) -> Call<'_, i32> {
        Call::new(self.db(), move |conn| {
            Box::pin(async move { db::cancel_run(conn, run).await })
        })
    }

    /// Runs a failed run again from its failed step (completed steps are
    /// kept; the failure stays in its history). False if the run is not
    /// failed.
    pub fn retry_run(&self, run: Uuid) -> Call<'_, bool> {
        Call::new(self.db(), move |conn| {
            Box::pin(async move { db::retry_run(conn, run).await })
        })
    }

    /// Enqueues one job of task `T`. Await it to enqueue on the pool, or
    /// call [`execute`](Enqueue::execute) with your own transaction so the job
    /// exists if and only if your transaction commits.
    pub fn enqueue<'a, T: Task>(&'a self, task: &'a T) -> Enqueue<'a, T> {
        Enqueue::new(self, std::slice::from_ref(task))
    }

    /// Enqueues many jobs of task `T` in one round trip per 10,000 jobs;
    /// resolves to their ids in order. Same options as [`enqueue`](Self::enqueue).
    pub fn enqueue_batch<'a, T: Task>(&'a self, tasks: &'a [T]) -> EnqueueBatch<'a, T> {
        EnqueueBatch::new(self, tasks)
    }

    /// Adds a plugin; its hooks run after those of plugins added before.
    /// Workers started afterwards call it.
    pub fn plugin(&self, plugin: impl Plugin) {
        self.inner.plugins.add(plugin);
    }

    /// A worker over this app's registered tasks; see [`WorkerBuilder`].
    pub fn worker(&self) -> WorkerBuilder {
        WorkerBuilder::new(
            self.db().clone(),
            self.inner.registry.clone(),
            self.inner.plugins.clone(),
        )
    }

    fn call<T: Send + 'static>(
        &self,
        checked: Result<()>,
        op: impl for<'c> FnOnce(Via<&'c mut sqlx::PgConnection>) -> crate::BoxFuture<'c, Result<T>>
        + Send
        + 'static,
    ) -> Call<'_, T> {
        match checked {
            Ok(()) => Call::new(self.db(), op),
            Err(e) => Call::failed(self.db(), e),
        }
    }
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

/// Serializes a value bound for the database, and checks the JSON limits.
pub(crate) fn serialize<T: Serialize + ?Sized>(value: &T, what: &'static str) -> Result<String> {
    let text = serde_json::to_string(value).map_err(|source| Error::Serialize { what, source })?;
    match json::problem(&text) {
        None => Ok(text),
        Some(problem) => Err(Error::InvalidArgument(format!("{what} {problem}"))),
    }
}
