//! The operator's reads of [`App`]: workers, workflows, dead letters.

use super::{App, Call};
use crate::db;
use crate::error::Result;
use crate::operate::{DeadLetter, Requeued, WorkerInfo, WorkflowInfo};

impl App {
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
