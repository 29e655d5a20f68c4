//! [`WorkflowContext`]: the durable calls a workflow function makes.
//!
//! A workflow function is replayed from the start every time its run is
//! picked up. Each durable call takes a key (`name#n`, the n-th use of that
//! name) and a position when it is *made* (not when it is first polled), so
//! calls created in a fixed order get the same keys on every replay. If the
//! run's checkpoints already hold that key, the recorded outcome is returned
//! without running anything — after two checks that make a replay fail
//! loudly rather than return another call's outcome: the key must sit at the
//! same position, and the call's input must have the same fingerprint.
//!
//! When the run has to wait, the call records why and never resolves; the
//! replay then parks the run in the database and drops the function.

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::pooler::Db;
use chrono::{DateTime, Utc};
use futures_util::task::AtomicWaker;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use super::batch::Calls;
use super::checkpoint::{Outbox, Outcome, Recorded, fingerprint};
use super::step::Step;
use crate::db::{self, RunLease, Started};
use crate::error::{HandlerError, StepError};
use crate::plugin::Plugins;
use crate::retry::RetryPolicy;
use crate::run::{StepKind, StepStatus};

/// The longest durable sleep or signal timeout (10 years), as in SQL.
const MAX_WAIT: Duration = Duration::from_secs(315_360_000);

/// What stops this execution of the workflow function.
#[derive(Debug)]
pub(crate) enum Halt {
    /// Park the run until `wake_at`, or `retry_in` from now, whichever is
    /// earlier (neither: until something wakes it).
    Suspend {
        wake_at: Option<DateTime<Utc>>,
        retry_in: Option<Duration>,
        waiting: bool,
    },
    /// An outcome this execution saw conflicts with what another writer
    /// recorded: park for no time and replay from the record.
    Replay,
    /// The lease was lost or the database failed: stop writing; the run is
    /// picked up again once the lease runs out.
    Abandon(String),
    /// The run cannot go on: a replay met a different call than recorded.
    Fail(String),
}

impl Halt {
    /// Two branches halted: a failure wins, then an abandon, then a replay;
    /// two waits wake at the earlier time.
    fn merge(self, other: Halt) -> Halt {
        use Halt::*;
        match (self, other) {
            (Fail(m), _) | (_, Fail(m)) => Fail(m),
            (Abandon(m), _) | (_, Abandon(m)) => Abandon(m),
            (Replay, _) | (_, Replay) => Replay,
            (
                Suspend {
                    wake_at: a,
                    retry_in: ra,
                    waiting: wa,
                },
                Suspend {
                    wake_at: b,
                    retry_in: rb,
                    waiting: wb,
                },
            ) => Suspend {
                wake_at: earliest(a, b),
                retry_in: earliest(ra, rb),
                waiting: wa || wb,
            },
        }
    }
}

fn earliest<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

struct State {
    next_seq: i32,
    occurrences: HashMap<String, u32>,
    halt: Option<Halt>,
}

pub(super) struct Inner {
    pub(super) pool: Db,
    /// The worker's batched calls (a step's begin).
    pub(super) calls: Calls,
    pub(super) at: RunLease,
    pub(super) workflow: String,
    loaded_at: (DateTime<Utc>, Instant),
    recorded: HashMap<String, Recorded>,
    by_seq: HashMap<i32, String>,
    state: Mutex<State>,
    pub(super) outbox: Outbox,
    pub(super) step_retry: RetryPolicy,
    pub(super) step_timeout: Option<Duration>,
    pub(super) plugins: Plugins,
    pub(super) traceparent: Option<String>,
    /// Inline steps between the start of their handler and their outcome
    /// reaching the outbox.
    running: AtomicUsize,
    cancel: CancellationToken,
    /// Wakes the replay when a halt, an outcome or the end of a step happens
    /// outside its poll (a step awaited in a spawned task).
    replay: AtomicWaker,
}

