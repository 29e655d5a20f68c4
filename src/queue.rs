//! Queues: the rule for their names, and their counters.

use chrono::{DateTime, Utc};

use crate::error::{Error, Result};

/// One queue's counters, from `cairn.metrics`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, sqlx::FromRow)]
#[non_exhaustive]
pub struct QueueMetrics {
    /// The queue's name.
    #[sqlx(rename = "queue_name")]
    pub queue: String,
    /// Jobs visible now, waiting for a worker.
    pub ready: i64,
    /// Jobs scheduled for later (a delay or a retry backoff).
    pub delayed: i64,
    /// Jobs leased by a worker right now.
    pub in_flight: i64,
    /// Dead-lettered jobs kept in `cairn.archive`.
    pub dead: i64,
    /// Completed jobs kept in `cairn.archive`.
    pub completed: i64,
    /// How long the oldest ready job has been waiting, in seconds.
    pub oldest_ready_age: f64,
    /// The database time of the measurement.
    pub measured_at: DateTime<Utc>,
}

/// Rust-side twin of `cairn.check_queue_name`: reject before the database.
pub(crate) fn validate_queue_name(name: &str) -> Result<()> {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "invalid queue name {name:?}: use 1 to 63 characters of a-z, 0-9 and _, not starting with a digit"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names() {
        for ok in ["emails", "_x", "q1_b"] {
            assert!(validate_queue_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Emails", "1q", "a-b", "a b", "a;drop", &"x".repeat(64)] {
            assert!(validate_queue_name(bad).is_err(), "{bad}");
        }
    }
}
