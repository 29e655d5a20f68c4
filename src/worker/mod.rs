//! The pull worker.
//!
//! One claim loop leases jobs with `cairn.claim` up to the free capacity and
//! spawns a task per job; a [listener](listener) wakes it on `NOTIFY`, with a
//! jittered poll as the fallback; a [completer](completer) settles finished
//! jobs in batches; a [heartbeat](heartbeat) extends the leases of jobs that
//! run long and aborts those whose lease was lost. Every settlement is fenced
//! by the job's lease, so racing with a redelivery can never double-complete.

mod completer;
mod heartbeat;
mod listener;

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::db::{self, ClaimedJob};
use crate::error::{Error, HandlerError, Result};
use crate::plugin::{FailureInfo, Plugins, TaskEvent};
use crate::retry::Verdict;
use crate::task::{Handler, JobContext, Registration, validate_queue_name};
use crate::workflow::{self, Settled, WorkflowDef};

use completer::Settle;

/// Configures and runs a worker; from [`App::worker`].
///
/// ```no_run
/// # async fn demo(app: cairn::App) -> cairn::Result<()> {
/// let stats = app.worker().queues(["emails"]).concurrency(32).run().await?;
/// println!("{} jobs completed", stats.completed);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct WorkerBuilder {
    app: App,
    queues: Vec<String>,
    concurrency: usize,
    lease: Duration,
    poll_interval: Duration,
    shutdown_timeout: Duration,
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
}

impl WorkerBuilder {
    pub(crate) fn new(app: App) -> Self {
        Self {
            app,
            queues: Vec::new(),
            concurrency: 16,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            shutdown_timeout: Duration::from_secs(30),
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
            db::create_queue(self.app.pool(), &q.name).await?;
        }
        for w in self.app.workflows() {
            db::create_queue(self.app.pool(), &w.queue).await?;
            db::register_workflow(self.app.pool(), &w.name, &w.queue).await?;
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
                .app
                .registrations_for(name)
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
}

async fn shutdown_signal() {
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
    started: Instant,
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
        }
    }
}

/// Claim loops per worker (fewer when the concurrency is lower).
const CLAIMERS: usize = 2;

struct Worker {
    app: App,
    queues: Vec<QueuePlan>,
    concurrency: usize,
    lease: Duration,
    poll_interval: Duration,
    shutdown_timeout: Duration,
    in_flight: Arc<InFlight>,
    counters: Arc<Counters>,
    plugins: Plugins,
}

impl Worker {
    fn new(b: WorkerBuilder, queues: Vec<QueuePlan>) -> Self {
        let plugins = b.app.plugins();
        Self {
            app: b.app,
            queues,
            concurrency: b.concurrency,
            lease: b.lease,
            poll_interval: b.poll_interval,
            shutdown_timeout: b.shutdown_timeout,
            in_flight: Arc::default(),
            counters: Arc::default(),
            plugins,
        }
    }

