//! When a peer task acts: its next handshake attempt (backoff after failures, the periodic
//! rekey, a rotation), when a retired epoch is deleted, when a previous agent's leftovers are
//! swept, and when an unreachable peer loses its keys.
//!
//! Pure: every method takes `now`, so the decisions are tested without sleeping; the task sleeps
//! until [`Schedule::next_wake`] on tokio's clock, which paused-time tests drive.

use std::time::Duration;

use tokio::time::Instant;

use super::{InstalledEpoch, RESPONDER_PATIENCE};

/// First retry delay after a failure; doubles up to [`MAX_BACKOFF`].
pub(super) const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait between two attempts at a failing peer.
pub(super) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The durations a schedule works with (from the agent's settings).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Timing {
    /// Rekey this often (preferred initiator).
    pub rekey_interval: Duration,
    /// Keep a previous epoch this long after a flip.
    pub grace: Duration,
    /// Remove the keys of a peer no handshake succeeded with for this long.
    pub retention: Duration,
}

/// One peer's timers.
#[derive(Debug)]
pub(super) struct Schedule {
    timing: Timing,
    backoff: Duration,
    next_attempt: Option<Instant>,
    /// When the current keys are due for their periodic rekey.
    rekey_due: Option<Instant>,
    /// Since when handshakes with an established peer fail (the retention clock).
    unreachable_since: Option<Instant>,
    /// Previous epochs and when they are deleted.
    retiring: Vec<(InstalledEpoch, Instant)>,
    /// A previous agent left objects for this peer; swept a grace period after our first flip.
    leftovers: bool,
    sweep_at: Option<Instant>,
}

impl Schedule {
    /// A peer met for the first time: attempt at `first_attempt`.
    pub fn new(timing: Timing, first_attempt: Instant, leftovers: bool) -> Self {
        Self {
            timing,
            backoff: FIRST_BACKOFF,
            next_attempt: Some(first_attempt),
            rekey_due: None,
            unreachable_since: None,
            retiring: Vec::new(),
            leftovers,
            sweep_at: None,
        }
    }

    /// Attempts a handshake at `at`, or earlier if one is already planned.
    pub fn attempt_at(&mut self, at: Instant) {
        self.next_attempt = Some(self.next_attempt.map_or(at, |t| t.min(at)));
    }

