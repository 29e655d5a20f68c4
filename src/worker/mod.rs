//! The pull worker: its builder, its lifecycle and its shutdown.
//!
//! One part per file:
//! - [`claimer`]: claim loops lease jobs up to the free capacity;
//! - [`executor`]: runs each job (a task's handler or a workflow run's replay);
//! - [`completer`]: settles finished jobs in batches, and starts the flow
//!   steps their acks took;
//! - [`heartbeat`]: extends leases, and stops the handlers of jobs whose lease
//!   was lost (the job ran out and was claimed elsewhere, or its run was
//!   cancelled);
//! - [`listener`]: `LISTEN` for wake-ups, with a jittered poll as fallback;
//! - [`presence`]: keeps this worker's row in `cairn.workers` (who runs,
//!   serving what, since when);
//! - [`pruner`]: deletes finished runs and archived jobs past their
//!   retention window;
//! - [`scheduler`]: fires due schedule ticks.
//!
//! Every settlement is fenced by the job's lease, so racing with a
//! redelivery can never double-complete.

mod claimer;
mod completer;
mod executor;
mod heartbeat;
mod listener;
mod presence;
mod pruner;
mod scheduler;

pub(crate) use pruner::PRUNE_BATCH;
pub(crate) use scheduler::TICK_BATCH;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::pooler::Db;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use crate::db;
use crate::error::{Error, Result};
use crate::plugin::{PluginList, Plugins};
use crate::queue::validate_queue_name;
use crate::registry::{Handlers, Registration};

/// Configures and runs a worker; from [`App::worker`].
///
/// ```no_run
/// # async fn demo(app: cairn::App) -> cairn::Result<()> {
/// let stats = app.worker().queues(["emails"]).concurrency(32).run().await?;
/// println!("{} jobs completed", stats.completed);
/// # Ok(()) }
/// ```
pub struct WorkerBuilder {
    pool: Db,
    handlers: Handlers,
    plugins: PluginList,
    queues: Vec<String>,
    concurrency: usize,
    lease: Duration,
    poll_interval: Duration,
    shutdown_timeout: Duration,
    prune_interval: Option<Duration>,
    schedule_interval: Option<Duration>,
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerBuilder")
            .field("queues", &self.queues)
            .field("concurrency", &self.concurrency)
            .field("lease", &self.lease)
            .field("poll_interval", &self.poll_interval)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("prune_interval", &self.prune_interval)
            .field("schedule_interval", &self.schedule_interval)
            .finish_non_exhaustive()
    }
}

/// What a worker did, returned when it stops.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerStats {
    /// Jobs whose handler succeeded and whose completion was recorded.
    pub completed: u64,
    /// Failed attempts scheduled for another try.
    pub retried: u64,
    /// Jobs dead-lettered (fatal error, attempts exhausted, bad payload).
    pub dead: u64,
    /// Settlements refused because the lease had passed to another worker.
    pub refused: u64,
    /// Jobs given back unfinished at shutdown.
    pub released: u64,
    /// Times the LISTEN connection was re-established.
    pub listener_reconnects: u64,
    /// Claim round trips made (including those that found nothing).
    pub claims: u64,
    /// Flow steps started without a claim: the ack of the step before took
    /// them (`cairn.ack_and_take`).
    pub taken: u64,
}

impl WorkerBuilder {
    pub(crate) fn new(pool: Db, handlers: Handlers, plugins: PluginList) -> Self {
        Self {
            pool,
            handlers,
            plugins,
            queues: Vec::new(),
            concurrency: 16,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(30),
            prune_interval: Some(Duration::from_secs(60)),
            schedule_interval: Some(Duration::from_secs(1)),
        }
    }

    /// The queues to serve (required). Each must have a registered task; the
    /// worker creates missing queues when it starts.
    pub fn queues<I, S>(mut self, queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.queues = queues.into_iter().map(Into::into).collect();
        self
    }

    /// Jobs run at once (default 16, at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// How long a claim holds a job before another worker may take it
    /// (default 30 s). Running jobs are extended every third of it.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// The fallback poll period when no notification arrives (default 1 s,
    /// jittered by ±20 %).
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// On shutdown, how long to let running jobs finish before aborting and
    /// releasing them (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// How often the worker deletes finished runs and archived jobs past
    /// their retention window (default every minute, jittered; see
    /// [`App::set_retention`](crate::App::set_retention)); `None` leaves it
    /// to other workers or to [`App::prune`](crate::App::prune). One prune
    /// runs at a time across all workers, in batches of 500.
    pub fn prune_interval(mut self, every: impl Into<Option<Duration>>) -> Self {
        self.prune_interval = every.into().filter(|d| !d.is_zero());
        self
    }

