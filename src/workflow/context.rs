//! [`WorkflowContext`]: checkpointed steps, durable sleeps and signals.
//!
//! A workflow function is replayed from the start every time its run is
//! picked up. Each durable operation takes the next position and a key
//! (`name#n`, the n-th use of that name); if the run's checkpoints already
//! hold that key, the stored outcome is returned without running anything.
//! When the run has to wait, the operation records why and never resolves;
//! the executor then parks the run in the database and drops the function.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio::sync::Notify;

use super::step::Step;
use crate::db::{self, Checkpoint, RunLease};
use crate::error::{HandlerError, StepError};
use crate::plugin::Plugins;
use crate::retry::RetryPolicy;

/// One checkpoint as `cairn.load_run` returns it.
#[derive(Debug, Deserialize)]
pub(crate) struct Recorded {
    pub(super) key: String,
    pub(super) seq: i32,
    pub(super) status: String,
    pub(super) output: Option<serde_json::Value>,
    pub(super) error: Option<String>,
    pub(super) attempts: i32,
    pub(super) wake_at: Option<DateTime<Utc>>,
}

/// What stops this execution of the workflow function.
#[derive(Debug)]
pub(crate) enum Halt {
    /// Park the run until `wake_at` (`None`: until a signal wakes it).
    Suspend {
        wake_at: Option<DateTime<Utc>>,
        waiting: bool,
    },
    /// The lease was lost or the database failed: stop writing; the run is
    /// picked up again once the lease runs out.
    Abandon(String),
    /// The run cannot go on: a replay met a different step than recorded.
    Fail(String),
}

impl Halt {
    /// Two branches halted: a failure wins, then an abandon; two waits wake
    /// at the earlier time.
    fn merge(self, other: Halt) -> Halt {
        use Halt::*;
        match (self, other) {
            (Fail(m), _) | (_, Fail(m)) => Fail(m),
            (Abandon(m), _) | (_, Abandon(m)) => Abandon(m),
            (
                Suspend {
                    wake_at: a,
                    waiting: wa,
                },
                Suspend {
                    wake_at: b,
                    waiting: wb,
                },
            ) => Suspend {
                wake_at: match (a, b) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                },
                waiting: wa || wb,
            },
        }
    }
}

struct State {
    next_seq: i32,
    occurrences: HashMap<String, u32>,
    halt: Option<Halt>,
}

pub(super) struct Inner {
    pub(super) pool: PgPool,
    pub(super) at: RunLease,
    pub(super) workflow: String,
    pub(super) loaded_at: (DateTime<Utc>, Instant),
    pub(super) recorded: HashMap<String, Recorded>,
    pub(super) by_seq: HashMap<i32, String>,
    state: Mutex<State>,
    pub(super) step_retry: RetryPolicy,
    pub(super) step_timeout: Option<Duration>,
    pub(super) plugins: Plugins,
    pub(super) traceparent: Option<String>,
    /// Inline steps between starting their handler and writing their checkpoint.
    pub(super) running: AtomicUsize,
    pub(super) changed: Notify,
}

/// The handle a workflow function gets: its steps, sleeps and signals are
/// durable, and its `now`, `random` and `uuid` return the same values on
/// every replay.
#[derive(Clone)]
pub struct WorkflowContext {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for WorkflowContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkflowContext")
            .field("run_id", &self.inner.at.run)
            .field("workflow", &self.inner.workflow)
            .finish_non_exhaustive()
    }
}

/// The position and key of a durable operation, and its checkpoint if any.
pub(super) struct Slot<'a> {
    pub(super) key: String,
    pub(super) seq: i32,
    pub(super) recorded: Option<&'a Recorded>,
}

impl WorkflowContext {
    pub(crate) fn new(
        pool: PgPool,
        at: RunLease,
        workflow: String,
        loaded: &db::LoadedRun,
        recorded: Vec<Recorded>,
        options: &super::WorkflowOptions,
        plugins: Plugins,
    ) -> Self {
        let (db_now, traceparent) = (loaded.db_now, loaded.traceparent.clone());
        let by_seq = recorded.iter().map(|r| (r.seq, r.key.clone())).collect();
        let recorded = recorded.into_iter().map(|r| (r.key.clone(), r)).collect();
        Self {
            inner: Arc::new(Inner {
                pool,
                at,
                workflow,
                loaded_at: (db_now, Instant::now()),
                recorded,
                by_seq,
                state: Mutex::new(State {
                    next_seq: 0,
                    occurrences: HashMap::new(),
                    halt: None,
                }),
                step_retry: options.step_retry,
                step_timeout: options.step_timeout,
                plugins,
                traceparent,
                running: AtomicUsize::new(0),
                changed: Notify::new(),
            }),
        }
    }

