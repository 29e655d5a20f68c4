//! Checkpoints: what `cairn.load_run` gives back ([`Recorded`]), what an
//! execution writes ([`Outcome`]), and the [`Outbox`] that carries outcomes
//! to the database on the execution's next call — so a step costs one round
//! trip: the call that begins the next step (or parks, completes or fails
//! the run) also writes the previous step's outcome.
//!
//! A step's handler never starts before the outcome of a step it could
//! depend on is durable: a call that would carry outcomes waits until no
//! other call carrying outcomes is in flight (the barrier), and the SQL side
//! writes the outcomes before it begins the new step. An execution whose
//! outcome conflicts with what another writer recorded (a worker that lost
//! its lease got there first) learns it before any later step starts, and
//! replays.

use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

pub(crate) use crate::db::RecordedStep as Recorded;
use crate::run::{StepKind, StepStatus};

/// A finished attempt (or a recorded value), waiting in the outbox.
#[derive(Debug, Serialize)]
pub(crate) struct Outcome {
    pub key: String,
    pub seq: i32,
    pub kind: StepKind,
    pub attempt: i32,
    pub status: StepStatus,
    pub output: Option<Box<RawValue>>,
    pub error: Option<String>,
    pub fingerprint: Option<String>,
    /// Seconds until the next attempt, for a retrying step.
    pub retry_in: Option<f64>,
}

/// The outcomes an execution has not written yet, and the barrier that
/// orders the calls carrying them.
#[derive(Default)]
pub(crate) struct Outbox {
    pending: Mutex<Vec<Outcome>>,
    barrier: Arc<tokio::sync::Mutex<()>>,
}

/// Outcomes taken from the outbox for one call, as the `done` JSON array.
/// While they are in flight the barrier is held: no other call that could
/// begin a step depending on them goes ahead of them.
pub(crate) struct Carried {
    pub done: String,
    _in_flight: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Outbox {
    pub fn push(&self, outcome: Outcome) {
        self.lock().push(outcome);
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Waits until no outcomes are in flight, then takes what is pending.
    pub async fn carry(&self) -> Carried {
        let guard = Arc::clone(&self.barrier).lock_owned().await;
        let taken = std::mem::take(&mut *self.lock());
        if taken.is_empty() {
            return Carried {
                done: "[]".to_owned(),
                _in_flight: None,
            };
        }
        Carried {
            // Outcomes hold valid JSON only: serializing them cannot fail.
            done: serde_json::to_string(&taken).unwrap_or_else(|_| "[]".to_owned()),
            _in_flight: Some(guard),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Outcome>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Carried {
    /// Whether this call writes outcomes (it must then commit durably).
    pub fn carries(&self) -> bool {
        self._in_flight.is_some()
    }
}

/// A durable call's fingerprint: the first 16 hex digits of the SHA-256 of
/// its name and its input as canonical JSON (object keys sorted), so the
/// same input gives the same fingerprint in every process and release.
pub(crate) fn fingerprint(name: &str, input_json: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(name.as_bytes());
    hasher.update([0]);
    match serde_json::from_str::<serde_json::Value>(input_json) {
        Ok(value) => canonical(&value, &mut hasher),
        Err(_) => hasher.update(input_json.as_bytes()),
    }
    let digest = hasher.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

fn canonical(value: &serde_json::Value, hasher: &mut Sha256) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            hasher.update(b"{");
            for key in keys {
                hasher.update(serde_json::to_string(key).unwrap_or_default().as_bytes());
                hasher.update(b":");
                canonical(&map[key], hasher);
                hasher.update(b",");
            }
            hasher.update(b"}");
        }
        Value::Array(items) => {
            hasher.update(b"[");
            for item in items {
                canonical(item, hasher);
                hasher.update(b",");
            }
            hasher.update(b"]");
        }
        other => hasher.update(other.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_ignore_key_order_and_tell_inputs_apart() {
        let a = fingerprint("charge", r#"{"id": 7, "cents": 1250}"#);
        let b = fingerprint("charge", r#"{"cents":1250,"id":7}"#);
        assert_eq!(a, b);
        assert_eq!(a.len(), 16);
        assert_ne!(a, fingerprint("charge", r#"{"cents":1250,"id":8}"#));
        assert_ne!(a, fingerprint("refund", r#"{"cents":1250,"id":7}"#));
    }

    #[test]
    fn statuses_and_kinds_round_trip() {
        for s in StepStatus::ALL {
            assert_eq!(StepStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for k in StepKind::ALL {
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
    }
}
