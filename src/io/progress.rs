//! How a command reports its progress: the [`Progress`] mode its flags choose, and
//! [`ticker`], the one builder of progress bars and progress lines.

use super::ticker::Ticker;

/// Where a command's progress goes: a bar (lines off a terminal), one JSON object per
/// unit on stdout, or nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Bar,
    Json,
    Quiet,
}

/// The progress of `total` units of `what` ("step", "denoising"), `done` of them already
/// done: when `show`, a bar on a terminal, else lines no closer than `every` units.
pub fn ticker(what: &str, total: u64, done: u64, every: u64, show: bool) -> Ticker {
    Ticker::new(what, total, done, every, show)
}

impl Progress {
    /// [`ticker`] in this mode: shown only as `Bar` (`Json` prints its own lines).
    pub fn ticker(self, what: &str, total: u64, done: u64, every: u64) -> Ticker {
        ticker(what, total, done, every, self == Progress::Bar)
    }
}
