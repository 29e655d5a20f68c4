//! Retention: how long finished runs and archived jobs are kept, and what a
//! prune deleted. The pruning itself is `cairn.prune()` (sql/50_retention.sql),
//! called by every worker in the background.

use std::time::Duration;

/// How long finished work is kept before [`App::prune`](crate::App::prune)
/// (and every worker, in the background) deletes it. `None` keeps it for
/// ever. Set it with [`App::set_retention`](crate::App::set_retention).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Completed and cancelled runs (with their steps, history, signals and
    /// child runs), and completed jobs kept in the archive. Default 7 days.
    pub completed: Option<Duration>,
    /// Failed runs and dead letters. Default 30 days: they are what an
    /// operator retries or requeues.
    pub failed: Option<Duration>,
}

impl Default for Retention {
    fn default() -> Self {
        const DAY: u64 = 86_400;
        Self {
            completed: Some(Duration::from_secs(7 * DAY)),
            failed: Some(Duration::from_secs(30 * DAY)),
        }
    }
}

/// What one prune deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pruned {
    /// Runs deleted, child runs included.
    pub runs: u64,
    /// Jobs deleted from the archive (completed jobs and dead letters).
    pub archived: u64,
}

impl Pruned {
    /// Whether the prune found a full batch, so more may be waiting.
    pub(crate) fn full(&self, batch: u32) -> bool {
        self.runs >= u64::from(batch) || self.archived >= u64::from(batch)
    }
}
