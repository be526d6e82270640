//! Progress of long work: a bar on a terminal, otherwise a log line every few seconds with bytes,
//! MB/s and (when the total is known) percentage and ETA.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a log line is written when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);

pub struct Progress {
    what: &'static str,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_log: Instant,
    bar: Option<ProgressBar>,
}

impl Progress {
    pub fn new(what: &'static str, total: Option<u64>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total.unwrap_or(0));
            let style = if total.is_some() {
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}"
            } else {
                "{msg} {bytes} {bytes_per_sec}"
            };
            bar.set_style(
                ProgressStyle::with_template(style)
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_message(what);
            bar
        });
        Progress {
            what,
            total,
            done: 0,
            started: Instant::now(),
            last_log: Instant::now(),
            bar,
        }
    }

    /// Sets the estimated total (it may be revised upwards as work reveals more).
    pub fn set_total(&mut self, total: u64) {
        self.total = Some(total);
        if let Some(b) = &self.bar {
            b.set_length(total);
        }
    }

    pub fn add(&mut self, n: u64) {
        self.done += n;
        if let Some(t) = self.total
            && self.done > t
        {
            self.set_total(self.done);
        }
        if let Some(b) = &self.bar {
            b.set_position(self.done);
        } else if self.last_log.elapsed() >= LOG_EVERY {
            self.last_log = Instant::now();
            tracing::info!("{}", self.line());
        }
    }

    pub fn done(&self) -> u64 {
        self.done
    }

    fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = self.done as f64 / secs;
        match self.total {
            Some(t) if t > 0 => {
                let left = t.saturating_sub(self.done) as f64 / rate.max(1.0);
                format!(
                    "{}: {} of {} ({:.0}%), {}/s, ETA {:.0}s",
                    self.what,
                    human_bytes(self.done),
                    human_bytes(t),
                    self.done as f64 * 100.0 / t as f64,
                    human_bytes(rate as u64),
                    left
                )
            }
            _ => format!(
                "{}: {}, {}/s",
                self.what,
                human_bytes(self.done),
                human_bytes(rate as u64)
            ),
        }
    }

    /// Ends the bar and logs a summary line.
    pub fn finish(&self) -> Duration {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        self.started.elapsed()
    }
}

/// `1.5 GB`-style sizes (powers of 1024).
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// A figure for a log line: seconds or a rate, to the millisecond or 3 decimals (not 17 digits).
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Megabytes per second of `bytes` over `d`, for a log line.
pub fn mb_per_s(bytes: u64, d: std::time::Duration) -> f64 {
    (bytes as f64 / 1048576.0 / d.as_secs_f64().max(0.001) * 10.0).round() / 10.0
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_now() -> u64 {
    unix_now_ms() / 1000
}

/// Unix time in milliseconds.
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

#[cfg(test)]
mod progress_tests {
    #[test]
    fn log_figures_are_rounded() {
        assert_eq!(super::round3(1.234_567_8), 1.235);
        let rate = super::mb_per_s(3 << 20, std::time::Duration::from_millis(1500));
        assert_eq!(rate, 2.0);
        assert_eq!(
            format!(
                "{}",
                super::mb_per_s(344_707_376, std::time::Duration::from_secs(1))
            ),
            "328.7"
        );
    }

    use super::*;

    #[test]
    fn log_lines_say_bytes_rate_percentage_and_eta() {
        let mut p = Progress::new("restore", Some(100 << 20));
        p.bar = None; // the log-line form, as under a log collector
        p.started = Instant::now() - Duration::from_secs(10);
        p.add(25 << 20);
        let line = p.line();
        assert!(
            line.starts_with("restore: 25.0 MB of 100.0 MB (25%), "),
            "{line}"
        );
        assert!(line.contains("/s, ETA 30s"), "{line}");
        // More than estimated: the total grows instead of passing 100%.
        p.add(100 << 20);
        assert!(
            p.line().contains("125.0 MB of 125.0 MB (100%)"),
            "{}",
            p.line()
        );
        let unknown = Progress::new("backup", None);
        assert!(
            unknown.line().starts_with("backup: 0 B, "),
            "{}",
            unknown.line()
        );
    }
}
