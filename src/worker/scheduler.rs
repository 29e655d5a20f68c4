//! Fires due schedule ticks (`cairn.tick_schedules`) and the flow timers
//! that ran out (`cairn.fire_timers`): about once a second, and again at
//! once while a call fires a full batch. Every worker runs one; the database
//! splits due schedules between them (SKIP LOCKED) and fires a tick once,
//! and a timer fires once under its run's lock. With nothing due each call
//! is one index probe.

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
            let fired = async {
                let ticks = db::tick_schedules(&pool, TICK_BATCH).await?;
                let timers = db::fire_timers(&pool, TICK_BATCH).await?;
                Ok::<_, crate::Error>((ticks, timers))
            };
            match fired.await {
                Ok((ticks, timers)) => {
                    failing = false;
                    if ticks + timers > 0 {
                        tracing::debug!(ticks, timers, "schedule ticks and flow timers fired");
                    }
                    if ticks < TICK_BATCH && timers < TICK_BATCH {
                        break;
                    }
                }
                Err(e) => {
                    // Logged once per outage, not once a second.
                    if !failing {
                        tracing::warn!(error = %e, "could not fire due schedules and timers");
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
