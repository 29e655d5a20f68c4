//! Retry policies and backoff arithmetic.

use std::time::Duration;

use crate::error::{HandlerError, HandlerErrorKind};

/// How the delay before the next attempt grows.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Backoff {
    /// The same delay after every failure.
    Fixed(Duration),
    /// `base × n` after the n-th failure.
    Linear(Duration),
    /// `base × factor^(n-1)` after the n-th failure.
    Exponential {
        /// The delay after the first failure.
        base: Duration,
        /// The growth factor (≥ 1).
        factor: f64,
    },
}

/// When and how often a failed job is retried.
///
/// The default: 10 attempts in all, exponential backoff from 1 s doubling,
/// capped at 1 hour, with ±25 % jitter.
///
/// ```
/// use cairn::{Backoff, RetryPolicy};
/// use std::time::Duration;
///
/// let policy = RetryPolicy::default()
///     .max_attempts(5)
///     .backoff(Backoff::Linear(Duration::from_secs(2)))
///     .max_delay(Duration::from_secs(60))
///     .jitter(0.0);
/// assert_eq!(policy.delay_after(3), Duration::from_secs(6));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    max_attempts: u32,
    backoff: Backoff,
    max_delay: Duration,
    jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            backoff: Backoff::Exponential {
                base: Duration::from_secs(1),
                factor: 2.0,
            },
            max_delay: Duration::from_secs(3600),
            jitter: 0.25,
        }
    }
}

impl RetryPolicy {
    /// Total attempts, the first included (default 10; at least 1). A job
    /// that fails its last attempt is dead-lettered.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The backoff curve (default exponential from 1 s, factor 2).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The longest delay between attempts (default 1 hour).
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// Random spread applied to each delay, as a fraction: 0.25 gives a delay
    /// uniformly within ±25 % of the curve (default 0.25; clamped to 0..=1).
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self
    }

    /// The configured number of attempts.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// Whether a job that just failed its `attempt`-th delivery gets another.
    pub fn should_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// The delay after the `failures`-th failure, before jitter, capped.
    pub fn delay_after(&self, failures: u32) -> Duration {
        let n = failures.max(1);
        let secs = match self.backoff {
            Backoff::Fixed(d) => d.as_secs_f64(),
            Backoff::Linear(base) => base.as_secs_f64() * f64::from(n),
            Backoff::Exponential { base, factor } => {
                // Cap the exponent: beyond it the cap applies anyway.
                base.as_secs_f64() * factor.max(1.0).powi((n - 1).min(64) as i32)
            }
        };
        secs_capped(secs, self.max_delay)
    }

    /// [`delay_after`](Self::delay_after) with this policy's jitter applied.
    pub fn jittered_delay_after(&self, failures: u32) -> Duration {
        let base = self.delay_after(failures).as_secs_f64();
        if self.jitter == 0.0 {
            return Duration::from_secs_f64(base);
        }
        let spread = rand::random_range(-self.jitter..=self.jitter);
        secs_capped(base * (1.0 + spread), self.max_delay)
    }
}

/// What a failed attempt leads to.
pub(crate) enum Verdict {
    /// Try again after `delay`.
    Retry { delay: Duration, error: String },
    /// No more attempts: the error says why.
    GiveUp { error: String },
}

impl RetryPolicy {
    /// Decides after the `attempt`-th attempt failed with `err`: a fatal
    /// error or the last attempt gives up; otherwise retry after the error's
    /// `retry_after` or the policy's jittered backoff.
    pub(crate) fn verdict(&self, attempt: u32, err: &HandlerError) -> Verdict {
        let error = err.to_string();
        match err.kind() {
            HandlerErrorKind::Fatal => Verdict::GiveUp { error },
            _ if !self.should_retry(attempt) => Verdict::GiveUp {
                error: format!(
                    "{error} (attempt {attempt} of {}, giving up)",
                    self.max_attempts
                ),
            },
            HandlerErrorKind::RetryAfter(delay) => Verdict::Retry { delay, error },
            _ => Verdict::Retry {
                delay: self.jittered_delay_after(attempt),
                error,
            },
        }
    }
}

fn secs_capped(secs: f64, cap: Duration) -> Duration {
    if secs.is_finite() && secs >= 0.0 {
        Duration::from_secs_f64(secs.min(cap.as_secs_f64()))
    } else {
        cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn curves() {
        let p = RetryPolicy::default().jitter(0.0).max_delay(secs(100));
        let fixed = p.backoff(Backoff::Fixed(secs(7)));
        assert_eq!([1, 2, 9].map(|n| fixed.delay_after(n)), [secs(7); 3]);
        let linear = p.backoff(Backoff::Linear(secs(3)));
        assert_eq!(
            [1, 2, 5].map(|n| linear.delay_after(n)),
            [secs(3), secs(6), secs(15)]
        );
        let exp = p.backoff(Backoff::Exponential {
            base: secs(1),
            factor: 2.0,
        });
        assert_eq!(
            [1, 2, 3, 7, 8].map(|n| exp.delay_after(n)),
            [secs(1), secs(2), secs(4), secs(64), secs(100)]
        );
    }

    #[test]
    fn huge_attempt_numbers_hit_the_cap_without_overflow() {
        let p = RetryPolicy::default();
        assert_eq!(p.delay_after(u32::MAX), secs(3600));
        let fast = p.backoff(Backoff::Exponential {
            base: secs(1),
            factor: 1e300,
        });
        assert_eq!(fast.delay_after(40), secs(3600));
    }

    #[test]
    fn jitter_stays_within_its_band_and_under_the_cap() {
        let p = RetryPolicy::default()
            .backoff(Backoff::Fixed(secs(10)))
            .jitter(0.5)
            .max_delay(secs(12));
        for _ in 0..1000 {
            let d = p.jittered_delay_after(1).as_secs_f64();
            assert!((5.0..=12.0).contains(&d), "{d}");
        }
    }

    #[test]
    fn attempts_budget() {
        let p = RetryPolicy::default().max_attempts(3);
        assert!(p.should_retry(1) && p.should_retry(2));
        assert!(!p.should_retry(3));
        assert_eq!(RetryPolicy::default().max_attempts(0).attempts(), 1);
    }
}
