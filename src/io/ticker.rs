//! Progress of a long job on stderr, for people: a bar on a terminal; off one (a log
//! file, Slurm, nohup, CI) plain lines at a steady cadence, each with the position, the
//! job's own message (train: the losses), the rate and the time left. A line comes after
//! the first unit (a sign of life), then at most one every 30 s and no closer than
//! `every` units apart, and a last one at the end.
//! `MAGICTAILOR_LOG_EVERY_SECONDS` changes the 30 s.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::console;

/// A job's progress: a bar, plain lines, or nothing.
pub struct Ticker {
    kind: Kind,
}

enum Kind {
    Hidden,
    Bar(indicatif::ProgressBar),
    Lines(Mutex<Lines>),
}

struct Lines {
    what: String,
    total: u64,
    done: u64,
    message: String,
    started: Instant,
    /// Units done and time at the start of this process's share of the job.
    first: u64,
    last_line: Option<(Instant, u64)>,
    every: u64,
    period: Duration,
}

impl Ticker {
    /// `total` units of `what` ("images", "steps"), `done` of them already done; shown
    /// when `show`, as a bar on a terminal, else as lines no closer than `every` units.
    pub fn new(what: &str, total: u64, done: u64, every: u64, show: bool) -> Ticker {
        let kind = if !show {
            Kind::Hidden
        } else if std::io::stderr().is_terminal() {
            Kind::Bar(bar(what, total, done))
        } else {
            Kind::Lines(Mutex::new(Lines {
                what: what.to_string(),
                total,
                done,
                message: String::new(),
                started: Instant::now(),
                first: done,
                last_line: None,
                every: every.max(1),
                period: period(),
            }))
        };
        Ticker { kind }
    }

    /// What the next lines (or the bar) say besides the position: e.g. the losses.
    pub fn set_message(&self, message: String) {
        match &self.kind {
            Kind::Hidden => {}
            Kind::Bar(b) => b.set_message(message),
            Kind::Lines(l) => {
                if let Ok(mut l) = l.lock() {
                    l.message = message;
                }
            }
        }
    }

    /// `n` more units done.
    pub fn inc(&self, n: u64) {
        match &self.kind {
            Kind::Hidden => {}
            Kind::Bar(b) => b.inc(n),
            Kind::Lines(l) => {
                if let Ok(mut l) = l.lock() {
                    l.done += n;
                    if l.due() {
                        l.print();
                    }
                }
            }
        }
    }

    /// The job is done: the bar goes, the lines end with a last one.
    pub fn finish(&self) {
        match &self.kind {
            Kind::Hidden => {}
            Kind::Bar(b) => b.finish_and_clear(),
            Kind::Lines(l) => {
                if let Ok(mut l) = l.lock() {
                    if l.last_line.map(|(_, at)| at) != Some(l.done) {
                        l.print();
                    }
                }
            }
        }
    }

    /// The job stops early: the bar stays as it is (a message follows).
    pub fn abandon(&self) {
        if let Kind::Bar(b) = &self.kind {
            b.abandon();
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        // An error path that never finished: leave the terminal clean for its message.
        if let Kind::Bar(b) = &self.kind {
            if !b.is_finished() {
                b.abandon();
            }
        }
    }
}

fn bar(what: &str, total: u64, done: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total).with_position(done);
    let template = format!(
        "{what} {{msg}} {{bar:30}} {{pos}}/{{len}} [{{elapsed_precise}} < {{eta_precise}}]"
    );
    if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

fn period() -> Duration {
    let secs = std::env::var("MAGICTAILOR_LOG_EVERY_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(30.0);
    Duration::from_secs_f64(secs)
}

impl Lines {
    /// Whether a line is due: the first unit, or `every` units and the period since the
    /// last line.
    fn due(&self) -> bool {
        match self.last_line {
            None => true,
            Some((at, units)) => self.done - units >= self.every && at.elapsed() >= self.period,
        }
    }

    fn print(&mut self) {
        let elapsed = self.started.elapsed().as_secs_f64();
        let run = self.done.saturating_sub(self.first).max(1) as f64;
        let per = elapsed / run;
        let left = per * self.total.saturating_sub(self.done) as f64;
        let pct = 100.0 * self.done as f64 / self.total.max(1) as f64;
        let rate = if per >= 1.0 {
            format!("{per:.2} s each")
        } else {
            format!("{:.1} per s", 1.0 / per.max(1e-9))
        };
        let message = if self.message.is_empty() {
            String::new()
        } else {
            format!(" {}", self.message)
        };
        console::note(format_args!(
            "{} {}/{} ({pct:.0}%){message} | {rate} | {} left",
            self.what,
            self.done,
            self.total,
            human(left)
        ));
        self.last_line = Some((Instant::now(), self.done));
    }
}

/// `1h 02m`, `4m 05s`, `12s`.
fn human(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_people_write_them() {
        assert_eq!(human(12.4), "12s");
        assert_eq!(human(245.0), "4m 05s");
        assert_eq!(human(3720.0), "1h 02m");
    }

    #[test]
    fn lines_come_at_the_first_unit_then_at_the_cadence() {
        let mut l = Lines {
            what: "steps".into(),
            total: 100,
            done: 1,
            message: String::new(),
            started: Instant::now(),
            first: 0,
            last_line: None,
            every: 10,
            period: Duration::ZERO,
        };
        assert!(l.due());
        l.last_line = Some((Instant::now(), 1));
        l.done = 10;
        assert!(!l.due(), "9 units since the last line");
        l.done = 11;
        assert!(l.due());
        l.period = Duration::from_secs(3600);
        assert!(!l.due(), "too soon");
    }
}