    /// The run's id.
    pub fn run_id(&self) -> uuid::Uuid {
        self.inner.at.run
    }

    /// The workflow's name.
    pub fn workflow(&self) -> &str {
        &self.inner.workflow
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the next position for `name`, checking it against the record.
    /// `None` once the execution is halting: the caller must not start work.
    pub(super) fn slot(&self, name: &str) -> Option<Slot<'_>> {
        let mut st = self.state();
        if st.halt.is_some() {
            return None;
        }
        let n = st.occurrences.entry(name.to_owned()).or_insert(0);
        *n += 1;
        let key = format!("{name}#{n}");
        let seq = st.next_seq;
        st.next_seq += 1;
        let recorded = self.inner.recorded.get(&key);
        let mismatch = match (self.inner.by_seq.get(&seq), recorded) {
            (Some(there), _) if *there != key => Some(there.clone()),
            (_, Some(r)) if r.seq != seq => Some(format!("{key} at position {}", r.seq)),
            _ => None,
        };
        if let Some(there) = mismatch {
            let msg = format!(
                "non-determinism in workflow {}: at position {seq} the code reached step {key}, but the run recorded {there}",
                self.inner.workflow
            );
            st.halt = Some(Halt::Fail(msg));
            drop(st);
            self.inner.changed.notify_waiters();
            return None;
        }
        Some(Slot { key, seq, recorded })
    }

    fn halt(&self, halt: Halt) {
        let mut st = self.state();
        st.halt = Some(match st.halt.take() {
            Some(h) => h.merge(halt),
            None => halt,
        });
        drop(st);
        self.inner.changed.notify_waiters();
    }

    /// Halts and never returns: the executor drops this future.
    pub(super) async fn park<T>(&self, halt: Halt) -> T {
        self.halt(halt);
        std::future::pending().await
    }

    pub(super) async fn abandon<T>(&self, what: &str, e: impl std::fmt::Display) -> T {
        self.park(Halt::Abandon(format!("{what}: {e}"))).await
    }

    pub(crate) fn take_halt(&self) -> Option<Halt> {
        self.state().halt.take()
    }

    /// Resolves once the execution is halting and no inline step is midway.
    pub(crate) async fn halted_and_idle(&self) {
        loop {
            let changed = self.inner.changed.notified();
            if self.state().halt.is_some() && self.inner.running.load(Ordering::SeqCst) == 0 {
                return;
            }
            changed.await;
        }
    }

    /// The database's time now, without a round trip: the time the run was
    /// loaded plus the time elapsed since.
    fn db_now(&self) -> DateTime<Utc> {
        let (at, since) = self.inner.loaded_at;
        at + since.elapsed()
    }

    /// A step: runs `handler(input)` once and checkpoints its output; on
    /// replay returns the stored output without calling it. Options:
    /// [`retry`](Step::retry), [`timeout`](Step::timeout).
    ///
    /// ```no_run
    /// # async fn demo(ctx: cairn::WorkflowContext) -> Result<(), cairn::HandlerError> {
    /// let cents: i64 = ctx
    ///     .step("charge", 1250_i64, |amount| async move { Ok(amount) })
    ///     .timeout(std::time::Duration::from_secs(10))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn step<I, O, F, Fut>(&self, name: &str, input: I, handler: F) -> Step<'_, I, F>
    where
        I: Serialize + Send + 'static,
        O: Serialize + DeserializeOwned + Send + 'static,
        F: FnOnce(I) -> Fut + Send + 'static,
        Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    {
        Step {
            ctx: self,
            name: name.to_owned(),
            input,
            handler,
            policy: self.inner.step_retry,
            timeout: self.inner.step_timeout,
        }
    }

