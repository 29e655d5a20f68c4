//! The calls that the runs a worker executes make at the same moment, sent
//! together: one round trip, one transaction and one WAL flush for all of
//! them instead of one each. Three kinds are batched, the three every run
//! makes: `load_run` (an execution begins), `begin_step`, `complete_run`.
//!
//! A call waits in a queue while a batch of its kind is in flight, and goes
//! with the next one; with nothing in flight it goes at once, so a lone run
//! waits for no one. Each call learns its own answer, and only once its
//! batch has committed: the outbox's barrier holds as it does for a call of
//! its own. A batch never waits for a run's lock: a run another transaction
//! holds (a cancel, a signal) is answered "busy", and that call is made
//! alone, apart from the batches, where it waits as it always did without
//! holding up the other runs' calls. A batch that fails as a whole (an
//! outcome that conflicts with the record raises, and rolls back every call
//! in it) is made again call by call, so each call gets the answer or the
//! error it would have had alone.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use tokio::sync::oneshot;

use crate::BoxFuture;
use crate::db::{self, Batched, BeginCall, Begun, CompleteCall, LoadedRun, RunLease};
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
            load: Batcher::new(db.clone(), load_batch, load_alone),
            begin: Batcher::new(db.clone(), begin_batch, begin_alone),
            complete: Batcher::new(db, complete_batch, complete_alone),
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

fn load_batch<'a>(db: &'a Db, calls: &'a [RunLease]) -> Answers<'a, LoadedRun> {
    Box::pin(db::load_runs(db, calls))
}

fn load_alone(db: Db, call: RunLease) -> AloneCall<LoadedRun> {
    Box::pin(async move { db::load_run(&db, call).await })
}

fn begin_batch<'a>(db: &'a Db, calls: &'a [BeginCall]) -> Answers<'a, Begun> {
    Box::pin(db::begin_steps(db, calls))
}

fn begin_alone(db: Db, call: BeginCall) -> AloneCall<Begun> {
    Box::pin(async move { db::begin_step(&db, &call).await })
}

fn complete_batch<'a>(db: &'a Db, calls: &'a [CompleteCall]) -> Answers<'a, bool> {
    Box::pin(db::complete_runs(db, calls))
}

fn complete_alone(db: Db, call: CompleteCall) -> AloneCall<bool> {
    Box::pin(async move { db::complete_run(&db, &call).await })
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

/// What a batch answered, a `Batched` per call.
type Answers<'a, T> = BoxFuture<'a, Result<Vec<Batched<T>>>>;
/// What a call made alone answered.
type AloneCall<T> = BoxFuture<'static, Result<Option<T>>>;

/// Collects calls of one kind and sends them in batches (`batch`, which
/// never waits for a lock of the lock order's first rank); a call the batch
/// answers busy is made `alone`, apart, so that its wait holds up no other.
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
    batch: for<'a> fn(&'a Db, &'a [C]) -> Answers<'a, T>,
    alone: fn(Db, C) -> AloneCall<T>,
    state: Mutex<State<C, T>>,
}

type Reply<T> = oneshot::Sender<Result<Option<T>>>;

struct State<C, T> {
    waiting: VecDeque<(C, Reply<T>)>,
    /// Batches being sent, and calls made alone (at most `IN_FLIGHT`).
    flushing: usize,
}

impl<C, T> Batcher<C, T>
where
    C: RunCall + Send + Sync + 'static,
    T: Send + 'static,
{
    fn new(
        db: Db,
        batch: for<'a> fn(&'a Db, &'a [C]) -> Answers<'a, T>,
        alone: fn(Db, C) -> AloneCall<T>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                db,
                batch,
                alone,
                state: Mutex::new(State {
                    waiting: VecDeque::new(),
                    flushing: 0,
                }),
            }),
        }
    }

    /// Sends `call` with the others waiting, and waits for its answer. A
    /// call that finds nothing waiting and no batch in flight is made alone
    /// at once, from the caller's own task: a lone run pays no hand-over.
    /// Batches are sent by tasks of their own, so a caller that stops
    /// waiting (its execution aborted) never strands the other calls'
    /// answers.
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
        let Some(call) = alone else {
            // No answer (the task making it alone panicked): abandon this
            // execution, as for a lost lease; the run replays once its
            // lease runs out.
            return answer.await.unwrap_or(Ok(None));
        };
        // A call alone is cheaper than a batch of one (10 % of a run at
        // concurrency 1). Its batch slot is handed on when it is done (or
        // dropped); should it wait for a run's lock meanwhile, the next
        // batch waits that long: the engine holds a run's row for
        // milliseconds (a cancel for 50 ms at most).
        let _slot = Slot(Arc::clone(&self.shared));
        (self.shared.alone)(self.shared.db.clone(), call).await
    }
}

/// The batch slot of a caller making its call alone: given back when it is
/// done (or dropped), or handed to a new sending task if calls came in
/// meanwhile.
struct Slot<C: RunCall + Send + Sync + 'static, T: Send + 'static>(Arc<Shared<C, T>>);

impl<C: RunCall + Send + Sync + 'static, T: Send + 'static> Drop for Slot<C, T> {
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
/// is by id). Answers go out as soon as the batch has committed; a call it
/// answered busy, or every call of a batch that failed as a whole, is made
/// alone in a task of its own.
async fn flush<C, T>(shared: Arc<Shared<C, T>>)
where
    C: RunCall + Send + Sync + 'static,
    T: Send + 'static,
{
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
        let sent = AssertUnwindSafe((shared.batch)(&shared.db, &calls));
        let answers = match sent.catch_unwind().await {
            Ok(Ok(answers)) if answers.len() == calls.len() => answers,
            _ => calls.iter().map(|_| Batched::Busy).collect(),
        };
        for ((call, reply), answer) in calls.into_iter().zip(replies).zip(answers) {
            match answer {
                Batched::Done(done) => {
                    let _ = reply.send(Ok(done));
                }
                Batched::Busy => {
                    let alone = (shared.alone)(shared.db.clone(), call);
                    tokio::spawn(async move {
                        let _ = reply.send(alone.await);
                    });
                }
            }
        }
    }
}
