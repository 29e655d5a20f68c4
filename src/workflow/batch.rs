//! The calls that the runs a worker executes make at the same moment, sent
//! together: one round trip, one transaction and one WAL flush for all of
//! them instead of one each. Three kinds are batched, the three every run
//! makes: `load_run` (an execution begins), `begin_step`, `complete_run`.
//!
//! A call waits in a queue while batches of its kind are in flight, and goes
//! with the next one; with nothing in flight it goes at once, so a lone run
//! waits for no one. Each call learns its own answer, and only once its
//! batch has committed: the outbox's barrier holds as it does for a call of
//! its own. The SQL side never waits for a run's lock in a batch: a run
//! another transaction holds (a cancel, a signal) is answered "busy", and
//! that call is made alone, which waits as it always did. A batch that fails
//! as a whole (an outcome that conflicts with the record raises, and rolls
//! back every call in it) is made again call by call, so each call gets the
//! answer or the error it would have had alone.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use futures_util::future::join_all;
use tokio::sync::oneshot;

use crate::BoxFuture;
use crate::db::{self, BeginCall, Begun, CompleteCall, LoadedRun, RunLease};
use crate::error::Result;
use crate::pooler::Db;

/// Batches of one kind in flight at once: while one is on the wire or in
/// Postgres, the next fills up. One: on two cores, 3-step runs drained at
/// concurrency 64 went at 2,232-2,516 runs/s with one, 1,868-2,148 with two
/// and 1,904-1,930 with three (bigger batches cost less per call).
const IN_FLIGHT: usize = 1;

/// The most calls in one batch.
const MAX_BATCH: usize = 256;

/// The batched calls of one worker's executions. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Calls {
    load: Batcher<RunLease, LoadedRun>,
    begin: Batcher<BeginCall, Begun>,
    complete: Batcher<CompleteCall, bool>,
}

impl Calls {
    pub(crate) fn new(db: Db) -> Self {
        Self {
            load: Batcher::new(db.clone(), |db, calls| {
                Box::pin(async move {
                    send(&db, &calls, db::load_runs, |db, at| db::load_run(db, *at)).await
                })
            }),
            begin: Batcher::new(db.clone(), |db, calls| {
                Box::pin(async move { send(&db, &calls, db::begin_steps, db::begin_step).await })
            }),
            complete: Batcher::new(db, |db, calls| {
                Box::pin(
                    async move { send(&db, &calls, db::complete_runs, db::complete_run).await },
                )
            }),
        }
    }

    /// `cairn.load_run`. `None` when the lease no longer holds the job.
    pub(crate) async fn load_run(&self, at: RunLease) -> Result<Option<LoadedRun>> {
        self.load.call(at).await
    }

    /// `cairn.begin_step`. `None` when the lease was lost.
    pub(crate) async fn begin_step(&self, call: BeginCall) -> Result<Option<Begun>> {
        self.begin.call(call).await
    }

    /// `cairn.complete_run`: `Some(true)` completed, `Some(false)` failed
    /// (the output broke the JSON limits), `None` when the lease was lost.
    pub(crate) async fn complete_run(&self, call: CompleteCall) -> Result<Option<bool>> {
        self.complete.call(call).await
    }
}

/// A call that names the run, job and lease it is made for.
pub(crate) trait RunCall {
    fn held(&self) -> RunLease;
}

impl RunCall for RunLease {
    fn held(&self) -> RunLease {
        *self
    }
}

impl RunCall for BeginCall {
    fn held(&self) -> RunLease {
        self.at
    }
}

impl RunCall for CompleteCall {
    fn held(&self) -> RunLease {
        self.at
    }
}

/// Sends `calls`: one call of `batch` (`alone` for a single call); alone, the
/// calls it answered busy; every call alone if the batch failed.
async fn send<'a, C: Sync, T, B, BF, A, AF>(
    db: &'a Db,
    calls: &'a [C],
    batch: B,
    alone: A,
) -> Vec<Result<Option<T>>>
where
    B: FnOnce(&'a Db, &'a [C]) -> BF,
    BF: Future<Output = Result<Vec<db::Batched<T>>>>,
    A: Fn(&'a Db, &'a C) -> AF,
    AF: Future<Output = Result<Option<T>>>,
{
    if let [call] = calls {
        return vec![alone(db, call).await];
    }
    let answers = match batch(db, calls).await {
        Ok(answers) => answers,
        Err(_) => calls.iter().map(|_| db::Batched::Busy).collect(),
    };
    let alone = &alone;
    join_all(calls.iter().zip(answers).map(|(call, answer)| async move {
        match answer {
            db::Batched::Done(done) => Ok(done),
            db::Batched::Busy => alone(db, call).await,
        }
    }))
    .await
}

