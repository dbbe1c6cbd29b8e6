//! Running child processes: checked runs, captured output and streamed output with a tally of
//! libtest's `test result:` lines.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Runs `cmd`, inheriting stdio; fails unless it exits 0.
pub fn checked(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed with {status}", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout; fails (with stderr in the message) unless it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .output()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed with {}: {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Counts from libtest's summary lines (`test result: ok. 3 passed; 0 failed; 1 ignored; ...`),
/// and how long each test binary took (its `Running` line paired with its `finished in`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Test binaries that reported a summary line.
    pub suites: u64,
    /// (binary, seconds) for each summary line, in the order they ran.
    pub durations: Vec<(String, f64)>,
    /// A (guest) kernel's "Kernel panic" line was seen.
    pub kernel_panicked: bool,
    running: Option<String>,
}

impl Tally {
    /// One suite of `passed` and `failed` checks that are not libtest's.
    pub fn counted(passed: usize, failed: usize) -> Self {
        Self {
            passed: passed as u64,
            failed: failed as u64,
            suites: 1,
            ..Self::default()
        }
    }

    /// Adds one line of test output: `Running` lines name the binary, `test result:` lines are
    /// counted; other lines are ignored.
    pub fn add_line(&mut self, line: &str) {
        let line = line.trim();
        if line.contains("Kernel panic - not syncing") {
            self.kernel_panicked = true;
            return;
        }
        if let Some(binary) = line.strip_prefix("Running ") {
            // cargo prints `Running unittests src/lib.rs (target/debug/deps/x-0123)`.
            let name = binary.rsplit('/').next().unwrap_or(binary);
            let name = name.trim_end_matches(')');
            self.running = Some(name.rsplit_once('-').map_or(name, |(n, _)| n).to_owned());
            return;
        }
        if let Some(krate) = line.strip_prefix("Doc-tests ") {
            self.running = Some(format!("{krate} doc-tests"));
            return;
        }
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        self.suites += 1;
        for part in rest.split(';') {
            if let Some(secs) = part.trim().strip_prefix("finished in ")
                && let Ok(secs) = secs.trim_end_matches('s').parse::<f64>()
            {
                let name = self.running.take().unwrap_or_else(|| "?".to_owned());
                self.durations.push((name, secs));
                continue;
            }
            let mut words = part.split_whitespace().rev();
            let (Some(label), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }

    pub fn merge(&mut self, other: &Tally) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.ignored += other.ignored;
        self.suites += other.suites;
        self.durations.extend(other.durations.iter().cloned());
        self.kernel_panicked |= other.kernel_panicked;
    }

    /// The binaries that took at least `min` seconds, slowest first.
    pub fn slowest(&self, min: f64) -> Vec<(String, f64)> {
        let mut slow: Vec<_> = self
            .durations
            .iter()
            .filter(|(_, secs)| *secs >= min)
            .cloned()
            .collect();
        slow.sort_by(|a, b| b.1.total_cmp(&a.1));
        slow
    }
}

/// Runs `cmd`, echoing its stdout line by line (carriage returns from a serial console removed)
/// and tallying libtest summaries. The child is killed once `timeout` has passed. Returns whether
/// it exited 0 in time, and the tally.
pub fn streamed(cmd: &mut Command, timeout: Duration) -> Result<(bool, Tally)> {
    streamed_with_watchdog(cmd, timeout, |_| None)
}

/// [`streamed`], also killing the child as soon as `watchdog(elapsed)` gives a reason.
pub fn streamed_with_watchdog(
    cmd: &mut Command,
    timeout: Duration,
    watchdog: impl Fn(Duration) -> Option<String>,
) -> Result<(bool, Tally)> {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    let stdout = child.stdout.take().context("BUG: child stdout was piped")?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let reader = std::thread::spawn({
        let tally = Arc::clone(&tally);
        move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches('\r');
                if let Ok(mut tally) = tally.lock() {
                    tally.add_line(text);
                }
                // A closed stdout (e.g. `| head`) must not stop the run.
                let _ = writeln!(std::io::stdout(), "{text}");
            }
        }
    });
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for child")? {
            break Some(status);
        }
        let reason = if started.elapsed() >= timeout {
            Some(format!("timed out after {timeout:?}"))
        } else {
            watchdog(started.elapsed())
        };
        if let Some(reason) = reason {
            eprintln!("xtask: {} {reason}; killing it", describe(cmd));
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // A killed child's own children may still hold the pipe open: read what is left for a
    // moment, then leave the reader behind.
    let drained = Instant::now() + Duration::from_secs(5);
    while !reader.is_finished() && Instant::now() < drained {
        std::thread::sleep(Duration::from_millis(50));
    }
    let tally = tally.lock().map(|t| t.clone()).unwrap_or_default();
    Ok((status.is_some_and(|s| s.success()), tally))
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_panic_line_is_noticed() {
        let mut t = Tally::default();
        t.add_line("[  390.489091] CPU: 1 UID: 0 PID: 3847 Comm: ip Not tainted 6.12.117");
        assert!(!t.kernel_panicked);
        t.add_line("[  390.492710] Kernel panic - not syncing: Fatal exception in interrupt\r");
        assert!(t.kernel_panicked);
    }

    #[test]
    fn tally_reads_libtest_summaries() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        t.add_line(
            "test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("running 3 tests");
        assert_eq!((t.passed, t.failed, t.ignored, t.suites), (4, 2, 1, 2));
    }

    #[test]
    fn tally_pairs_binaries_with_their_durations() {
        let mut t = Tally::default();
        t.add_line("     Running unittests src/lib.rs (target/debug/deps/nodeseal_store-0a1b2c)");
        t.add_line("test result: ok. 3 passed; 0 failed; 0 ignored; finished in 0.50s");
        t.add_line("     Running agent-ef62f018e44f0741");
        t.add_line("test result: ok. 1 passed; 0 failed; finished in 234.19s");
        t.add_line("test result: ok. 0 passed; 0 failed; 0 ignored"); // a doc-test run
        assert_eq!(
            t.durations,
            [
                ("nodeseal_store".to_owned(), 0.5),
                ("agent".to_owned(), 234.19),
            ]
        );
        assert_eq!(t.slowest(1.0), [("agent".to_owned(), 234.19)]);
    }

    #[test]
    fn watchdog_kills_a_child_that_gives_it_a_reason() {
        let started = Instant::now();
        let (ok, tally) = streamed_with_watchdog(
            Command::new("sh").args(["-c", "echo booting; sleep 30"]),
            Duration::from_secs(60),
            |elapsed| (elapsed > Duration::from_millis(300)).then(|| "hung".to_owned()),
        )
        .expect("run");
        assert!(!ok);
        assert_eq!(tally.suites, 0);
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}
