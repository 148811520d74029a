//! One run per output folder: `train` holds `.magictailor.lock` there while it runs.
//!
//! The lock file names its holder (host, pid, start time), so a second run can say who
//! holds the folder, and the holder touches it after every step (a heartbeat). A holder
//! that died without cleaning up (`kill -9`, a crash, a lost node) leaves a stale lock,
//! taken over with a warning: on the same host when its pid no longer runs magictailor;
//! on any host (a shared file system) when its heartbeat is older than the timeout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoOp, Result};

pub const LOCK_FILE: &str = ".magictailor.lock";

/// A lock whose heartbeat is older than this is stale, wherever its holder runs. It
/// must exceed the longest step (minutes for SD 2.1 at 512 px on a CPU).
pub const STALE_AFTER: Duration = Duration::from_secs(30 * 60);

/// Who holds a lock.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// Seconds since the Unix epoch.
    pub started: u64,
}

impl Holder {
    fn me() -> Self {
        Self {
            host: hostname(),
            pid: std::process::id(),
            started: unix_now(),
        }
    }

    fn describe(&self) -> String {
        let ago = unix_now().saturating_sub(self.started);
        format!(
            "process {} on {}, started {} ago",
            self.pid,
            self.host,
            human_duration(ago)
        )
    }

    fn may_be_alive(&self) -> bool {
        may_be_alive(&self.host, self.pid)
    }
}

/// Whether process `pid` of `host` may still be running: always, unless it is on this host
/// and its pid is gone or is no longer magictailor (a reused pid).
pub(crate) fn may_be_alive(host: &str, pid: u32) -> bool {
    if host != hostname() {
        return true;
    }
    let proc_dir = Path::new("/proc");
    if !proc_dir.is_dir() {
        return true; // no way to look: assume the worst
    }
    match std::fs::read(proc_dir.join(pid.to_string()).join("cmdline")) {
        Ok(cmd) => String::from_utf8_lossy(&cmd).contains("magictailor"),
        Err(_) => false,
    }
}

/// A held lock; dropping it releases the folder.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
    holder: Holder,
}

/// Fails at once if a live run holds `dir`, before any slow loading.
pub fn check_free(dir: &Path, stale_after: Duration) -> Result<()> {
    let path = dir.join(LOCK_FILE);
    match read_holder(&path)? {
        Some(h) if !is_stale(&path, &h, stale_after) => Err(held(dir, &h)),
        _ => Ok(()),
    }
}

/// Whether `dir`'s lock, if any, is held by a live run.
pub fn is_held(dir: &Path, stale_after: Duration) -> Result<bool> {
    Ok(check_free(dir, stale_after).is_err())
}

/// A holder is gone when its process is, or its heartbeat is older than `stale_after`.
fn is_stale(path: &Path, h: &Holder, stale_after: Duration) -> bool {
    let beat = std::fs::metadata(path).and_then(|m| m.modified());
    let silent = beat.ok().and_then(|t| t.elapsed().ok());
    !h.may_be_alive() || silent.is_some_and(|s| s > stale_after)
}

/// Takes `dir`'s lock (`dir` must exist). Returns a warning when a stale lock was taken
/// over.
pub fn acquire(dir: &Path, stale_after: Duration) -> Result<(RunLock, Option<String>)> {
    let path = dir.join(LOCK_FILE);
    let me = Holder::me();
    if try_create(&path, &me)? {
        return Ok((RunLock { path, holder: me }, None));
    }
    let Some(stale) = read_holder(&path)? else {
        return Err(Error::usage(format!(
            "{} is locked by another run, which is just starting: use another --output-dir.",
            dir.display()
        )));
    };
    if !is_stale(&path, &stale, stale_after) {
        return Err(held(dir, &stale));
    }
    std::fs::remove_file(&path).map_err(|e| Error::io(IoOp::Lock, &path, e))?;
    if !try_create(&path, &me)? {
        return Err(Error::usage(format!(
            "{} was taken by another run at the same moment: use another --output-dir.",
            dir.display()
        )));
    }
    let warning = format!(
        "took over the stale lock of {} ({}, no longer running or silent for too long); its run \
         ended without cleaning up.",
        dir.display(),
        stale.describe()
    );
    Ok((RunLock { path, holder: me }, Some(warning)))
}

impl RunLock {
    /// The heartbeat: marks the lock as fresh, so no one takes it over by timeout.
    pub fn refresh(&self) -> Result<()> {
        let f = std::fs::OpenOptions::new().write(true).open(&self.path);
        f.and_then(|f| f.set_modified(SystemTime::now()))
            .map_err(|e| Error::io(IoOp::Lock, &self.path, e))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Only our own lock: never delete one another run has since taken over.
        if read_holder(&self.path).ok().flatten().as_ref() == Some(&self.holder) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Creates the lock file only if none exists (atomic on local file systems).
fn try_create(path: &Path, holder: &Holder) -> Result<bool> {
    let mut f = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(Error::io(IoOp::Lock, path, e)),
    };
    let text = serde_json::to_string(holder)
        .map_err(|e| Error::internal(format!("serializing the lock: {e}")))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(IoOp::Lock, path, e))?;
    Ok(true)
}

/// The holder recorded in a lock file; None when there is none, or it is still being
/// written (empty).
fn read_holder(path: &Path) -> Result<Option<Holder>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::read(path, e)),
    };
    if text.trim().is_empty() {
        return Ok(None);
    }
    // A garbled lock names no live holder: treat it as stale.
    Ok(Some(serde_json::from_str(&text).unwrap_or(Holder {
        host: hostname(),
        pid: 0,
        started: 0,
    })))
}

fn held(dir: &Path, h: &Holder) -> Error {
    Error::usage(format!(
        "{} is in use by another magictailor run ({}). Wait for it to finish or stop it, or use \
         another --output-dir. If that run is gone (e.g. its machine was lost), delete {}.",
        dir.display(),
        h.describe(),
        dir.join(LOCK_FILE).display()
    ))
}

/// This machine's name, as lock files record it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

fn unix_now() -> u64 {
    (SystemTime::now().duration_since(UNIX_EPOCH)).map_or(0, |d| d.as_secs())
}

fn human_duration(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        _ => format!("{} h", secs / 3600),
    }
}
