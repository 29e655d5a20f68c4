//! Deletes finished runs and archived jobs past their retention window
//! (`cairn.prune`), a batch at a time: once per interval, and again at once
//! while a batch comes back full. Every worker runs one; the database lets
//! one prune at a time and the others return at once.

use std::time::Duration;

use crate::pooler::Db;
use tokio_util::sync::CancellationToken;

use crate::db;

/// Runs and archived jobs deleted per transaction: short enough that a
/// prune never holds locks for long.
pub(crate) const PRUNE_BATCH: u32 = 500;

/// The pause between two full batches, so a long backlog of old runs is
/// deleted at a pace that leaves the database to the hot path.
const BETWEEN_BATCHES: Duration = Duration::from_millis(50);

pub(super) async fn run(pool: Db, every: Duration, stop: CancellationToken) {
    loop {
        // Jittered, so the workers of a fleet started together spread out.
        let wait = every.mul_f64(rand::random_range(0.5..1.0));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        loop {
            match db::prune(&pool, PRUNE_BATCH).await {
                Ok(pruned) => {
                    if pruned.runs + pruned.archived > 0 {
                        tracing::debug!(runs = pruned.runs, archived = pruned.archived, "pruned");
                    }
                    if !pruned.full(PRUNE_BATCH) {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not prune finished work");
                    break;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(BETWEEN_BATCHES) => {}
            }
        }
    }
}