/// The handle a workflow function gets: its steps, sleeps, signals, child
/// runs and step jobs are durable, and its `now`, `random` and `uuid` return
/// the same values on every replay.
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

/// A durable call's place in the run: its key, position and record.
pub(super) struct Slot<'a> {
    pub key: String,
    pub seq: i32,
    pub recorded: Option<&'a Recorded>,
    pub fingerprint: Option<String>,
}

/// Counts an inline step as running until dropped (also when its future is).
pub(super) struct Busy<'a>(&'a Inner);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
        self.0.replay.wake();
    }
}

/// What the replay loaded for the context.
pub(crate) struct Loaded {
    pub workflow: String,
    pub db_now: DateTime<Utc>,
    pub traceparent: Option<String>,
    pub recorded: Vec<Recorded>,
}

impl WorkflowContext {
    pub(crate) fn new(
        pool: Db,
        calls: Calls,
        at: RunLease,
        loaded: Loaded,
        options: &super::WorkflowOptions,
        plugins: Plugins,
        cancel: CancellationToken,
    ) -> Self {
        let by_seq = loaded
            .recorded
            .iter()
            .map(|r| (r.seq, r.key.clone()))
            .collect();
        let recorded = loaded
            .recorded
            .into_iter()
            .map(|r| (r.key.clone(), r))
            .collect();
        Self {
            inner: Arc::new(Inner {
                pool,
                calls,
                at,
                workflow: loaded.workflow,
                loaded_at: (loaded.db_now, Instant::now()),
                recorded,
                by_seq,
                state: Mutex::new(State {
                    next_seq: 0,
                    occurrences: HashMap::new(),
                    halt: None,
                }),
                outbox: Outbox::default(),
                step_retry: options.step_retry,
                step_timeout: options.step_timeout,
                plugins,
                traceparent: loaded.traceparent,
                running: AtomicUsize::new(0),
                cancel,
                replay: AtomicWaker::new(),
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

    /// Resolves when the worker gives up on this execution: the run was
    /// cancelled, or its lease was lost. The execution is then dropped at its
    /// next `.await`; long computations in a step can check
    /// [`is_cancelled`](Self::is_cancelled).
    pub async fn cancelled(&self) {
        self.inner.cancel.cancelled().await
    }

    /// Whether the worker has given up on this execution.
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the next key and position for `name`, and checks them and the
    /// input's fingerprint against the record. `None` once the execution is
    /// halting: the caller must not start work.
    pub(super) fn slot(&self, name: &str, input: Option<(&str, &str)>) -> Option<Slot<'_>> {
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
        let fingerprint = input.map(|(what, json)| fingerprint(what, json));
        let wf = &self.inner.workflow;
        let mismatch = match (self.inner.by_seq.get(&seq), recorded) {
            (Some(there), _) if *there != key => Some(format!(
                "non-determinism in workflow {wf}: at position {seq} the code reached step {key}, but the run recorded {there}"
            )),
            (_, Some(r)) if r.seq != seq => Some(format!(
                "non-determinism in workflow {wf}: at position {seq} the code reached step {key}, but the run recorded {key} at position {}",
                r.seq
            )),
            (_, Some(r)) if differs(r.fingerprint.as_deref(), fingerprint.as_deref()) => {
                Some(format!(
                    "non-determinism in workflow {wf}: step {key} was recorded for another input than this replay gives it ({}); a durable call must get the same input at the same key on every replay: make concurrent durable calls in a fixed order (ctx.join_all), not from spawned tasks or after a non-durable await",
                    preview(input.map_or("", |(_, json)| json))
                ))
            }
            _ => None,
        };
        if let Some(message) = mismatch {
            st.halt = Some(Halt::Fail(message));
            drop(st);
            self.inner.replay.wake();
            return None;
        }
        Some(Slot {
            key,
            seq,
            recorded,
            fingerprint,
        })
    }

    /// Whether this execution is halting (no new work may start).
    pub(super) fn halted(&self) -> bool {
        self.state().halt.is_some()
    }

    /// Halts this execution (merging with a halt already there).
    pub(crate) fn halt_now(&self, halt: Halt) {
        let mut st = self.state();
        st.halt = Some(match st.halt.take() {
            Some(h) => h.merge(halt),
            None => halt,
        });
        drop(st);
        self.inner.replay.wake();
    }

    /// Records an outcome for the execution's next call.
    pub(super) fn record(&self, outcome: Outcome) {
        self.inner.outbox.push(outcome);
        self.inner.replay.wake();
    }

    /// Asks to be woken when the execution's state changes outside a poll.
    pub(crate) fn register_replay(&self, waker: &std::task::Waker) {
        self.inner.replay.register(waker);
    }

    /// Halts and never returns: the replay drops this future.
    pub(super) async fn park<T>(&self, halt: Halt) -> T {
        self.halt_now(halt);
        std::future::pending().await
    }

    pub(super) async fn abandon<T>(&self, what: &str, e: impl std::fmt::Display) -> T {
        self.park(Halt::Abandon(format!("{what}: {e}"))).await
    }

    pub(crate) fn take_halt(&self) -> Option<Halt> {
        self.state().halt.take()
    }

    /// Halting, with no inline step midway: the execution can end.
    pub(crate) fn halted_and_idle(&self) -> bool {
        self.state().halt.is_some() && self.inner.running.load(Ordering::SeqCst) == 0
    }

    pub(super) fn busy(&self) -> Busy<'_> {
        self.inner.running.fetch_add(1, Ordering::SeqCst);
        Busy(&self.inner)
    }

    /// Makes a database call that carries the outbox. A lost lease or a
    /// database error abandons this execution, a conflicting outcome replays
    /// it; neither returns.
    pub(super) async fn call<T, F, Fut>(&self, what: &'static str, make: F) -> T
    where
        F: FnOnce(String, bool) -> Fut,
        Fut: Future<Output = crate::Result<Option<T>>>,
    {
        let carried = self.inner.outbox.carry().await;
        let durable = carried.carries();
        let result = make(carried.done.clone(), durable).await;
        drop(carried);
        match result {
            Ok(Some(v)) => v,
            Ok(None) => self.abandon("lease lost", what).await,
            Err(e) if e.is_replay_conflict() => self.park(Halt::Replay).await,
            Err(e) => self.abandon(what, e).await,
        }
    }

    /// The database's time now, without a round trip: the time the run was
    /// loaded plus the time elapsed since.
    pub(super) fn db_now(&self) -> DateTime<Utc> {
        let (at, since) = self.inner.loaded_at;
        at + since.elapsed()
    }

    /// A step: runs `handler(input)` once and checkpoints its output; on
    /// replay returns the recorded output without calling it. Options:
    /// [`retry`](Step::retry), [`timeout`](Step::timeout). The step takes
    /// its key when it is turned into a future (awaited, or passed to
    /// [`join_all`](Self::join_all)).
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
        Step::new(self, name, input, handler)
    }

    /// Runs steps concurrently and returns their outputs in order, or the
    /// first error (in order) once all have ended. The steps take their keys
    /// in the order given, so every replay matches each one to its own
    /// checkpoint: this is the way to fan out over a list. Each is
    /// checkpointed on its own; a replay after a crash or a retry runs only
    /// the ones not yet completed.
    ///
    /// ```no_run
    /// # async fn demo(ctx: cairn::WorkflowContext, ids: Vec<i64>) -> Result<(), cairn::HandlerError> {
    /// let prices: Vec<i64> = ctx
    ///     .join_all(ids.into_iter().map(|id| {
    ///         ctx.step("price", id, |id| async move { Ok(id * 100) })
    ///     }))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn join_all<'c, I, O, F, Fut>(
        &'c self,
        steps: impl IntoIterator<Item = Step<'c, I, F>>,
    ) -> Result<Vec<O>, StepError>
    where
        I: Serialize + Send + 'static,
        O: Serialize + DeserializeOwned + Send + 'static,
        F: FnOnce(I) -> Fut + Send + 'static,
        Fut: Future<Output = Result<O, HandlerError>> + Send + 'static,
    {
        let futures: Vec<_> = steps.into_iter().map(IntoFuture::into_future).collect();
        futures_util::future::join_all(futures)
            .await
            .into_iter()
            .collect()
    }

    /// Sleeps durably: the run is parked in the database, holding no worker,
    /// and resumes after `duration` (up to 10 years) on the database clock.
    pub fn sleep(&self, duration: Duration) -> impl Future<Output = ()> + Send + '_ {
        let slot = self.slot("sleep", None);
        async move {
            let Some(slot) = slot else {
                return std::future::pending().await;
            };
            if duration > MAX_WAIT {
                return self
                    .park(Halt::Fail(format!(
                        "sleep of {duration:?} at {} exceeds 10 years",
                        slot.key
                    )))
                    .await;
            }
            if let Some(r) = slot.recorded {
                match (r.status, r.wake_at) {
                    (StepStatus::Completed, _) => return,
                    (_, Some(wake)) if wake > self.db_now() => {
                        return self.suspend_until(wake, false).await;
                    }
                    _ => {}
                }
            }
            let (pool, at, key) = (&self.inner.pool, self.inner.at, &slot.key);
            let (wake, done) = self
                .call("recording a sleep", |done, _| async move {
                    db::sleep_step(pool, at, &done, key, slot.seq, duration).await
                })
                .await;
            if !done {
                self.suspend_until(wake, false).await
            }
        }
    }

