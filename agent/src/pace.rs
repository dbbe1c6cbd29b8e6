//! How long a handshake may take, following this node's measured speed.
//!
//! Fixed limits are guesses about the machine: on an overloaded node or an emulated VM a TLS
//! handshake can take longer than any guess made on a fast one, and then every attempt runs
//! out of time, backs off and runs out of time again, and the fabric never forms. A slow machine
//! must make the fabric slower, not broken, so the limit follows what handshakes take here:
//! after a success it moves towards four times that handshake's duration; after an outgoing
//! handshake runs out of time it grows by half. It stays within [`Pace::MIN`] and [`Pace::MAX`].
//!
//! Only this node's outgoing handshakes to known peers and its completed key agreements teach
//! it. The answering side always allows [`Pace::MAX`]: it cannot know how long the initiator
//! is willing to wait, and a shorter limit there would cut off exactly the handshakes a slow
//! initiator needs (both limits would then stay low for good). Stalled incoming connections
//! hold at most four handshake slots per node address (`server`), however long they last.

use std::sync::Mutex;
use std::time::Duration;

/// The node-wide handshake limit.
#[derive(Debug)]
pub struct Pace {
    timeout: Mutex<Duration>,
}

impl Pace {
    /// The limit on a responsive machine, and the lowest it goes.
    pub const MIN: Duration = Duration::from_secs(10);
    /// The highest it goes: a handshake slower than this is a peer that does not answer.
    pub const MAX: Duration = Duration::from_secs(60);

    /// Starts at [`Self::MIN`].
    #[must_use]
    pub fn new() -> Self {
        Self {
            timeout: Mutex::new(Self::MIN),
        }
    }

    /// The limit on one TLS handshake and Hello exchange (each side).
    #[must_use]
    pub fn handshake_timeout(&self) -> Duration {
        self.timeout.lock().map_or(Self::MIN, |t| *t)
    }

    /// The limit on the `Installed` exchange (one round trip after the keys): the same.
    #[must_use]
    pub fn confirm_timeout(&self) -> Duration {
        self.handshake_timeout()
    }

    /// A key agreement completed in `took`.
    pub fn succeeded(&self, took: Duration) {
        self.update(|current| {
            let target = (took * 4).clamp(Self::MIN, Self::MAX);
            if target >= current {
                target
            } else {
                // Down slowly: one fast handshake on a machine that is mostly slow is no reason
                // to cut every other peer's limit at once.
                current - (current - target) / 4
            }
        });
    }

    /// An outgoing handshake ran out of time.
    pub fn timed_out(&self) {
        self.update(|current| (current * 3 / 2).min(Self::MAX));
    }

    fn update(&self, f: impl FnOnce(Duration) -> Duration) {
        if let Ok(mut t) = self.timeout.lock() {
            *t = f(*t).clamp(Self::MIN, Self::MAX);
        }
    }
}

impl Default for Pace {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_fast_machine_keeps_the_minimum() {
        let pace = Pace::new();
        for _ in 0..100 {
            pace.succeeded(Duration::from_millis(30));
        }
        assert_eq!(pace.handshake_timeout(), Pace::MIN);
        assert_eq!(pace.confirm_timeout(), Pace::MIN);
    }

    #[test]
    fn slow_handshakes_raise_the_limit_at_once_and_it_comes_down_slowly() {
        let pace = Pace::new();
        pace.succeeded(secs(8));
        assert_eq!(pace.handshake_timeout(), secs(32));
        pace.succeeded(secs(1));
        assert_eq!(
            pace.handshake_timeout(),
            Duration::from_millis(26_500),
            "a quarter of the way down to 10 s"
        );
        for _ in 0..40 {
            pace.succeeded(secs(1));
        }
        assert!(
            pace.handshake_timeout() < secs(11),
            "{:?}",
            pace.handshake_timeout()
        );
    }

    #[test]
    fn timeouts_grow_the_limit_by_half_up_to_the_maximum() {
        let pace = Pace::new();
        pace.timed_out();
        assert_eq!(pace.handshake_timeout(), secs(15));
        for _ in 0..20 {
            pace.timed_out();
        }
        assert_eq!(pace.handshake_timeout(), Pace::MAX);
        pace.succeeded(secs(100));
        assert_eq!(
            pace.handshake_timeout(),
            Pace::MAX,
            "never above the maximum"
        );
    }
}