    /// Sleeps durably: the run is parked in the database, holding no worker,
    /// and resumes after `duration` (any length) on the database clock.
    pub async fn sleep(&self, duration: Duration) {
        let Some(slot) = self.slot("sleep") else {
            return std::future::pending().await;
        };
        if let Some(r) = slot.recorded {
            match (r.status.as_str(), r.wake_at) {
                ("completed", _) => return,
                (_, Some(wake)) if wake > self.db_now() => {
                    return self
                        .park(Halt::Suspend {
                            wake_at: Some(wake),
                            waiting: false,
                        })
                        .await;
                }
                _ => {}
            }
        }
        let at = self.inner.at;
        match db::sleep_step(&self.inner.pool, at, &slot.key, slot.seq, duration).await {
            Ok(Some((_, true))) => {}
            Ok(Some((wake, false))) => {
                self.park(Halt::Suspend {
                    wake_at: Some(wake),
                    waiting: false,
                })
                .await
            }
            Ok(None) => self.abandon("lease lost", "recording a sleep").await,
            Err(e) => self.abandon("recording a sleep", e).await,
        }
    }

    /// Sleeps durably until `time` (the database clock's); returns at once if
    /// it has passed.
    pub async fn sleep_until(&self, time: DateTime<Utc>) {
        let left = (time - self.db_now()).to_std().unwrap_or(Duration::ZERO);
        self.sleep(left).await
    }

    /// Waits durably for the signal `name` (sent with `cairn.send_signal` or
    /// [`App::send_signal`](crate::App::send_signal)), for at most `timeout`
    /// (`None`: for ever). Returns `Ok(None)` on timeout. A signal sent
    /// before the wait began is not lost: the wait consumes it.
    pub async fn wait_for_signal<T: DeserializeOwned>(
        &self,
        name: &str,
        timeout: Option<Duration>,
    ) -> Result<Option<T>, StepError> {
        let Some(slot) = self.slot(&format!("signal:{name}")) else {
            return std::future::pending().await;
        };
        let output = match slot.recorded {
            Some(r) if r.status == "completed" => r.output.clone(),
            _ => {
                let at = self.inner.at;
                match db::await_signal(&self.inner.pool, at, &slot.key, slot.seq, name, timeout)
                    .await
                {
                    Ok(Some((true, output, _))) => {
                        output.as_deref().and_then(|o| serde_json::from_str(o).ok())
                    }
                    Ok(Some((false, _, wake))) => {
                        return self
                            .park(Halt::Suspend {
                                wake_at: wake,
                                waiting: true,
                            })
                            .await;
                    }
                    Ok(None) => return self.abandon("lease lost", "waiting for a signal").await,
                    Err(e) => return self.abandon("waiting for a signal", e).await,
                }
            }
        };
        let mut output = output.unwrap_or_default();
        if output.get("timeout").is_some() {
            return Ok(None);
        }
        serde_json::from_value(output["payload"].take())
            .map(Some)
            .map_err(|e| StepError::Decode {
                step: slot.key,
                message: format!("signal {name:?} does not fit the expected type: {e}"),
            })
    }

    /// Starts a child run of `workflow` and waits durably for its output.
    /// The child is started once (a replay finds it); if it fails or is
    /// cancelled, this returns [`StepError::Failed`]. Cancelling the parent
    /// cancels the child.
    pub async fn child<I: Serialize, O: DeserializeOwned>(
        &self,
        workflow: &str,
        input: &I,
    ) -> Result<O, StepError> {
        let Some(slot) = self.slot(&format!("child:{workflow}")) else {
            return std::future::pending().await;
        };
        if let Some(known) = self.known_outcome(&slot) {
            return self.settled(slot, Ok(known), "a child run").await;
        }
        let input = serde_json::to_string(input).map_err(|e| StepError::Decode {
            step: slot.key.clone(),
            message: format!("cannot serialize the child's input: {e}"),
        })?;
        let at = self.inner.at;
        let started =
            db::start_child(&self.inner.pool, at, &slot.key, slot.seq, workflow, &input).await;
        self.settled(slot, started, "starting a child run").await
    }

