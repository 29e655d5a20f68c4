//! Settles finished jobs in batches: whatever has arrived since the last
//! flush goes out together, so acknowledgements cost one round trip per batch
//! under load and add no delay when idle.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::pooler::Db;
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
}

pub(super) async fn run(
    pool: Db,
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
async fn flush(pool: &Db, batch: &[Settle], counters: &Counters) -> Result<()> {
    // Three kinds of success, one call each: plain acks (the hot path),
    // acks that hand an output to a workflow step, and archives.
    let mut plain = Group::default();
    let mut with_output = Group::default();
    let mut archived = Group::default();
    for s in batch {
        if let Settle::Done {
            id,
            lease,
            output,
            archive,
        } = s
        {
            let group = match (archive, output) {
                (true, _) => &mut archived,
                (false, Some(_)) => &mut with_output,
                (false, None) => &mut plain,
            };
            group.push(*id, *lease, output.clone());
        }
    }
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
            Call::AckWithOutputs => {
                db::ack_with_outputs(pool, &group.ids, &group.leases, &group.outputs).await?
            }
            Call::Archive => db::archive(pool, &group.ids, &group.leases, &group.outputs).await?,
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

#[derive(Clone, Copy)]
enum Call {
    Ack,
    AckWithOutputs,
    Archive,
}
