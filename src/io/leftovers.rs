//! The temporary files and staging folders of writes in progress, and the removal of
//! those that a killed process left behind.
//!
//! Every such name is `.{name}.{kind}.{host}.{pid}` beside `name` (`kind`: `tmp` for an
//! atomic write's file, `partial` and `old` for a folder swapped in whole), so a later run
//! can tell a dead writer's leftover from a live one's: a process of this host that no
//! longer runs magictailor is gone; on a shared file system another host's process is
//! gone once its leftover has been silent for [`STALE_AFTER`] (a write touches its file
//! as it goes). A SIGKILL during a write
//! leaves one; the next run that claims the folder removes it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::lock::{hostname, may_be_alive, STALE_AFTER};

/// What a leftover was for.
const KINDS: [&str; 3] = ["tmp", "partial", "old"];

/// The name of this process's temporary `kind` beside `name`.
pub fn temp_name(name: &str, kind: &str) -> String {
    debug_assert!(KINDS.contains(&kind));
    format!(
        ".{name}.{kind}.{}.{}",
        host_tag(&hostname()),
        std::process::id()
    )
}

/// A host name without dots, so that the pid stays the last dotted field.
fn host_tag(host: &str) -> String {
    host.replace('.', "_")
}

/// Whose leftover a file name is: `Some((host tag, pid))`, or `Some(None)` for the names
/// of older versions (`.{name}.tmp{pid}`, `.{name}.partial-{pid}`), whose host is unknown;
/// `None` for anything else.
fn writer_of(file_name: &str) -> Option<Option<(String, u32)>> {
    let rest = file_name.strip_prefix('.')?;
    let mut fields = rest.rsplitn(4, '.');
    let (pid, host, kind) = (fields.next()?, fields.next(), fields.next());
    if let (Ok(pid), Some(host), Some(kind), Some(_)) = (pid.parse(), host, kind, fields.next()) {
        if KINDS.contains(&kind) {
            return Some(Some((host.to_string(), pid)));
        }
    }
    let old = [".tmp", ".partial-", ".old-"].iter().any(|marker| {
        rest.rsplit_once(marker)
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
    });
    old.then_some(None)
}

/// Which folders a cleanup may touch, and so which names it takes for leftovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A run folder of magictailor's own (train, batch, eval): every subfolder, and the
    /// names older versions used too.
    Run,
    /// One folder that may hold anything (a pair folder, infer's output folder): only
    /// the names this version writes.
    Folder,
}

/// Whether the writer of a leftover named `file_name`, last changed `age` ago, is gone.
fn is_orphan(file_name: &str, age: Option<Duration>, scope: Scope, stale_after: Duration) -> bool {
    let Some(writer) = writer_of(file_name) else {
        return false;
    };
    if writer.is_none() && scope == Scope::Folder {
        return false;
    }
    let silent = |limit: Duration| age.is_some_and(|a| a > limit);
    match writer {
        // This host's writer is looked up; the day-long limit covers a pid reused by
        // another magictailor.
        Some((host, pid)) if host == host_tag(&hostname()) => {
            !may_be_alive(&hostname(), pid) || silent(stale_after.max(Duration::from_secs(86_400)))
        }
        Some(_) | None => silent(stale_after),
    }
}

/// Removes the leftovers of writers that are gone from `dir` (and, for a run folder, its
/// subfolders); returns what it removed. Whatever cannot be read or removed is left.
pub fn remove_orphans(dir: &Path, scope: Scope) -> Vec<PathBuf> {
    remove_orphans_after(dir, scope, STALE_AFTER)
}

fn remove_orphans_after(dir: &Path, scope: Scope, stale_after: Duration) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        let name = entry.file_name().to_string_lossy().into_owned();
        let age = meta.modified().ok().and_then(|t| t.elapsed().ok());
        if is_orphan(&name, age, scope, stale_after) {
            let gone = if meta.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if gone.is_ok() {
                removed.push(path);
            }
        } else if scope == Scope::Run && meta.is_dir() {
            removed.extend(remove_orphans_after(&path, scope, stale_after));
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftover_names_say_whose_they_are() {
        let mine = temp_name("step-000018.safetensors", "tmp");
        let (host, pid) = writer_of(&mine).unwrap().unwrap();
        assert_eq!((host, pid), (host_tag(&hostname()), std::process::id()));
        assert!(mine.starts_with(".step-000018.safetensors.tmp."));
        let remote = ".masks.partial.node7_cluster_org.4242";
        assert_eq!(
            writer_of(remote),
            Some(Some(("node7_cluster_org".into(), 4242)))
        );
        assert_eq!(writer_of(".step-000018.safetensors.tmp29766"), Some(None));
        assert_eq!(writer_of(".masks.partial-77"), Some(None));
        for not_ours in [
            "step-000018.safetensors",
            ".magictailor.lock",
            ".hidden",
            ".a.tmp.b",
        ] {
            assert_eq!(writer_of(not_ours), None, "{not_ours}");
        }
    }

    #[test]
    fn only_gone_writers_leftovers_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let sub = dir.join("checkpoints");
        std::fs::create_dir_all(&sub).unwrap();
        let here = host_tag(&hostname());
        // A pid no process has (above Linux's pid_max of 2^22).
        let dead = format!(".step-000003.safetensors.tmp.{here}.4999999");
        let live = temp_name("step-000006.safetensors", "tmp"); // this process
        let remote = ".step-000009.safetensors.tmp.elsewhere.12";
        let staging = dir.join(format!(".masks.partial.{here}.4999998"));
        for f in [
            sub.join(&dead),
            sub.join(&live),
            sub.join(remote),
            dir.join("keep.txt"),
        ] {
            std::fs::write(f, b"x").unwrap();
        }
        std::fs::create_dir_all(staging.join("inner")).unwrap();
        let legacy = dir.join(".step-000001.safetensors.tmp123");
        std::fs::write(&legacy, b"x").unwrap();
        assert_eq!(remove_orphans(&sub, Scope::Folder), vec![sub.join(&dead)]);
        assert_eq!(remove_orphans(dir, Scope::Run), vec![staging.clone()]);
        assert!(sub.join(&live).exists() && sub.join(remote).exists());
        assert!(dir.join("keep.txt").exists() && legacy.exists());
        // Silent for longer than the limit, another host's leftover goes too, and in a
        // run folder one named as older versions named them.
        let f = remove_orphans_after(dir, Scope::Folder, Duration::ZERO);
        assert!(f.is_empty(), "{f:?}");
        let mut removed = remove_orphans_after(dir, Scope::Run, Duration::ZERO);
        removed.sort();
        assert_eq!(removed, vec![legacy, sub.join(remote)]);
        assert!(dir.join("keep.txt").exists() && sub.join(&live).exists());
    }
}