    async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<WorkerStats> {
        let pool = self.app.pool().clone();
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
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let completer = tokio::spawn(completer::run(
            pool.clone(),
            settle_rx,
            Arc::clone(&self.in_flight),
            Arc::clone(&self.counters),
        ));

        // Several claim loops share the slots, so one claim is in flight
        // while another's jobs are being started: round trips overlap.
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.concurrency));
        let closing = CancellationToken::new();
        let claimers: Vec<_> = (0..this.concurrency.min(CLAIMERS))
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
        Ok(this.counters.snapshot())
    }

    /// Claims up to the free capacity, starts the jobs, and when the queues
    /// run dry sleeps until a notification or the poll timer.
    async fn claim_loop(
        self: Arc<Self>,
        first_queue: usize,
        slots: Arc<Semaphore>,
        wake: Arc<Notify>,
        closing: CancellationToken,
        settle_tx: mpsc::UnboundedSender<Settle>,
    ) {
        let mut next_queue = first_queue;
        loop {
            let first = tokio::select! {
                biased;
                _ = closing.cancelled() => return,
                permit = Arc::clone(&slots).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let mut permits = vec![first];
            while let Ok(p) = Arc::clone(&slots).try_acquire_owned() {
                permits.push(p);
            }

            let wanted = permits.len();
            let mut claimed = 0;
            let mut failed = false;
            for i in 0..self.queues.len() {
                if permits.is_empty() {
                    break;
                }
                let plan = &self.queues[(next_queue + i) % self.queues.len()];
                self.counters.claims.fetch_add(1, Ordering::Relaxed);
                match db::claim(
                    self.app.pool(),
                    &plan.name,
                    self.lease,
                    permits.len(),
                    &plan.tasks,
                )
                .await
                {
                    Ok(jobs) => {
                        claimed += jobs.len();
                        for job in jobs {
                            let Some(permit) = permits.pop() else { break };
                            self.start(plan, job, permit, settle_tx.clone());
                        }
                    }
                    Err(e) => {
                        tracing::warn!(queue = %plan.name, error = %e, "claim failed; retrying after the poll interval");
                        failed = true;
                    }
                }
            }
            next_queue = (next_queue + 1) % self.queues.len();
            drop(permits);

            if claimed < wanted || failed {
                // The queues are drained (or the database is unreachable):
                // sleep until a notification, the poll timer or shutdown.
                let pause = jittered(self.poll_interval);
                tokio::select! {
                    biased;
                    _ = closing.cancelled() => return,
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
    }

    /// Aborts the jobs still running at the deadline and gives them back.
    async fn release_running(&self, pool: &sqlx::PgPool) {
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

    /// Spawns the job's handler and the task that reports its outcome.
    fn start(
        &self,
        plan: &QueuePlan,
        job: ClaimedJob,
        permit: OwnedSemaphorePermit,
        settle: mpsc::UnboundedSender<Settle>,
    ) {
        let attempt = u32::try_from(job.attempts).unwrap_or(u32::MAX);
        let Some(reg) = plan.handlers.get(&job.task).cloned() else {
            // The claim filters by task name, so this cannot happen; settle
            // it loudly rather than leave it leased.
            let _ = settle.send(Settle::fail(
                &job,
                format!("no handler for task {:?}", job.task),
            ));
            return;
        };
        if attempt > reg.policy.attempts() {
            // Delivered more often than the policy allows without a result:
            // the workers running it were lost (a crash loop). Stop here.
            let error = format!(
                "gave up after {} deliveries without a result (max attempts {}); the worker running it was lost each time",
                attempt - 1,
                reg.policy.attempts()
            );
            let _ = settle.send(Settle::fail(&job, error));
            return;
        }

        let handler = match &reg.handler {
            Handler::Task(h) => Arc::clone(h),
            Handler::Workflow(w) => {
                return self.start_run(&plan.name, &reg, Arc::clone(w), job, permit);
            }
        };
        let cancel = CancellationToken::new();
        let ctx = JobContext {
            id: job.id,
            queue: plan.name.clone(),
            task: reg.name.clone(),
            attempt,
            parent_run: job.parent_run,
            cancel: cancel.clone(),
        };
        let (id, lease) = (job.id, job.lease);
        let archive = reg.archive;
        let plugins = self.plugins.clone();
        // Built only for plugins: no clones or clock reads per job otherwise.
        let mut event = (!plugins.is_empty()).then(|| TaskEvent {
            job_id: id,
            task: reg.name.clone(),
            queue: plan.name.clone(),
            attempt,
            parent_run: job.parent_run,
            started: SystemTime::now(),
            elapsed: Duration::ZERO,
            traceparent: job.traceparent.clone(),
        });
        if let Some(e) = &event {
            plugins.each("before_task", |p| p.before_task(e));
        }
        let clock = event.as_ref().map(|_| Instant::now());
        let run =
            AssertUnwindSafe(handler(job.payload, ctx, job.parent_run.is_some())).catch_unwind();
        let in_flight = Arc::clone(&self.in_flight);
        // Registered before the task can finish: the entry is in place when
        // the task marks it settled, and the completer removes it.
        let mut running = self.in_flight.lock();
        let task = tokio::spawn(async move {
            let result = match run.await {
                Ok(result) => result,
                Err(panic) => Err(HandlerError::retryable(format!(
                    "handler panicked: {}",
                    panic_message(panic)
                ))),
            };
            if let Some(r) = in_flight.lock().get_mut(&id) {
                r.abort = None; // settling now: shutdown must not release it
            }
            let outcome = match result {
                Ok(output) => Settle::Done {
                    id,
                    lease,
                    output,
                    archive,
                },
                Err(err) => decide(id, lease, attempt, &reg, err),
            };
            if let (Some(event), Some(clock)) = (&mut event, clock) {
                event.elapsed = clock.elapsed();
                match &outcome {
                    Settle::Done { .. } => plugins.each("after_task", |p| p.after_task(event)),
                    Settle::Retry { error, .. } | Settle::Fail { error, .. } => {
                        let info = FailureInfo {
                            message: error.clone(),
                            will_retry: matches!(outcome, Settle::Retry { .. }),
                        };
                        plugins.each("on_task_error", |p| p.on_task_error(event, &info));
                    }
                }
            }
            let _ = settle.send(outcome);
            drop(permit);
        });
        // An aborted task (lease lost, or released at shutdown) sends nothing.
        running.insert(
            id,
            Running {
                lease,
                started: Instant::now(),
                cancel,
                abort: Some(task.abort_handle()),
            },
        );
    }
}

impl Worker {
    /// Spawns the replay of a workflow run; it writes its own outcome.
    fn start_run(
        &self,
        queue: &str,
        reg: &Registration,
        workflow: Arc<WorkflowDef>,
        job: ClaimedJob,
        permit: OwnedSemaphorePermit,
    ) {
        let (id, lease) = (job.id, job.lease);
        let pool = self.app.pool().clone();
        let name = reg.name.clone();
        let queue = queue.to_owned();
        let plugins = self.plugins.clone();
        let in_flight = Arc::clone(&self.in_flight);
        let counters = Arc::clone(&self.counters);
        let mut running = self.in_flight.lock();
        let task = tokio::spawn(async move {
            let settled = workflow::execute(pool, workflow, name, queue, plugins, &job).await;
            let counter = match settled {
                Settled::Completed => Some(&counters.completed),
                Settled::Failed(_) => Some(&counters.dead),
                Settled::Suspended | Settled::Abandoned => None,
            };
            if let Some(c) = counter {
                c.fetch_add(1, Ordering::Relaxed);
            }
            in_flight.lock().remove(&id);
            drop(permit);
        });
        running.insert(
            id,
            Running {
                lease,
                started: Instant::now(),
                cancel: CancellationToken::new(),
                abort: Some(task.abort_handle()),
            },
        );
    }
}

/// Turns a handler error into a retry or a dead letter, by the task's policy.
fn decide(id: i64, lease: i64, attempt: u32, reg: &Registration, err: HandlerError) -> Settle {
    match reg.policy.verdict(attempt, &err) {
        Verdict::Retry { delay, error } => Settle::Retry {
            id,
            lease,
            delay,
            error,
        },
        Verdict::GiveUp { error } => Settle::Fail { id, lease, error },
    }
}

pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// `d` ± 20 %, so idle workers do not poll in lockstep.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.8..=1.2))
}
