//! The claim loop: leases jobs with `cairn.claim` up to the free capacity
//! and hands each to the [executor](super::executor). When its queues run
//! dry it sleeps until a `NOTIFY` (from the [listener](super::listener)), the
//! jittered poll timer, or shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::Worker;
use super::completer::Settle;
use crate::db::{self, QueuePosition};

/// Claim loops per worker (fewer when the concurrency is lower). Several
/// loops share the slots, so one claim is in flight while another's jobs
/// are being started: round trips overlap.
pub(super) const CLAIMERS: usize = 2;

/// How often a claim starts from the head of a queue instead of where the
/// last one stopped (see `cairn.claim_from`): at most how long a job
/// committed behind that position waits.
const FROM_HEAD_EVERY: Duration = Duration::from_secs(1);

/// How far before its last position a claim resumes. A job's visibility
/// time is its transaction's start (`now()`), so a job whose transaction
/// was still open when a later-started one was claimed lands behind the
/// position; resuming this much earlier takes in every such job whose
/// transaction lasted less than this, which is all of them on the hot path
/// (sends, acks that wake a run or start a flow's next step).
const RESUME_MARGIN: chrono::TimeDelta = chrono::TimeDelta::milliseconds(50);

/// Where this worker's claims resume in one queue's order. Starting past
/// the jobs already taken keeps a claim from walking the index entries they
/// left behind, which pile up while vacuum cannot remove them (a long
/// transaction holding the xmin horizon back).
#[derive(Default)]
pub(super) struct Cursor {
    at: Option<QueuePosition>,
    from_head: Option<Instant>,
}

impl Cursor {
    /// Where the next claim starts: `None` (the head) once a second.
    fn start(&mut self) -> Option<QueuePosition> {
        let resume = self.at.map(|(priority, at)| (priority, at - RESUME_MARGIN));
        let now = Instant::now();
        if self
            .from_head
            .is_none_or(|t| now.duration_since(t) >= FROM_HEAD_EVERY)
        {
            self.from_head = Some(now);
            return None;
        }
        resume
    }

    /// A claim stopped at `to`: resume there, never behind where another
    /// claim of this worker already got.
    fn advance(&mut self, to: Option<QueuePosition>) {
        if let Some(to) = to
            && self.at.is_none_or(|at| to > at)
        {
            self.at = Some(to);
        }
    }
}

impl Worker {
    /// Claims up to the free capacity, starts the jobs, and when the queues
    /// run dry sleeps until a notification or the poll timer.
    pub(super) async fn claim_loop(
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

            let mut claimed = 0;
            let mut failed = false;
            for i in 0..self.queues.len() {
                if permits.is_empty() {
                    break;
                }
                let plan = &self.queues[(next_queue + i) % self.queues.len()];
                self.counters.claims.fetch_add(1, Ordering::Relaxed);
                let from = plan.cursor().start();
                match db::claim(
                    &self.pool,
                    &plan.name,
                    self.lease,
                    permits.len(),
                    &plan.tasks,
                    from,
                )
                .await
                {
                    Ok((jobs, next)) => {
                        plan.cursor().advance(next);
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

            if claimed == 0 || failed {
                // The queues are drained (or the database is unreachable):
                // sleep until a notification, the poll timer or shutdown.
                // A short claim is no sign of that: other claimers may hold
                // the rows it skipped, so it claims again at once.
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
}

/// `d` ± 20 %, so idle workers do not poll in lockstep.
fn jittered(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.8..=1.2))
}
