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
/// last one stopped (see `cairn.claim_from`): about how long a job committed
/// behind that position waits.
const FROM_HEAD_EVERY: Duration = Duration::from_secs(1);

/// A claim from the head walks every index entry at the head of the queue:
/// while a long transaction holds vacuum back, the dead entries of every job
/// acknowledged since (hundreds of milliseconds of walking, two minutes
/// into a held snapshot at full speed). So the next one waits at least this
/// many times as long as the last one took: claims from the head spend at
/// most a twentieth of a claim loop's time...
const FROM_HEAD_SPACING: u32 = 20;

/// ... but come at least this often, whatever they cost.
const FROM_HEAD_AT_LEAST_EVERY: Duration = Duration::from_secs(30);

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
    /// When the next claim starts from the head (`None`: the next claim).
    next_from_head: Option<Instant>,
}

impl Cursor {
    /// Where a claim made at `now` starts: `None` (the head) about once a
    /// second, less often while claims from the head are slow.
    fn start(&mut self, now: Instant) -> Option<QueuePosition> {
        if self.next_from_head.is_none_or(|t| now >= t) {
            // No other claim loop starts from the head until this claim
            // has said how long it took.
            self.next_from_head = Some(now + FROM_HEAD_AT_LEAST_EVERY);
            return None;
        }
        self.at.map(|(priority, at)| (priority, at - RESUME_MARGIN))
    }

    /// A claim from the head, started at `started`, took `took` (whether it
    /// succeeded or not): the next one comes a second later, or
    /// [`FROM_HEAD_SPACING`] times `took` later if that is longer.
    fn head_claim_took(&mut self, started: Instant, took: Duration) {
        let wait = (took * FROM_HEAD_SPACING).clamp(FROM_HEAD_EVERY, FROM_HEAD_AT_LEAST_EVERY);
        self.next_from_head = Some(started + wait);
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
                let started = Instant::now();
                let from = plan.cursor().start(started);
                let claim = db::claim(
                    &self.pool,
                    &plan.name,
                    self.lease,
                    permits.len(),
                    &plan.tasks,
                    from,
                )
                .await;
                if from.is_none() {
                    plan.cursor().head_claim_took(started, started.elapsed());
                }
                match claim {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn position() -> QueuePosition {
        (0, chrono::Utc::now())
    }

    #[test]
    fn claims_resume_and_start_from_the_head_about_once_a_second() {
        let t0 = Instant::now();
        let mut cursor = Cursor::default();
        assert_eq!(cursor.start(t0), None, "the first claim starts at the head");
        cursor.advance(Some(position()));
        cursor.head_claim_took(t0, Duration::from_millis(2));
        let resumed = cursor.start(t0 + Duration::from_millis(500));
        assert!(resumed.is_some(), "within the second, claims resume");
        assert_eq!(cursor.start(t0 + Duration::from_secs(1)), None);
    }

    #[test]
    fn a_slow_claim_from_the_head_puts_the_next_one_off() {
        let t0 = Instant::now();
        let mut cursor = Cursor::default();
        assert_eq!(cursor.start(t0), None);
        cursor.advance(Some(position()));
        // Another claim loop, while that claim is still walking the head.
        assert!(cursor.start(t0 + Duration::from_secs(2)).is_some());
        cursor.head_claim_took(t0, Duration::from_millis(400));
        // 20 x 400 ms.
        assert!(cursor.start(t0 + Duration::from_millis(7_900)).is_some());
        assert_eq!(cursor.start(t0 + Duration::from_secs(8)), None);
        // However slow, at least every 30 s.
        cursor.head_claim_took(t0 + Duration::from_secs(8), Duration::from_secs(10));
        assert!(cursor.start(t0 + Duration::from_secs(37)).is_some());
        assert_eq!(cursor.start(t0 + Duration::from_secs(38)), None);
    }
}
