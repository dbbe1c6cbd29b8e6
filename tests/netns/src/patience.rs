//! Bounds that follow the machine's speed. The scenarios' bounds (`CONVERGE` and the like) were
//! set on an idle qemu TCG guest of the project's machines; on a busier machine (two test VMs
//! sharing two cores, a build beside them) the agents get less CPU per second and need more
//! seconds for the same work. A [`Patience`] counts a bound in the reference machine's time: it
//! measures, every second or so, how long a fixed piece of work takes here, and lets wall time
//! count for less while the machine is slower than the reference, up to [`MAX_STRETCH`] times
//! the bound (so a broken scenario still fails in bounded time).

use std::hint::black_box;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// At most this many times the bound in wall time.
pub const MAX_STRETCH: f64 = 4.0;
/// How long [`work`] takes (debug build) in the qemu TCG guest of the project's machines (2
/// vCPUs), where the bounds were set: 29 ms with a cargo build beside the VM, measured with
/// `cargo xtask test --netns-only --kernels 6.12 -- patience --nocapture`; a little below
/// that, so an ordinary run keeps the bounds as written. Natively it takes about 1.6 ms.
const REFERENCE: Duration = Duration::from_millis(25);
/// How often the speed is measured while waiting.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// A fixed piece of CPU work (a xorshift walk); its time is the speed sample.
fn work() -> Duration {
    let started = Instant::now();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..200_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = black_box(x);
    }
    black_box(x);
    started.elapsed()
}

/// How many times slower than the reference this machine runs now (at least 1). Measured at
/// most once per [`PROBE_EVERY`] for the whole process: waits start often and in many threads.
pub fn slowdown() -> f64 {
    static LAST: Mutex<Option<(Instant, f64)>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((at, value)) = *last
        && at.elapsed() < PROBE_EVERY
    {
        return value;
    }
    let value = (work().as_secs_f64() / REFERENCE.as_secs_f64()).clamp(1.0, MAX_STRETCH);
    *last = Some((Instant::now(), value));
    value
}

/// A bound counted in the reference machine's time.
pub struct Patience<P = fn() -> f64> {
    bound: Duration,
    started: Instant,
    last: Instant,
    /// Reference time counted so far.
    spent: Duration,
    slowdown: f64,
    next_probe: Instant,
    probe: P,
}

impl Patience {
    /// Starts counting `bound` now, measuring this machine's speed.
    pub fn new(bound: Duration) -> Self {
        Self::with_probe(bound, Instant::now(), slowdown)
    }
}

impl<P: FnMut() -> f64> Patience<P> {
    /// Starts counting `bound` at `now`, with `probe` telling the current slowdown.
    pub fn with_probe(bound: Duration, now: Instant, mut probe: P) -> Self {
        let slowdown = probe().clamp(1.0, MAX_STRETCH);
        Self {
            bound,
            started: now,
            last: now,
            spent: Duration::ZERO,
            slowdown,
            next_probe: now + PROBE_EVERY,
            probe,
        }
    }

    /// Whether the bound has passed at `now`.
    pub fn exhausted_at(&mut self, now: Instant) -> bool {
        let wall = now.saturating_duration_since(self.last);
        self.spent += wall.div_f64(self.slowdown);
        self.last = now;
        if now >= self.next_probe {
            // Smoothed: one sample can land on a moment the probe itself was descheduled.
            let sample = (self.probe)().clamp(1.0, MAX_STRETCH);
            self.slowdown = f64::midpoint(self.slowdown, sample);
            self.next_probe = now + PROBE_EVERY;
        }
        self.spent >= self.bound
            || now.saturating_duration_since(self.started) >= self.bound.mul_f64(MAX_STRETCH)
    }

    /// Whether the bound has passed.
    pub fn exhausted(&mut self) -> bool {
        self.exhausted_at(Instant::now())
    }

    /// Wall time since the start, and the slowdown last measured (for reports).
    pub fn waited(&self) -> (Duration, f64) {
        (
            self.last.saturating_duration_since(self.started),
            self.slowdown,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_machine_gets_proportionally_more_wall_time_up_to_the_cap() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let bound = Duration::from_secs(10);

        // As fast as the reference: the bound is the bound.
        let mut fast = Patience::with_probe(bound, start, || 0.5);
        assert!(!fast.exhausted_at(at(9_900)));
        assert!(fast.exhausted_at(at(10_000)));

        // Twice as slow: twice the wall time.
        let mut slow = Patience::with_probe(bound, start, || 2.0);
        for ms in (500..20_000).step_by(500) {
            assert!(!slow.exhausted_at(at(ms)), "exhausted at {ms} ms");
        }
        assert!(slow.exhausted_at(at(20_000)));

        // Hopelessly slow: the cap.
        let mut stuck = Patience::with_probe(bound, start, || 100.0);
        assert!(!stuck.exhausted_at(at(39_000)));
        assert!(stuck.exhausted_at(at(40_000)));
    }

    #[test]
    fn a_machine_slowing_down_midway_stretches_only_the_rest() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut probes = 0;
        // 5 s at full speed (the sample at the start and at 1..4 s), then three times slower;
        // the smoothed estimate gets there within a few probes.
        let mut p = Patience::with_probe(Duration::from_secs(10), start, move || {
            probes += 1;
            if probes <= 5 { 1.0 } else { 3.0 }
        });
        let mut ms = 0;
        while !p.exhausted_at(at(ms)) {
            ms += 100;
            assert!(ms <= 40_000);
        }
        assert!(
            (18_000..=22_000).contains(&ms),
            "bound of 10 s reached after {ms} ms"
        );
    }

    #[test]
    fn the_work_sample_is_measurable() {
        let d = work();
        assert!(d > Duration::ZERO && d < Duration::from_secs(5), "{d:?}");
        eprintln!("patience: work() took {d:?} here (reference {REFERENCE:?})");
    }
}
