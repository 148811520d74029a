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
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let written = create(&tmp).and_then(|mut f| {
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

/// Flushing to stable storage, as `File::sync_all`.
pub(crate) trait SyncAll {
    fn sync_all(&self) -> std::io::Result<()>;
}

impl SyncAll for std::fs::File {
    fn sync_all(&self) -> std::io::Result<()> {
        std::fs::File::sync_all(self)
    }
}