    /// A step that runs as a job of task `T` on `T::QUEUE`, on any worker
    /// serving that queue (a GPU box, say), while this run waits durably. The
    /// job retries by `T`'s policy; its output comes back here, and if it is
    /// dead-lettered this returns [`StepError::Failed`].
    pub async fn task<T>(&self, job: &T) -> Result<T::Output, StepError>
    where
        T: crate::Task,
        T::Output: DeserializeOwned,
    {
        let Some(slot) = self.slot(&format!("task:{}", T::NAME)) else {
            return std::future::pending().await;
        };
        if let Some(known) = self.known_outcome(&slot) {
            return self.settled(slot, Ok(known), "a step job").await;
        }
        let payload = serde_json::to_string(job).map_err(|e| StepError::Decode {
            step: slot.key.clone(),
            message: format!("cannot serialize the task's arguments: {e}"),
        })?;
        let at = self.inner.at;
        let started = db::start_task_step(
            &self.inner.pool,
            at,
            &slot.key,
            slot.seq,
            T::QUEUE,
            T::NAME,
            &payload,
        )
        .await;
        self.settled(slot, started, "starting a step job").await
    }

    /// What the checkpoints loaded with the run already say about a child
    /// or step job, sparing a round trip on replay.
    fn known_outcome(&self, slot: &Slot<'_>) -> Option<db::Started> {
        let r = slot.recorded?;
        let output = r.output.as_ref().map(|o| o.to_string());
        Some(Some(match r.status.as_str() {
            "completed" => (true, output, None),
            "failed" => (true, None, Some(r.error.clone().unwrap_or_default())),
            _ => (false, None, None),
        }))
    }

    /// The outcome of a child run or step job: its output, its failure, or
    /// a durable wait while it runs.
    async fn settled<O: DeserializeOwned>(
        &self,
        slot: Slot<'_>,
        started: crate::Result<db::Started>,
        what: &str,
    ) -> Result<O, StepError> {
        match started {
            Ok(Some((true, output, None))) => {
                serde_json::from_str(output.as_deref().unwrap_or("null")).map_err(|e| {
                    StepError::Decode {
                        step: slot.key,
                        message: format!("output does not fit the expected type: {e}"),
                    }
                })
            }
            Ok(Some((true, _, Some(error)))) => Err(StepError::Failed {
                step: slot.key,
                message: error,
            }),
            Ok(Some((false, _, _))) => {
                self.park(Halt::Suspend {
                    wake_at: None,
                    waiting: true,
                })
                .await
            }
            Ok(None) => self.abandon("lease lost", what).await,
            Err(e) => self.abandon(what, e).await,
        }
    }

    /// The database's time, recorded once: the same on every replay. Like
    /// Postgres's, its precision is a microsecond.
    pub async fn now(&self) -> DateTime<Utc> {
        let now = self.db_now();
        let now = DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
        self.value("now", move || now).await
    }

    /// A random number in `[0, 1)`, recorded once.
    pub async fn random(&self) -> f64 {
        self.value("random", rand::random::<f64>).await
    }

    /// A random (v4) UUID, recorded once.
    pub async fn uuid(&self) -> uuid::Uuid {
        self.value("uuid", uuid::Uuid::new_v4).await
    }

    async fn value<T: Serialize + DeserializeOwned>(
        &self,
        name: &str,
        make: impl FnOnce() -> T,
    ) -> T {
        let Some(slot) = self.slot(name) else {
            return std::future::pending().await;
        };
        if let Some(v) = slot
            .recorded
            .and_then(|r| r.output.clone())
            .and_then(|o| serde_json::from_value(o).ok())
        {
            return v;
        }
        let value = make();
        let json = serde_json::to_string(&value).unwrap_or_else(|_| "null".into());
        let at = self.inner.at;
        let c = Checkpoint {
            key: &slot.key,
            seq: slot.seq,
            kind: "value",
            status: "completed",
            input: None,
            output: Some(&json),
            error: None,
            attempts: 1,
        };
        match db::checkpoint(&self.inner.pool, at, c).await {
            // Another writer's value, if it got there first.
            Ok(Some(r)) => r
                .output_now
                .and_then(|o| serde_json::from_str(&o).ok())
                .unwrap_or(value),
            Ok(None) => self.abandon("lease lost", "recording a value").await,
            Err(e) => self.abandon("recording a value", e).await,
        }
    }
}
