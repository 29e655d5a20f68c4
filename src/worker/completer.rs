//! Settles finished jobs in batches: whatever has arrived since the last
//! flush goes out together, so acknowledgements cost one round trip per batch
//! under load and add no delay when idle. When the worker has free slots,
//! the ack of a flow's step also takes the steps it made ready
//! (`cairn.ack_and_take`) and starts them in those slots: a flow moves on
//! without waiting for a notification and a claim.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::Worker;
use crate::db::{self, ClaimedJob, Take, TakenJob};
use crate::error::Result;

/// The most settlements sent in one flush.
const MAX_BATCH: usize = 1000;
/// Attempts to write one batch before leaving it to lease expiry.
const WRITE_ATTEMPTS: u32 = 5;

/// A finished attempt, to be written back.
pub(super) enum Settle {
    /// Succeeded. The output, when there is one, goes to the archive (if
    /// the task archives) and to the workflow step waiting for it.
    Done {
        id: i64,
        lease: i64,
        output: Option<String>,
        archive: bool,
    },
    /// Failed; try again after `delay`.
    Retry {
        id: i64,
        lease: i64,
        delay: Duration,
        error: String,
    },
    /// Failed for good: dead-letter.
    Fail { id: i64, lease: i64, error: String },
}

impl Settle {
    pub(super) fn fail(job: &ClaimedJob, error: String) -> Self {
        Settle::Fail {
            id: job.id,
            lease: job.lease,
            error,
        }
    }

    fn key(&self) -> (i64, i64) {
        match self {
            Settle::Done { id, lease, .. }
            | Settle::Retry { id, lease, .. }
            | Settle::Fail { id, lease, .. } => (*id, *lease),
        }
    }

    /// The array call that writes a success: plain acks (the hot path),
    /// acks that hand an output to a workflow step, and archives.
    fn call(&self) -> Option<Call> {
        match self {
            Settle::Done { archive: true, .. } => Some(Call::Archive),
            Settle::Done {
                output: Some(_), ..
            } => Some(Call::AckWithOutputs),
            Settle::Done { .. } => Some(Call::Ack),
            Settle::Retry { .. } | Settle::Fail { .. } => None,
        }
    }
}

