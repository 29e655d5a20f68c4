//! The operator's reads of [`App`]: workers, workflows, dead letters, and
//! the installation's health.

use std::time::Duration;

use super::{App, Call};
use crate::db;
use crate::error::Result;
use crate::migrate;
use crate::operate::{Check, DeadLetter, Health, Requeued, WorkerInfo, WorkflowInfo};

impl App {
    /// The installation's health, one [`Check`] per concern: migrations
    /// applied, functions current and undrifted (what `initialize` would
    /// change, found without changing it), roles and grants, the oldest
    /// ready job, queues no live worker serves, expired leases, long-running
    /// steps, orphaned runs, dead letters, late schedules and timers, dead rows on the
    /// hot tables, and the oldest transaction holding back vacuum. Ages over
    /// `warn_after` are reported. Reads only; needs `cairn_admin`.
    pub async fn doctor(&self, warn_after: Duration) -> Result<Vec<Check>> {
        let mut checks = self
            .in_own_session("connecting for the schema check", |conn| {
                Box::pin(migrate::inspect(conn))
            })
            .await?;
        if checks
            .iter()
            .any(|c| c.name == "migrations" && c.status == Health::Fail)
        {
            // The functions below may not exist, or not be these.
            return Ok(checks);
        }
        checks.extend(db::doctor(self.db(), warn_after.as_secs_f64()).await?);
        Ok(checks)
    }

    /// The worker processes that are running (and, marked not alive, those
    /// that died in the last day without saying so), oldest first.
    pub async fn list_workers(&self) -> Result<Vec<WorkerInfo>> {
        db::list_workers(self.db()).await
    }

    /// Every code-first workflow a worker announced and every stored flow,
    /// by name, with counts of their runs.
    pub async fn list_workflows(&self) -> Result<Vec<WorkflowInfo>> {
        db::list_workflows(self.db()).await
    }

    /// Dead letters, newest first: of one queue, or of all; at most `limit`
    /// (1 to 10,000). Needs `cairn_admin` (payloads are in them).
    pub async fn list_dead(&self, queue: Option<&str>, limit: u32) -> Result<Vec<DeadLetter>> {
        db::list_dead(self.db(), queue, limit).await
    }

    /// Puts every dead letter of `queue` back ([`requeue`](Self::requeue)
    /// for each; a failed run's dead job revives the run). Step jobs are
    /// skipped and counted: retry their run. Needs `cairn_admin`.
    pub fn requeue_dead(&self, queue: &str) -> Call<'_, Requeued> {
        let queue = queue.to_owned();
        Call::new(self.db(), move |conn| {
            Box::pin(async move { db::requeue_dead(conn, &queue).await })
        })
    }
}
