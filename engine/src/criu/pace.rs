//! An optional cap on the background transfer's rate, shared by both page
//! sources (`ringfault criu-lazy-pages --background-rate`).
//!
//! # Mechanism
//! A debt clock: each background run or request spends `bytes / rate` of
//! time, pushing the time it may go on forward; the next one waits until the
//! clock has caught up. Faults are never paced. Without a rate the clock
//! never moves and the background runs as fast as it can (the default, as
//! `criu lazy-pages`).
//!
//! # Hazards
//! A source that stops on a paced turn must wake again by itself: the loop
//! sleeps at most [`Pace::wait`] (through the source's `sleep_limit`).

use std::time::{Duration, Instant};

/// The background's rate cap.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Bytes per second; 0 for none.
    rate: u64,
    ready_at: Option<Instant>,
}

impl Pace {
    /// A cap of `rate` bytes per second (0: no cap).
    pub fn new(rate: u64) -> Pace {
        Pace {
            rate,
            ready_at: None,
        }
    }

    /// Whether a cap is set.
    pub fn limited(&self) -> bool {
        self.rate != 0
    }

    /// Whether the background may send or install more at `now`.
    pub fn ready(&self, now: Instant) -> bool {
        self.ready_at.is_none_or(|t| now >= t)
    }

    /// The background moved `bytes` at `now`.
    pub fn spend(&mut self, now: Instant, bytes: u64) {
        if self.rate == 0 {
            return;
        }
        let from = self.ready_at.map_or(now, |t| t.max(now));
        let nanos = u128::from(bytes) * 1_000_000_000 / u128::from(self.rate);
        let cost = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        self.ready_at = Some(from + cost);
    }

    /// How long until the background may go on (zero if it may now).
    pub fn wait(&self, now: Instant) -> Duration {
        self.ready_at
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let mut p = Pace::new(0);
        let t = Instant::now();
        p.spend(t, 1 << 30);
        assert!(p.ready(t));
        assert_eq!(p.wait(t), Duration::ZERO);
        assert!(!p.limited());
    }

    #[test]
    fn a_cap_spreads_the_bytes_over_time() {
        // 1 MiB/s: 256 KiB costs 250 ms.
        let mut p = Pace::new(1 << 20);
        let t = Instant::now();
        assert!(p.ready(t));
        p.spend(t, 256 << 10);
        assert!(!p.ready(t));
        assert_eq!(p.wait(t), Duration::from_millis(250));
        assert!(p.ready(t + Duration::from_millis(250)));
        // Debt adds up while the clock is ahead.
        p.spend(t, 256 << 10);
        assert_eq!(p.wait(t), Duration::from_millis(500));
        // Idle time is not banked.
        let later = t + Duration::from_secs(10);
        p.spend(later, 256 << 10);
        assert_eq!(p.wait(later), Duration::from_millis(250));
    }
}