    /// How often this worker fires due schedule ticks and the flow signal
    /// waits that timed out (default about once a second, jittered); `None`
    /// leaves them to other workers or to
    /// [`App::tick_schedules`](crate::App::tick_schedules). Workers split
    /// due schedules between them and each tick fires once.
    pub fn schedule_interval(mut self, every: impl Into<Option<Duration>>) -> Self {
        self.schedule_interval = every.into().filter(|d| !d.is_zero());
        self
    }

    /// Runs until SIGINT or SIGTERM, then shuts down gracefully.
    pub async fn run(self) -> Result<WorkerStats> {
        self.run_until(shutdown_signal()).await
    }

    /// Runs until `shutdown` completes, then shuts down gracefully: stops
    /// claiming, lets running jobs finish within the shutdown timeout, and
    /// releases the rest for other workers.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> Result<WorkerStats> {
        let plan = self.plan()?;
        for q in &plan {
            db::create_queue(&self.pool, &q.name).await?;
        }
        let (workflows, steps) = {
            let handlers = self.handlers.read();
            (handlers.workflows(), handlers.step_handlers())
        };
        for w in workflows {
            db::create_queue(&self.pool, &w.queue).await?;
            db::register_workflow(&self.pool, &w.name, &w.queue).await?;
        }
        for name in steps {
            db::register_step_handler(&self.pool, &name).await?;
        }
        Worker::new(self, plan).run(shutdown).await
    }

    fn plan(&self) -> Result<Vec<QueuePlan>> {
        if self.queues.is_empty() {
            return Err(Error::InvalidArgument(
                "the worker serves no queue: call .queues([..])".into(),
            ));
        }
        if self.lease < Duration::from_millis(100) || self.lease > Duration::from_secs(86_400) {
            return Err(Error::InvalidArgument(format!(
                "lease must be between 100 ms and 24 h, got {:?}",
                self.lease
            )));
        }
        let mut plans = Vec::new();
        for name in &self.queues {
            validate_queue_name(name)?;
            let handlers: HashMap<String, Arc<Registration>> = self
                .handlers
                .read()
                .for_queue(name)
                .into_iter()
                .map(|r| (r.name.clone(), r))
                .collect();
            if handlers.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "no task is registered for queue {name:?}; register one with App::task"
                )));
            }
            let tasks = handlers.keys().cloned().collect();
            plans.push(QueuePlan {
                name: name.clone(),
                tasks,
                handlers,
                cursor: Mutex::default(),
            });
        }
        Ok(plans)
    }
}

/// One served queue: its name and the handlers this worker has for it.
struct QueuePlan {
    name: String,
    /// Task names this worker can run; the claim takes only those.
    tasks: Vec<String>,
    handlers: HashMap<String, Arc<Registration>>,
    /// Where this worker's claims resume in the queue.
    cursor: Mutex<claimer::Cursor>,
}

impl QueuePlan {
    fn cursor(&self) -> std::sync::MutexGuard<'_, claimer::Cursor> {
        self.cursor.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM: what
/// [`WorkerBuilder::run`] waits for, and `cairn serve` too.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A job being run: what the heartbeat extends and shutdown releases.
struct Running {
    lease: i64,
    cancel: CancellationToken,
    abort: Option<AbortHandle>,
}

/// Jobs leased by this worker and not yet settled in the database.
#[derive(Default)]
struct InFlight(Mutex<HashMap<i64, Running>>);

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, Running>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops the handler of a job this worker no longer owns.
    fn abandon(&self, id: i64, lease: i64) -> bool {
        let mut map = self.lock();
        match map.get(&id) {
            Some(r) if r.lease == lease => {
                if let Some(r) = map.remove(&id) {
                    r.cancel.cancel();
                    if let Some(a) = r.abort {
                        a.abort();
                    }
                }
                true
            }
            _ => false,
        }
    }
}

#[derive(Default)]
struct Counters {
    completed: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    refused: AtomicU64,
    released: AtomicU64,
    listener_reconnects: AtomicU64,
    claims: AtomicU64,
    taken: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> WorkerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        WorkerStats {
            completed: get(&self.completed),
            retried: get(&self.retried),
            dead: get(&self.dead),
            refused: get(&self.refused),
            released: get(&self.released),
            listener_reconnects: get(&self.listener_reconnects),
            claims: get(&self.claims),
            taken: get(&self.taken),
        }
    }
}

struct Worker {
    pool: Db,
    /// The begins of steps its runs make at once, sent together.
    calls: crate::workflow::Calls,
    queues: Vec<QueuePlan>,
    /// The names of `queues`, and of the step handlers this worker has: what
    /// the ack of a flow step may take on.
    queue_names: Vec<String>,
    step_handlers: Vec<String>,
    concurrency: usize,
    lease: Duration,
    poll_interval: Duration,
    shutdown_timeout: Duration,
    prune_interval: Option<Duration>,
    schedule_interval: Option<Duration>,
    in_flight: Arc<InFlight>,
    counters: Arc<Counters>,
    plugins: Plugins,
}

