//! Settles finished jobs in batches: whatever has arrived since the last
//! flush goes out together, so acknowledgements cost one round trip per batch
//! under load and add no delay when idle.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::mpsc;

use super::{Counters, InFlight};
use crate::db::{self, ClaimedJob};
use crate::error::Result;

/// The most settlements sent in one flush.
const MAX_BATCH: usize = 1000;
/// Attempts to write one batch before leaving it to lease expiry.
const WRITE_ATTEMPTS: u32 = 5;

/// A finished attempt, to be written back.
pub(super) enum Settle {
    /// Succeeded; the output is kept when the task archives.
    Done {
        id: i64,
        lease: i64,
        output: Option<String>,
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
}

pub(super) async fn run(
    pool: PgPool,
    mut rx: mpsc::UnboundedReceiver<Settle>,
    in_flight: Arc<InFlight>,
    counters: Arc<Counters>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let keys: Vec<(i64, i64)> = batch.iter().map(Settle::key).collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            match flush(&pool, &batch, &counters).await {
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
        let mut map = in_flight.lock();
        for (id, lease) in keys {
            if map.get(&id).is_some_and(|r| r.lease == lease) {
                map.remove(&id);
            }
        }
        drop(map);
        batch.clear();
    }
}

/// Writes one batch: acks and archives as one call each, retries and dead
/// letters one call per job (they are the rare path).
async fn flush(pool: &PgPool, batch: &[Settle], counters: &Counters) -> Result<()> {
    let (mut ack_ids, mut ack_leases) = (Vec::new(), Vec::new());
    let (mut arc_ids, mut arc_leases, mut outputs) = (Vec::new(), Vec::new(), Vec::new());
    for s in batch {
        if let Settle::Done { id, lease, output } = s {
            match output {
                None => {
                    ack_ids.push(*id);
                    ack_leases.push(*lease);
                }
                Some(_) => {
                    arc_ids.push(*id);
                    arc_leases.push(*lease);
                    outputs.push(output.clone());
                }
            }
        }
    }
    let mut done = 0;
    let mut refused = 0;
    if !ack_ids.is_empty() {
        let acked = db::ack(pool, &ack_ids, &ack_leases).await?.len();
        done += acked;
        refused += ack_ids.len() - acked;
    }
    if !arc_ids.is_empty() {
        let archived = db::archive(pool, &arc_ids, &arc_leases, &outputs)
            .await?
            .len();
        done += archived;
        refused += arc_ids.len() - archived;
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
                    counters.retried.fetch_add(1, Ordering::Relaxed);
                } else {
                    refused += 1;
                }
            }
            Settle::Fail { id, lease, error } => {
                if db::fail(pool, *id, *lease, error).await? {
                    tracing::warn!(job = id, error = %error, "job dead-lettered");
                    counters.dead.fetch_add(1, Ordering::Relaxed);
                } else {
                    refused += 1;
                }
            }
        }
    }
    counters.completed.fetch_add(done as u64, Ordering::Relaxed);
    if refused > 0 {
        tracing::warn!(
            refused,
            "settlements refused: those jobs had been re-leased to another worker"
        );
        counters
            .refused
            .fetch_add(refused as u64, Ordering::Relaxed);
    }
    Ok(())
}
