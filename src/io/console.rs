//! What the command prints: lines for scripts on stdout (`--json` progress, result
//! paths) and notes for people on stderr.
//!
//! `println!` and `eprintln!` panic when the reader has gone (`| head -1`, a monitor that
//! crashed), which would kill a training run hours in for the sake of a copy: every
//! progress line is also in the run's log on disk. So a failed stdout write drops that
//! and all later lines, says so once on stderr, and the work carries on; a failed stderr
//! write is dropped.

use std::fmt::Display;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `text` and a newline to stdout, unless it has stopped taking them.
pub fn line(text: impl Display) {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{text}").and_then(|()| out.flush()) {
        if !STDOUT_CLOSED.swap(true, Ordering::Relaxed) {
            note(format_args!(
                "magictailor: stdout stopped taking lines ({e}); carrying on without them"
            ));
        }
    }
}

/// Writes `text` and a newline to stderr, if it still takes them.
pub fn note(text: impl Display) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}
