//! The claim loop: leases jobs with `cairn.claim` up to the free capacity
//! and hands each to the [executor](super::executor). When its queues run
//! dry it sleeps until a `NOTIFY` (from the [listener](super::listener)), the
//! jittered poll timer, or shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::Worker;
use super::completer::Settle;
use crate::db;

/// Claim loops per worker (fewer when the concurrency is lower). Several
/// loops share the slots, so one claim is in flight while another's jobs
/// are being started: round trips overlap.
pub(super) const CLAIMERS: usize = 2;

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
                match db::claim(
                    &self.pool,
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