impl Worker {
    /// Receives settlements until every sender is gone, and writes them in
    /// batches. Steps its acks take run in free `slots` (the claimers'
    /// own), and report to `settle`; `closing` stops it from taking any once
    /// shutdown begins.
    pub(super) async fn complete_loop(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Settle>,
        settle: mpsc::WeakUnboundedSender<Settle>,
        slots: Arc<Semaphore>,
        closing: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            let keys: Vec<(i64, i64)> = batch.iter().map(Settle::key).collect();
            // A slot for each step these acks may make ready, of those free
            // now: a busy worker leaves the next steps to the queue's order.
            let mut free = Vec::new();
            if !closing.is_cancelled() {
                let steps = batch
                    .iter()
                    .filter(|s| s.call() == Some(Call::AckWithOutputs))
                    .count();
                while free.len() < steps {
                    match Arc::clone(&slots).try_acquire_owned() {
                        Ok(slot) => free.push(slot),
                        Err(_) => break,
                    }
                }
            }
            // Jobs taken stay taken even if a later call of the flush fails.
            let mut taken = Vec::new();
            let mut attempt = 0;
            loop {
                attempt += 1;
                let take = if closing.is_cancelled() {
                    0
                } else {
                    free.len().saturating_sub(taken.len())
                };
                match self.flush(&batch, take, &mut taken).await {
                    Ok(()) => break,
                    Err(e) if attempt < WRITE_ATTEMPTS => {
                        tracing::warn!(error = %e, attempt, "settling jobs failed; retrying");
                        tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, jobs = batch.len(),
                            "settling jobs failed; their leases will expire and they will run again");
                        break;
                    }
                }
            }
            {
                let mut map = self.in_flight.lock();
                for (id, lease) in keys {
                    if map.get(&id).is_some_and(|r| r.lease == lease) {
                        map.remove(&id);
                    }
                }
            }
            batch.clear();
            self.start_taken(taken, &mut free, &settle, &closing).await;
            // Slots left over go back to the claimers.
            drop(free);
        }
    }

    /// Starts the jobs an ack took, each in a slot a finished step left.
    /// Shutdown may have begun while the ack ran: then they go back.
    async fn start_taken(
        &self,
        taken: Vec<TakenJob>,
        slots: &mut Vec<OwnedSemaphorePermit>,
        settle: &mpsc::WeakUnboundedSender<Settle>,
        closing: &CancellationToken,
    ) {
        let mut back = Vec::new();
        for TakenJob { queue, job } in taken {
            let plan = self.queues.iter().find(|p| p.name == queue);
            match (plan, slots.pop(), settle.upgrade()) {
                (Some(plan), Some(slot), Some(settle)) if !closing.is_cancelled() => {
                    self.counters.taken.fetch_add(1, Ordering::Relaxed);
                    self.start(plan, job, slot, settle);
                }
                _ => back.push((job.id, job.lease)),
            }
        }
        if back.is_empty() {
            return;
        }
        let (ids, leases): (Vec<i64>, Vec<i64>) = back.into_iter().unzip();
        if let Err(e) = db::release(&self.pool, &ids, &leases).await {
            tracing::warn!(error = %e, "could not give back the steps an ack took; their leases will expire");
        }
    }

    /// Writes one batch: acks and archives as one call each, retries and
    /// dead letters one call per job (they are the rare path). Acks of
    /// flow steps may take up to `take` of the steps they made ready, into
    /// `taken`.
    async fn flush(&self, batch: &[Settle], take: usize, taken: &mut Vec<TakenJob>) -> Result<()> {
        // Three kinds of success, one call each (Settle::call).
        let mut plain = Group::default();
        let mut with_output = Group::default();
        let mut archived = Group::default();
        for s in batch {
            if let (
                Settle::Done {
                    id, lease, output, ..
                },
                Some(call),
            ) = (s, s.call())
            {
                let group = match call {
                    Call::Archive => &mut archived,
                    Call::AckWithOutputs => &mut with_output,
                    Call::Ack => &mut plain,
                };
                group.push(*id, *lease, output.clone());
            }
        }
        let pool = &self.pool;
        let mut done = 0;
        let mut refused = 0;
        for (group, call) in [
            (&plain, Call::Ack),
            (&with_output, Call::AckWithOutputs),
            (&archived, Call::Archive),
        ] {
            if group.ids.is_empty() {
                continue;
            }
            let n = match call {
                Call::Ack => db::ack(pool, &group.ids, &group.leases).await?,
                Call::AckWithOutputs if take > 0 => {
                    let (acked, jobs) = db::ack_and_take(
                        pool,
                        &group.ids,
                        &group.leases,
                        &group.outputs,
                        Take {
                            lease: self.lease,
                            qty: take,
                            queues: &self.queue_names,
                            tasks: &self.step_handlers,
                        },
                    )
                    .await?;
                    taken.extend(jobs);
                    acked
                }
                Call::AckWithOutputs => {
                    db::ack_with_outputs(pool, &group.ids, &group.leases, &group.outputs).await?
                }
                Call::Archive => {
                    db::archive(pool, &group.ids, &group.leases, &group.outputs).await?
                }
            }
            .len();
            done += n;
            refused += group.ids.len() - n;
        }
        for s in batch {
            match s {
                Settle::Done { .. } => {}
                Settle::Retry {
                    id,
                    lease,
                    delay,
                    error,
                } => {
                    if db::retry(pool, *id, *lease, *delay, error).await? {
                        self.counters.retried.fetch_add(1, Ordering::Relaxed);
                    } else {
                        refused += 1;
                    }
                }
                Settle::Fail { id, lease, error } => {
                    if db::fail(pool, *id, *lease, error).await? {
                        tracing::warn!(job = id, error = %error, "job dead-lettered");
                        self.counters.dead.fetch_add(1, Ordering::Relaxed);
                    } else {
                        refused += 1;
                    }
                }
            }
        }
        self.counters
            .completed
            .fetch_add(done as u64, Ordering::Relaxed);
        if refused > 0 {
            tracing::warn!(
                refused,
                "settlements refused: those jobs had been re-leased to another worker"
            );
            self.counters
                .refused
                .fetch_add(refused as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Parallel arrays for one array call.
#[derive(Default)]
struct Group {
    ids: Vec<i64>,
    leases: Vec<i64>,
    outputs: Vec<Option<String>>,
}

impl Group {
    fn push(&mut self, id: i64, lease: i64, output: Option<String>) {
        self.ids.push(id);
        self.leases.push(lease);
        self.outputs.push(output);
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Ack,
    AckWithOutputs,
    Archive,
}
