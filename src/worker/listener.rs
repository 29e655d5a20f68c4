//! Wakes the claim loop when a job is sent to one of its queues.
//!
//! `NOTIFY` is only a hint: a notification sent while the connection is down
//! is lost, so after every (re)connect the claim loop is woken to poll once,
//! and it polls on a timer regardless.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::pooler::Db;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Counters;
use crate::db;

/// The channel every cairn NOTIFY goes to; the payload is the queue name.
pub(crate) const CHANNEL: &str = "cairn";

pub(super) async fn run(
    pool: Db,
    queues: HashSet<String>,
    wake: Arc<Notify>,
    stop: CancellationToken,
    counters: Arc<Counters>,
) {
    let mut first = true;
    while !stop.is_cancelled() {
        let mut listener = match db::listen(&pool, CHANNEL).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "LISTEN connection failed; polling meanwhile");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        if !first {
            counters.listener_reconnects.fetch_add(1, Ordering::Relaxed);
        }
        first = false;
        wake.notify_one();
        loop {
            let received = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.try_recv() => r,
            };
            match received {
                Ok(Some(n)) => {
                    if queues.contains(n.payload()) {
                        wake.notify_one();
                    }
                }
                // The connection dropped; reconnect and poll once.
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection failed; reconnecting");
                    break;
                }
            }
        }
    }
}