    /// The earliest instant something is due. The retention clock counts only while the peer
    /// has keys to lose.
    pub fn next_wake(&self, has_keys: bool) -> Option<Instant> {
        let retire = self.retiring.iter().map(|(_, at)| *at).min();
        let expire = self
            .unreachable_since
            .filter(|_| has_keys)
            .map(|since| since + self.timing.retention);
        [self.next_attempt, retire, self.sweep_at, expire]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether the current keys are due for their periodic (or limit-driven) rekey.
    pub fn rekey_due(&self, now: Instant) -> bool {
        self.rekey_due.is_some_and(|t| t <= now)
    }

    /// Rekeys now: after `delay` (a non-preferred initiator's patience), whatever the periodic
    /// clock says.
    pub fn rekey_now(&mut self, now: Instant, delay: Duration) {
        self.rekey_due = Some(now);
        self.attempt_at(now + delay);
    }

    /// A key agreement succeeded: the backoff starts over, the retention clock stops, the next
    /// rekey is `rekey_in` from now and, the first time, a previous agent's leftovers are swept
    /// once the grace period has let traffic move to our keys.
    pub fn succeeded(&mut self, now: Instant, rekey_in: Duration) {
        self.backoff = FIRST_BACKOFF;
        if std::mem::take(&mut self.leftovers) {
            self.sweep_at = Some(now + self.timing.grace);
        }
        self.unreachable_since = None;
        let due = now + rekey_in;
        self.rekey_due = Some(due);
        self.attempt_at(due);
    }

    /// A key agreement failed: retry after the backoff, which doubles; a peer with keys starts
    /// its retention clock.
    pub fn failed(&mut self, now: Instant, has_keys: bool) {
        if has_keys && self.unreachable_since.is_none() {
            self.unreachable_since = Some(now);
        }
        self.attempt_at(now + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Traffic left `epoch`; it is deleted a grace period from now.
    pub fn retire_later(&mut self, now: Instant, epoch: InstalledEpoch) {
        self.retiring.push((epoch, now + self.timing.grace));
    }

    /// The retired epochs due for deletion, removed from the schedule.
    pub fn take_retirements(&mut self, now: Instant) -> Vec<InstalledEpoch> {
        let (due, keep) = std::mem::take(&mut self.retiring)
            .into_iter()
            .partition(|(_, at)| *at <= now);
        self.retiring = keep;
        due.into_iter().map(|(epoch, _)| epoch).collect()
    }

    /// Forgets every retiring epoch (the peer's objects were all removed).
    pub fn clear_retirements(&mut self) {
        self.retiring.clear();
    }

    /// Whether the sweep of leftovers is due (then it is not due again).
    pub fn take_sweep(&mut self, now: Instant) -> bool {
        let due = self.sweep_at.is_some_and(|t| t <= now);
        if due {
            self.sweep_at = None;
        }
        due
    }

    /// Whether the planned attempt is due (then it is no longer planned).
    pub fn take_attempt(&mut self, now: Instant) -> bool {
        let due = self.next_attempt.is_some_and(|t| t <= now);
        if due {
            self.next_attempt = None;
        }
        due
    }

    /// Whether a peer with keys has been unreachable for the retention period.
    pub fn unreachable_too_long(&self, now: Instant, has_keys: bool) -> bool {
        has_keys
            && self
                .unreachable_since
                .is_some_and(|since| now.saturating_duration_since(since) >= self.timing.retention)
    }

    /// The periodic rekey interval: the preferred initiator keeps the clock (with `jitter`, a
    /// factor near 1, so that a cluster's rekeys spread out); the other side steps in only if
    /// it does not.
    pub fn rekey_interval(&self, preferred: bool, jitter: f64) -> Duration {
        if preferred {
            self.timing.rekey_interval.mul_f64(jitter)
        } else {
            self.timing.rekey_interval.mul_f64(1.25)
        }
    }
}

/// How long to wait before starting a handshake both sides want: the preferred initiator goes
/// at once, the other gives it [`RESPONDER_PATIENCE`].
pub(super) fn patience(preferred: bool) -> Duration {
    if preferred {
        Duration::ZERO
    } else {
        RESPONDER_PATIENCE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nodeseal_keymgr::Epoch;

    const TIMING: Timing = Timing {
        rekey_interval: Duration::from_secs(3600),
        grace: Duration::from_secs(30),
        retention: Duration::from_secs(300),
    };

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_doubling_up_to_the_cap_and_a_success_resets() {
        let t0 = Instant::now();
        let mut s = Schedule::new(TIMING, t0, false);
        assert!(s.take_attempt(t0));
        assert!(!s.take_attempt(t0), "taken once");
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..9 {
            s.failed(now, false);
            let at = s.next_wake(false).unwrap();
            waits.push(at - now);
            assert!(s.take_attempt(at));
            now = at;
        }
        let ms = |m| Duration::from_millis(m);
        assert_eq!(
            waits,
            [
                ms(500),
                ms(1000),
                ms(2000),
                ms(4000),
                ms(8000),
                ms(16000),
                MAX_BACKOFF,
                MAX_BACKOFF,
                MAX_BACKOFF
            ]
        );
        s.succeeded(now, secs(3600));
        assert!(
            s.take_attempt(now + secs(3600)),
            "the rekey is the next attempt"
        );
        s.failed(now, true);
        assert_eq!(s.next_wake(true), Some(now + FIRST_BACKOFF));
    }

    #[tokio::test(start_paused = true)]
    async fn the_periodic_rekey_falls_due_after_the_interval() {
        let t0 = Instant::now();
        let mut s = Schedule::new(TIMING, t0, false);
        s.take_attempt(t0);
        let rekey = s.rekey_interval(true, 1.0);
        s.succeeded(t0, rekey);
        assert!(!s.rekey_due(t0 + secs(3599)));
        assert!(s.rekey_due(t0 + secs(3600)));
        assert_eq!(s.next_wake(true), Some(t0 + secs(3600)));
        // The other side waits a quarter longer, so the preferred initiator's rekey comes first.
        assert_eq!(s.rekey_interval(false, 1.0), secs(4500));
        assert_eq!(s.rekey_interval(true, 0.9), secs(3240));
        // A usage limit brings the rekey forward, after the patience of the non-preferred side.
        s.rekey_now(t0 + secs(10), patience(false));
        assert!(s.rekey_due(t0 + secs(10)));
        assert_eq!(s.next_wake(true), Some(t0 + secs(10) + RESPONDER_PATIENCE));
    }

    #[tokio::test(start_paused = true)]
    async fn previous_epochs_retire_after_the_grace_period() {
        let t0 = Instant::now();
        let mut s = Schedule::new(TIMING, t0 + secs(3600), false);
        // One epoch number installed twice: each installation retires on its own.
        let (first, second) = (
            InstalledEpoch::new(Epoch(1), 1),
            InstalledEpoch::new(Epoch(1), 2),
        );
        s.retire_later(t0, first);
        s.retire_later(t0 + secs(10), second);
        assert_eq!(s.next_wake(true), Some(t0 + secs(30)));
        assert!(s.take_retirements(t0 + secs(29)).is_empty());
        assert_eq!(s.take_retirements(t0 + secs(30)), [first]);
        assert_eq!(s.next_wake(true), Some(t0 + secs(40)));
        s.clear_retirements();
        assert!(s.take_retirements(t0 + secs(100)).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn leftovers_are_swept_a_grace_period_after_the_first_success_only() {
        let t0 = Instant::now();
        let mut s = Schedule::new(TIMING, t0, true);
        s.take_attempt(t0);
        s.succeeded(t0, secs(3600));
        assert_eq!(s.next_wake(true), Some(t0 + secs(30)));
        assert!(!s.take_sweep(t0 + secs(29)));
        assert!(s.take_sweep(t0 + secs(30)));
        assert!(!s.take_sweep(t0 + secs(31)), "swept once");
        s.succeeded(t0 + secs(60), secs(3600));
        assert!(!s.take_sweep(t0 + secs(1000)), "not after later successes");
        let mut clean = Schedule::new(TIMING, t0, false);
        clean.succeeded(t0, secs(3600));
        assert!(!clean.take_sweep(t0 + secs(1000)));
    }

    #[tokio::test(start_paused = true)]
    async fn retention_counts_from_the_first_failure_while_keys_exist() {
        let t0 = Instant::now();
        let mut s = Schedule::new(TIMING, t0, false);
        s.take_attempt(t0);
        // Without keys there is nothing to lose: no retention clock.
        s.failed(t0, false);
        assert!(!s.unreachable_too_long(t0 + secs(1000), false));
        s.succeeded(t0, secs(3600));
        let first = t0 + secs(5);
        s.failed(first, true);
        s.failed(first + secs(100), true);
        assert!(s.next_wake(true) <= Some(first + secs(300)));
        assert!(!s.unreachable_too_long(first + secs(299), true));
        assert!(s.unreachable_too_long(first + secs(300), true));
        assert!(!s.unreachable_too_long(first + secs(300), false));
        s.succeeded(first + secs(301), secs(3600));
        assert!(!s.unreachable_too_long(first + secs(1000), true));
    }
}
