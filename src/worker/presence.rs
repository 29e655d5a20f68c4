//! Tells the database this worker is running (`cairn.workers`): hello when
//! it starts, "still here" every few seconds, goodbye when it stops. What an
//! operator's `cairn workers` shows. Presence is observability: a call that
//! fails is logged, and never stops the worker.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::db;
use crate::pooler::Db;

/// How often a running worker says it is alive (the database calls a
/// worker dead after 30 s without).
const EVERY: Duration = Duration::from_secs(5);

/// Who this worker is.
pub(super) struct Presence {
    pub id: uuid::Uuid,
    pub host: String,
    pub queues: Vec<String>,
    pub handlers: Vec<String>,
    pub concurrency: usize,
}

impl Presence {
    async fn hello(&self, pool: &Db) -> crate::Result<()> {
        db::worker_hello(
            pool,
            self.id,
            &self.host,
            &self.queues,
            &self.handlers,
            self.concurrency,
        )
        .await
    }
}

/// This machine's name, as the kernel knows it.
pub(super) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|h| h.trim().chars().take(255).collect())
        .filter(|h: &String| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

pub(super) async fn run(pool: Db, me: Presence, stop: CancellationToken) {
    let mut failing = me
        .hello(&pool)
        .await
        .inspect_err(|e| tracing::warn!(error = %e, "could not announce the worker"))
        .is_err();
    loop {
        let wait = EVERY.mul_f64(rand::random_range(0.8..1.2));
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        let seen = match db::worker_seen(&pool, me.id).await {
            // Its row was removed (or the hello failed): announce again.
            Ok(false) => me.hello(&pool).await,
            Ok(true) => Ok(()),
            Err(e) => Err(e),
        };
        match seen {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true; // logged once per outage
                tracing::warn!(error = %e, "could not report the worker alive");
            }
            Err(_) => {}
        }
    }
    if let Err(e) = db::worker_bye(&pool, me.id).await {
        tracing::debug!(error = %e, "could not remove the worker's row; it ages out");
    }
}