    /// Sleeps durably until `time` (the database clock's); returns at once if
    /// it has passed.
    pub fn sleep_until(&self, time: DateTime<Utc>) -> impl Future<Output = ()> + Send + '_ {
        let left = (time - self.db_now()).to_std().unwrap_or(Duration::ZERO);
        self.sleep(left)
    }

    async fn suspend_until<T>(&self, wake: DateTime<Utc>, waiting: bool) -> T {
        self.park(Halt::Suspend {
            wake_at: Some(wake),
            retry_in: None,
            waiting,
        })
        .await
    }

    /// Waits durably for the signal `name` (sent with `cairn.send_signal` or
    /// [`App::send_signal`](crate::App::send_signal)), for at most `timeout`
    /// (`None`: for ever; at most 10 years). Returns `Ok(None)` on timeout. A
    /// signal sent before the wait began is not lost: the wait consumes it.
    pub fn wait_for_signal<'c, T: DeserializeOwned + 'c>(
        &'c self,
        name: &'c str,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<Option<T>, StepError>> + Send + 'c {
        let slot = self.slot(&format!("signal:{name}"), None);
        async move {
            let Some(slot) = slot else {
                return std::future::pending().await;
            };
            if timeout.is_some_and(|t| t > MAX_WAIT) {
                return self
                    .park(Halt::Fail(format!(
                        "signal timeout at {} exceeds 10 years",
                        slot.key
                    )))
                    .await;
            }
            let output = match slot.recorded {
                Some(r) if r.status == StepStatus::Completed => r.output.clone(),
                _ => {
                    let (pool, at, key) = (&self.inner.pool, self.inner.at, &slot.key);
                    let (done, output, wake) = self
                        .call("waiting for a signal", |done, _| async move {
                            db::await_signal(pool, at, &done, key, slot.seq, name, timeout).await
                        })
                        .await;
                    if !done {
                        return self
                            .park(Halt::Suspend {
                                wake_at: wake,
                                retry_in: None,
                                waiting: true,
                            })
                            .await;
                    }
                    output
                }
            };
            #[derive(serde::Deserialize)]
            struct Received<T> {
                payload: Option<T>,
                #[serde(default)]
                timeout: bool,
            }
            let received: Received<T> = serde_json::from_str(output.as_deref().unwrap_or("{}"))
                .map_err(|e| StepError::Decode {
                    step: slot.key.clone(),
                    message: format!("signal {name:?} does not fit the expected type: {e}"),
                })?;
            if received.timeout {
                return Ok(None);
            }
            match received.payload {
                Some(p) => Ok(Some(p)),
                None => serde_json::from_str("null")
                    .map(Some)
                    .map_err(|e| StepError::Decode {
                        step: slot.key,
                        message: format!("signal {name:?} does not fit the expected type: {e}"),
                    }),
            }
        }
    }

    /// Starts a child run of `workflow` and waits durably for its output.
    /// The child is started once (a replay finds it); if it fails or is
    /// cancelled, this returns [`StepError::Failed`]. Cancelling the parent
    /// cancels the child.
    pub fn child<'c, I: Serialize, O: DeserializeOwned + Send + 'c>(
        &'c self,
        workflow: &'c str,
        input: &I,
    ) -> impl Future<Output = Result<O, StepError>> + Send + 'c {
        let (pool, at) = (&self.inner.pool, self.inner.at);
        self.elsewhere(
            format!("child:{workflow}"),
            workflow,
            serde_json::to_string(input),
            "the child's input",
            move |s| async move {
                let fp = s.fingerprint.as_deref();
                db::start_child(pool, at, &s.done, &s.key, s.seq, fp, workflow, &s.input).await
            },
        )
    }

    /// A step that runs as a job of task `T` on `T::QUEUE`, on any worker
    /// serving that queue (a GPU box, say), while this run waits durably. The
    /// job retries by `T`'s policy; its output comes back here, and if it is
    /// dead-lettered this returns [`StepError::Failed`].
    pub fn task<'c, T>(
        &'c self,
        job: &T,
    ) -> impl Future<Output = Result<T::Output, StepError>> + Send + 'c
    where
        T: crate::Task,
        T::Output: DeserializeOwned,
    {
        let (pool, at) = (&self.inner.pool, self.inner.at);
        self.elsewhere(
            format!("task:{}", T::NAME),
            T::NAME,
            serde_json::to_string(job),
            "the task's arguments",
            move |s| async move {
                let fp = s.fingerprint.as_deref();
                db::start_task_step(
                    pool,
                    at,
                    &s.done,
                    &s.key,
                    s.seq,
                    fp,
                    T::QUEUE,
                    T::NAME,
                    &s.input,
                )
                .await
            },
        )
    }

    /// A durable call that starts something elsewhere once — a child run, a
    /// step job — and waits for its outcome: a replay finds it started (or
    /// ended) and starts nothing.
    fn elsewhere<'c, O, F, Fut>(
        &'c self,
        name: String,
        input_name: &'c str,
        input: serde_json::Result<String>,
        what: &'static str,
        start: F,
    ) -> impl Future<Output = Result<O, StepError>> + Send + 'c
    where
        O: DeserializeOwned + Send + 'c,
        F: FnOnce(Starting) -> Fut + Send + 'c,
        Fut: Future<Output = crate::Result<Option<Started>>> + Send + 'c,
    {
        let slot = match &input {
            Ok(json) => self.slot(&name, Some((input_name, json))),
            Err(_) => self.slot(&name, None),
        };
        async move {
            let Some(slot) = slot else {
                return std::future::pending().await;
            };
            if let Some(known) = known_outcome(&slot) {
                return self.settled(slot, known).await;
            }
            let input = input.map_err(|e| StepError::Failed {
                step: slot.key.clone(),
                message: format!("cannot serialize {what}: {e}"),
            })?;
            let (key, seq, fingerprint) = (slot.key.clone(), slot.seq, slot.fingerprint.clone());
            let started = self
                .call("starting a child run or step job", |done, _| {
                    start(Starting {
                        done,
                        key,
                        seq,
                        fingerprint,
                        input,
                    })
                })
                .await;
            self.settled(slot, started).await
        }
    }

    /// The outcome of a child run or step job: its output, its failure, or
    /// a durable wait while it runs.
    async fn settled<O: DeserializeOwned>(
        &self,
        slot: Slot<'_>,
        started: Started,
    ) -> Result<O, StepError> {
        match started.status {
            StepStatus::Completed => {
                serde_json::from_str(started.output.as_deref().unwrap_or("null")).map_err(|e| {
                    StepError::Decode {
                        step: slot.key,
                        message: format!("output does not fit the expected type: {e}"),
                    }
                })
            }
            StepStatus::Failed => Err(StepError::Failed {
                step: slot.key,
                message: started.error.unwrap_or_default(),
            }),
            _ if started.mismatch => {
                let message = format!(
                    "non-determinism in workflow {}: step {} was recorded for another input than this replay gives it",
                    self.inner.workflow, slot.key
                );
                self.park(Halt::Fail(message)).await
            }
            _ => {
                self.park(Halt::Suspend {
                    wake_at: None,
                    retry_in: None,
                    waiting: true,
                })
                .await
            }
        }
    }

    /// The database's time, recorded once: the same on every replay. Like
    /// Postgres's, its precision is a microsecond.
    pub fn now(&self) -> impl Future<Output = DateTime<Utc>> + Send + '_ {
        let now = self.db_now();
        let now = DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now);
        self.value("now", move || now)
    }

    /// A random number in `[0, 1)`, recorded once.
    pub fn random(&self) -> impl Future<Output = f64> + Send + '_ {
        self.value("random", rand::random::<f64>)
    }

    /// A random (v4) UUID, recorded once.
    pub fn uuid(&self) -> impl Future<Output = uuid::Uuid> + Send + '_ {
        self.value("uuid", uuid::Uuid::new_v4)
    }

    /// A value made once and recorded: it rides in the outbox, and a replay
    /// returns the recorded one.
    fn value<T, M>(&self, name: &str, make: M) -> impl Future<Output = T> + Send + '_
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        M: FnOnce() -> T + Send + 'static,
    {
        let slot = self.slot(name, None);
        async move {
            let Some(slot) = slot else {
                return std::future::pending().await;
            };
            if let Some(v) = slot
                .recorded
                .and_then(|r| r.output.as_deref())
                .and_then(|o| serde_json::from_str(o).ok())
            {
                return v;
            }
            let value = make();
            let output = serde_json::to_string(&value)
                .ok()
                .and_then(|json| RawValue::from_string(json).ok());
            self.record(Outcome {
                key: slot.key,
                seq: slot.seq,
                kind: StepKind::Value,
                attempt: 1,
                status: StepStatus::Completed,
                output,
                error: None,
                fingerprint: None,
                retry_in: None,
            });
            value
        }
    }
}

/// Whether a recorded fingerprint differs from this call's. Checkpoints
/// written before fingerprints existed have none, and are trusted.
fn differs(recorded: Option<&str>, now: Option<&str>) -> bool {
    matches!((recorded, now), (Some(a), Some(b)) if a != b)
}

/// The start of a JSON text, for messages.
pub(super) fn preview(json: &str) -> String {
    let mut end = json.len().min(200);
    while !json.is_char_boundary(end) {
        end -= 1;
    }
    if end < json.len() {
        format!("{}…", &json[..end])
    } else {
        json.to_owned()
    }
}

/// What a call that starts a child run or a step job sends.
struct Starting {
    done: String,
    key: String,
    seq: i32,
    fingerprint: Option<String>,
    input: String,
}

/// What the loaded checkpoints already say about a child run or step job,
/// sparing a round trip on replay.
fn known_outcome(slot: &Slot<'_>) -> Option<Started> {
    let r = slot.recorded?;
    Some(Started {
        status: r.status,
        output: r.output.clone(),
        error: r.error.clone(),
        mismatch: false,
    })
}
