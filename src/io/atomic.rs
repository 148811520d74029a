//! File writes that never leave a half-written file under the final name.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, IoOp, Result};

/// Writes `bytes` to a temporary file beside `file`, syncs it, then renames it over
/// `file`. On any failure the temporary file is removed and `file` is left as it was.
pub fn write_atomic(file: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(file, bytes, |tmp| std::fs::File::create(tmp))
}

/// [`write_atomic`] with the temporary file opened by `create`, so tests can inject a
/// writer that fails part-way.
pub(crate) fn write_atomic_with<W: Write + SyncAll>(
    file: &Path,
    bytes: &[u8],
    create: impl FnOnce(&Path) -> std::io::Result<W>,
) -> Result<()> {
    let dir = file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(IoOp::CreateDir, dir, e))?;
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(super::leftovers::temp_name(&name, "tmp"));
    let written = create(&tmp).and_then(|mut f| {
        stall_for_tests(&name, &mut f, bytes)?;
        f.write_all(bytes)?;
        f.flush()?;
        f.sync_all()
    });
    let result = match written {
        Ok(()) => std::fs::rename(&tmp, file).map_err(|e| Error::io(IoOp::Rename, file, e)),
        Err(e) => Err(Error::io(IoOp::Write, file, e)),
    };
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Test hooks (debug builds), for an atomic write of a file whose name contains TEXT:
/// `MAGICTAILOR_TEST_STALL_WRITE=TEXT` writes half its bytes and then waits forever (a
/// test kills the writer mid-write); `MAGICTAILOR_TEST_FULL_DISK=TEXT` writes half and
/// fails as a full disk does.
#[cfg(debug_assertions)]
fn stall_for_tests(name: &str, f: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    let hook = |var| std::env::var(var).is_ok_and(|t: String| !t.is_empty() && name.contains(&t));
    let (stall, full) = (
        hook("MAGICTAILOR_TEST_STALL_WRITE"),
        hook("MAGICTAILOR_TEST_FULL_DISK"),
    );
    if !stall && !full {
        return Ok(());
    }
    f.write_all(&bytes[..bytes.len() / 2])?;
    f.flush()?;
    if full {
        return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

#[cfg(not(debug_assertions))]
fn stall_for_tests(_: &str, _: &mut impl Write, _: &[u8]) -> std::io::Result<()> {
    Ok(())
}

/// Flushing to stable storage, as `File::sync_all`.
pub(crate) trait SyncAll {
    fn sync_all(&self) -> std::io::Result<()>;
}

impl SyncAll for std::fs::File {
    fn sync_all(&self) -> std::io::Result<()> {
        std::fs::File::sync_all(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file that takes `room` bytes, then fails as a full disk does.
    struct FullDisk {
        file: std::fs::File,
        room: usize,
    }

    impl Write for FullDisk {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.file.write(&buf[..n])
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.file.flush()
        }
    }

    impl SyncAll for FullDisk {
        fn sync_all(&self) -> std::io::Result<()> {
            self.file.sync_all()
        }
    }

    #[test]
    fn a_failed_write_says_write_and_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("step-000002.safetensors");
        std::fs::write(&file, b"the previous, good checkpoint").unwrap();
        let err = write_atomic_with(&file, &[7u8; 4096], |tmp| {
            let file = std::fs::File::create(tmp)?;
            Ok(FullDisk { file, room: 1000 })
        })
        .unwrap_err();
        assert!(
            matches!(&err, Error::Io { op: IoOp::Write, path, .. } if path == &file),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.starts_with("cannot write ") && msg.contains("step-000002"),
            "{msg}"
        );
        assert_eq!(
            std::fs::read(&file).unwrap(),
            b"the previous, good checkpoint"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "the temporary file was left behind");
    }

    #[test]
    fn a_failed_rename_says_so() {
        let dir = tempfile::tempdir().unwrap();
        // A folder where the file should go: the rename fails, the write did not.
        let file = dir.path().join("taken");
        std::fs::create_dir(file.join("x").parent().unwrap()).unwrap();
        std::fs::write(file.join("x"), b"").unwrap();
        let err = write_atomic(&file, b"data").unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Io {
                    op: IoOp::Rename,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
