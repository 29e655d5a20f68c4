//! Extends the leases of running jobs every third of the lease, and stops
//! the handlers of jobs whose lease was lost: it ran out and another worker
//! claimed the job, or the job was deleted (its run was cancelled). Every
//! running job is checked at every beat, so a handler learns of a cancel
//! within one beat.

use std::sync::Arc;
use std::time::Duration;

use crate::pooler::Db;
use tokio_util::sync::CancellationToken;

use super::InFlight;
use crate::db;

pub(super) async fn run(
    pool: Db,
    lease: Duration,
    in_flight: Arc<InFlight>,
    stop: CancellationToken,
) {
    // Three beats per lease: two may fail before the lease runs out.
    let beat = lease / 3;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(beat) => {}
        }
        let due: Vec<(i64, i64)> = in_flight
            .lock()
            .iter()
            .map(|(&id, r)| (id, r.lease))
            .collect();
        if due.is_empty() {
            continue;
        }
        let (ids, leases): (Vec<i64>, Vec<i64>) = due.iter().copied().unzip();
        match db::extend(&pool, &ids, &leases, lease).await {
            Ok(held) => {
                for (id, lease) in due {
                    if !held.contains(&id) && in_flight.abandon(id, lease) {
                        tracing::warn!(
                            job = id,
                            "lease lost (expired and claimed elsewhere, or the run was cancelled); handler aborted"
                        );
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not extend leases"),
        }
    }
}
