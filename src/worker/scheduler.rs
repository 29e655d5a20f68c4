//! Fires due schedule ticks (`cairn.tick_schedules`): about once a second,
//! and again at once while a call fires a full batch. Every worker runs one;
//! the database splits due schedules between them (SKIP LOCKED) and fires a
//! tick once. With nothing due a call is one index probe.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::db;
use crate::pooler::Db;

/// Ticks fired (or skipped) per call: a long outage under
/// [`Missed::CatchUp`](crate::Missed::CatchUp) is caught up this many at a
/// time.
pub(crate) const TICK_BATCH: u32 = 100;

pub(super) async fn run(pool: Db, every: Duration, stop: CancellationToken) {
    let mut failing = false;
    loop {
        // Jittered, so the workers of a fleet spread their calls out.
        let wait = every.mul_f64(rand::random_range(0.75..1.25));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        loop {
            match db::tick_schedules(&pool, TICK_BATCH).await {
                Ok(fired) => {
                    failing = false;
                    if fired > 0 {
                        tracing::debug!(fired, "schedule ticks fired");
                    }
                    if fired < TICK_BATCH {
                        break;
                    }
                }
                Err(e) => {
                    // Logged once per outage, not once a second.
                    if !failing {
                        tracing::warn!(error = %e, "could not fire due schedules");
                    }
                    failing = true;
                    break;
                }
            }
            if stop.is_cancelled() {
                return;
            }
        }
    }
}