impl Worker {
    fn new(b: WorkerBuilder, queues: Vec<QueuePlan>) -> Self {
        let plugins = b.plugins.snapshot();
        let step_handlers = b.handlers.read().step_handlers();
        Self {
            calls: crate::workflow::Calls::new(b.pool.clone()),
            pool: b.pool,
            queue_names: queues.iter().map(|q| q.name.clone()).collect(),
            step_handlers,
            queues,
            concurrency: b.concurrency,
            lease: b.lease,
            poll_interval: b.poll_interval,
            shutdown_timeout: b.shutdown_timeout,
            prune_interval: b.prune_interval,
            schedule_interval: b.schedule_interval,
            in_flight: Arc::default(),
            counters: Arc::default(),
            plugins,
        }
    }

    async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<WorkerStats> {
        let pool = self.pool.clone();
        let stop = CancellationToken::new();
        let wake = Arc::new(Notify::new());
        let names = self.queues.iter().map(|q| q.name.clone()).collect();

        let listener = tokio::spawn(listener::run(
            pool.clone(),
            names,
            Arc::clone(&wake),
            stop.clone(),
            Arc::clone(&self.counters),
        ));
        let heartbeat = tokio::spawn(heartbeat::run(
            pool.clone(),
            self.lease,
            Arc::clone(&self.in_flight),
            stop.clone(),
        ));
        let presence = tokio::spawn(presence::run(
            pool.clone(),
            presence::Presence {
                id: uuid::Uuid::new_v4(),
                host: presence::host_name(),
                queues: self.queues.iter().map(|q| q.name.clone()).collect(),
                handlers: {
                    let mut all: Vec<String> =
                        self.queues.iter().flat_map(|q| q.tasks.clone()).collect();
                    all.sort();
                    all.dedup();
                    all
                },
                concurrency: self.concurrency,
            },
            stop.clone(),
        ));
        let pruner = self
            .prune_interval
            .map(|every| tokio::spawn(pruner::run(pool.clone(), every, stop.clone())));
        let scheduler = self
            .schedule_interval
            .map(|every| tokio::spawn(scheduler::run(pool.clone(), every, stop.clone())));
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.concurrency));
        let closing = CancellationToken::new();
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let completer = tokio::spawn(Arc::clone(&this).complete_loop(
            settle_rx,
            settle_tx.downgrade(),
            Arc::clone(&slots),
            closing.clone(),
        ));

        // Several claim loops share the slots, so one claim is in flight
        // while another's jobs are being started: round trips overlap.
        let claimers: Vec<_> = (0..this.concurrency.min(claimer::CLAIMERS))
            .map(|i| {
                tokio::spawn(Arc::clone(&this).claim_loop(
                    i,
                    Arc::clone(&slots),
                    Arc::clone(&wake),
                    closing.clone(),
                    settle_tx.clone(),
                ))
            })
            .collect();
        shutdown.await;
        closing.cancel();
        for claimer in claimers {
            let _ = claimer.await;
        }

        // Graceful shutdown: no more claims; give running jobs the deadline.
        let all = u32::try_from(this.concurrency).unwrap_or(u32::MAX);
        let drained = tokio::time::timeout(this.shutdown_timeout, slots.acquire_many(all)).await;
        if drained.is_err() {
            this.release_running(&pool).await;
        }
        drop(settle_tx);
        // The completer ends once every job task has dropped its sender.
        let _ = completer.await;
        stop.cancel();
        let _ = heartbeat.await;
        let _ = listener.await;
        let _ = presence.await;
        if let Some(pruner) = pruner {
            let _ = pruner.await;
        }
        if let Some(scheduler) = scheduler {
            let _ = scheduler.await;
        }
        Ok(this.counters.snapshot())
    }

    /// Aborts the jobs still running at the deadline and gives them back.
    async fn release_running(&self, pool: &Db) {
        let mut running = Vec::new();
        self.in_flight.lock().retain(|&id, r| match r.abort.take() {
            // Finished and waiting for the completer: let it settle.
            None => true,
            Some(abort) => {
                r.cancel.cancel();
                abort.abort();
                running.push((id, r.lease));
                false
            }
        });
        if running.is_empty() {
            return;
        }
        let (ids, leases): (Vec<i64>, Vec<i64>) = running.into_iter().unzip();
        match db::release(pool, &ids, &leases).await {
            Ok(released) => {
                self.counters
                    .released
                    .fetch_add(released.len() as u64, Ordering::Relaxed);
                tracing::info!(
                    count = released.len(),
                    "released unfinished jobs at shutdown"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not release jobs at shutdown; their leases will expire")
            }
        }
    }
}