type SendFn<C, T> = fn(Db, Vec<C>) -> BoxFuture<'static, Vec<Result<Option<T>>>>;

/// Collects calls of one kind and sends them in batches with `send`, which
/// answers each call in order.
struct Batcher<C, T> {
    shared: Arc<Shared<C, T>>,
}

impl<C, T> Clone for Batcher<C, T> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct Shared<C, T> {
    db: Db,
    send: SendFn<C, T>,
    state: Mutex<State<C, T>>,
}

type Reply<T> = oneshot::Sender<Result<Option<T>>>;

struct State<C, T> {
    waiting: VecDeque<(C, Reply<T>)>,
    /// Tasks sending batches; each goes on until no call is waiting.
    flushing: usize,
}

impl<C, T> Batcher<C, T>
where
    C: RunCall + Send + 'static,
    T: Send + 'static,
{
    fn new(db: Db, send: SendFn<C, T>) -> Self {
        Self {
            shared: Arc::new(Shared {
                db,
                send,
                state: Mutex::new(State {
                    waiting: VecDeque::new(),
                    flushing: 0,
                }),
            }),
        }
    }

    /// Sends `call` with the others waiting, and waits for its answer. A
    /// call that finds nothing waiting and a batch free to send goes at
    /// once, from the caller's own task: a lone run pays no hand-over.
    /// Batches of several calls are sent by tasks of their own, so a caller
    /// that stops waiting (its execution aborted) never strands the other
    /// calls' answers.
    async fn call(&self, call: C) -> Result<Option<T>> {
        let (reply, answer) = oneshot::channel();
        let alone = {
            let mut state = self.shared.lock();
            if state.flushing < IN_FLIGHT && state.waiting.is_empty() {
                state.flushing += 1;
                Some(call)
            } else {
                state.waiting.push_back((call, reply));
                if state.flushing < IN_FLIGHT {
                    state.flushing += 1;
                    tokio::spawn(flush(Arc::clone(&self.shared)));
                }
                None
            }
        };
        if let Some(call) = alone {
            // Hands the batch slot on when done, or if this is dropped.
            let _slot = Slot(Arc::clone(&self.shared));
            let mut answers = (self.shared.send)(self.shared.db.clone(), vec![call]).await;
            return answers.pop().unwrap_or(Ok(None));
        }
        // No answer (the batch panicked): abandon this execution, as for a
        // lost lease; the run replays once its lease runs out.
        answer.await.unwrap_or(Ok(None))
    }
}

/// A batch slot taken by a caller sending its call alone: given back when
/// it is done (or dropped), or handed to a new sending task if calls came
/// in meanwhile.
struct Slot<C: RunCall + Send + 'static, T: Send + 'static>(Arc<Shared<C, T>>);

impl<C: RunCall + Send + 'static, T: Send + 'static> Drop for Slot<C, T> {
    fn drop(&mut self) {
        let waiting = {
            let mut state = self.0.lock();
            let waiting = !state.waiting.is_empty();
            if !waiting {
                state.flushing -= 1;
            }
            waiting
        };
        // Dropped as the runtime shuts down: nothing is left to answer.
        if let (true, Ok(runtime)) = (waiting, tokio::runtime::Handle::try_current()) {
            runtime.spawn(flush(Arc::clone(&self.0)));
        }
    }
}

impl<C, T> Shared<C, T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, State<C, T>> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Sends batches until no call is waiting. A batch goes in job id order:
/// the SQL side locks the jobs in the order given (rank 2 of the lock order
/// is by id).
async fn flush<C: RunCall, T>(shared: Arc<Shared<C, T>>) {
    loop {
        let mut batch: Vec<_> = {
            let mut state = shared.lock();
            if state.waiting.is_empty() {
                state.flushing -= 1;
                return;
            }
            let n = state.waiting.len().min(MAX_BATCH);
            state.waiting.drain(..n).collect()
        };
        batch.sort_by_key(|(call, _)| call.held().job);
        let (calls, replies): (Vec<C>, Vec<_>) = batch.into_iter().unzip();
        let send = AssertUnwindSafe((shared.send)(shared.db.clone(), calls));
        let answers = send.catch_unwind().await.unwrap_or_default();
        for (reply, answer) in replies.into_iter().zip(answers) {
            let _ = reply.send(answer);
        }
    }
}
