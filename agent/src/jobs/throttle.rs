//! A pure token bucket: the caller passes `now`, so it is deterministic
//! under test and never sleeps by itself.

use std::time::Duration;

/// Bytes-per-second limiter; a rate of 0 means unlimited.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    tokens: f64,
    last: Duration,
}

impl TokenBucket {
    /// A bucket allowing `rate` bytes/s, with one second of burst.
    pub fn new(rate: u64, now: Duration) -> Self {
        Self { rate, tokens: rate as f64, last: now }
    }

    /// Changes the rate (takes effect immediately).
    pub fn set_rate(&mut self, rate: u64, now: Duration) {
        self.refill(now);
        if self.rate == 0 || rate == 0 {
            // No debt survives a time without a limit.
            self.tokens = self.tokens.max(0.0);
        }
        self.rate = rate;
        self.tokens = self.tokens.min(rate as f64);
    }

    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.rate.max(1) as f64);
    }

    /// Takes `bytes`; returns how long to wait before the work may start.
    pub fn take(&mut self, bytes: u64, now: Duration) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        self.refill(now);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_enforced_over_time() {
        let t = Duration::from_secs;
        let mut b = TokenBucket::new(1000, t(0));
        assert_eq!(b.take(1000, t(0)), Duration::ZERO, "one second of burst");
        assert_eq!(b.take(500, t(0)), Duration::from_millis(500));
        assert_eq!(b.take(500, t(1)), Duration::ZERO, "refilled after the debt");
        b.set_rate(0, t(1));
        assert_eq!(b.take(u64::MAX, t(1)), Duration::ZERO, "0 = unlimited");
    }
}
