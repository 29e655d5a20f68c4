//! Wakes [`App::result`](super::App::result) when a run ends: one `LISTEN`
//! connection per app, started by the first wait, shared by every waiter.
//!
//! The database notifies channel `cairn_run` with the run's id whenever a
//! run completes, fails or is cancelled (a trigger on `cairn.runs`). A
//! notification is a hint: one sent while the connection is down is lost,
//! so a waiter also reads the run's status on a timer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::pooler::Db;
use sqlx::postgres::PgListener;
use tokio::sync::{Notify, OnceCell};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db;

/// The channel the `runs_ended` trigger notifies.
const CHANNEL: &str = "cairn_run";

/// How often a waiter reads the status when no notification came.
pub(super) const RECHECK: Duration = Duration::from_millis(500);

/// The runs being waited for, each with the [`Notify`] its waiters share.
#[derive(Default)]
pub(super) struct RunEnded {
    waiting: Mutex<HashMap<Uuid, Weak<Notify>>>,
    listening: OnceCell<()>,
    /// Cancelled when the app is dropped: the listener then closes.
    stop: CancellationToken,
}

impl Drop for RunEnded {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl RunEnded {
    /// The notifier for `run`. Call `enable()` on its `notified()` future
    /// before reading the run's status, so an end between the read and the
    /// wait is not missed.
    pub(super) fn watch(&self, run: Uuid) -> Arc<Notify> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = waiting.get(&run).and_then(Weak::upgrade) {
            return n;
        }
        waiting.retain(|_, w| w.strong_count() > 0);
        let n = Arc::new(Notify::new());
        waiting.insert(run, Arc::downgrade(&n));
        n
    }

    /// Starts the listener once; returns when it is listening, or when its
    /// first connection failed (it then keeps trying, and the waiters read
    /// on their timer meanwhile).
    pub(super) async fn listen(self: &Arc<Self>, pool: &Db) {
        self.listening
            .get_or_init(|| async {
                let first = db::listen(pool, CHANNEL).await;
                if let Err(e) = &first {
                    tracing::warn!(error = %e, "cannot LISTEN for ended runs yet; App::result polls meanwhile");
                }
                let (me, stop) = (Arc::downgrade(self), self.stop.clone());
                tokio::spawn(run(me, stop, pool.clone(), first.ok()));
            })
            .await;
    }

    fn wake(&self, run: Uuid) {
        let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = waiting.get(&run).and_then(Weak::upgrade) {
            n.notify_waiters();
        }
    }
}

/// Receives notifications until the app is dropped; (re)connects whenever
/// it has no connection.
async fn run(
    ended: Weak<RunEnded>,
    stop: CancellationToken,
    pool: Db,
    mut listener: Option<PgListener>,
) {
    loop {
        let Some(l) = listener.as_mut() else {
            if pool.pool().is_closed() {
                return;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            match db::listen(&pool, CHANNEL).await {
                Ok(l) => listener = Some(l),
                Err(e) => tracing::debug!(error = %e, "LISTEN for ended runs failed; retrying"),
            }
            continue;
        };
        let received = tokio::select! {
            _ = stop.cancelled() => return,
            r = l.try_recv() => r,
        };
        match received {
            Ok(Some(n)) => {
                let Some(ended) = ended.upgrade() else { return };
                if let Ok(run) = n.payload().parse::<Uuid>() {
                    ended.wake(run);
                }
            }
            Ok(None) | Err(_) => listener = None,
        }
    }
}
