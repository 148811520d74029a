//! safetensors files: whole-file reads that name the file on failure, a header check
//! that catches truncated downloads before loading, and atomic, deterministic writes.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// A header larger than this is not a real safetensors header (SD's largest is ~100 kB).
const MAX_HEADER: u64 = 100_000_000;

/// Loads a whole safetensors file, naming it on failure (truncated, not safetensors...).
pub fn read(file: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !file.is_file() {
        return Err(Error::bad_file(
            file,
            format!("{} does not exist or is not a file.", file.display()),
        ));
    }
    check_complete(file)?;
    candle_core::safetensors::load(file, device).map_err(|e| {
        Error::bad_file(
            file,
            format!(
                "{} is not a readable safetensors file ({}). It may be truncated or in another format \
                 (magictailor reads safetensors only, never pickled .bin/.ckpt files).",
                file.display(),
                crate::error::brief(&e)
            ),
        )
    })
}

/// Writes tensors (moved to the CPU) with keys in sorted order, atomically: equal inputs
/// give equal bytes, and a crash never leaves a half-written file under the final name.
pub fn write(
    file: &Path,
    tensors: &HashMap<String, Tensor>,
    meta: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut cpu: Vec<(String, Tensor)> = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        cpu.push((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    cpu.sort_by(|a, b| a.0.cmp(&b.0));
    let views: Vec<(&str, &Tensor)> = cpu.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let bytes = safetensors::tensor::serialize(views, meta)
        .map_err(|e| Error::internal(format!("serializing tensors for {}: {e}", file.display())))?;
    super::write_atomic(file, &bytes)
}

/// The header's JSON (tensor entries and `__metadata__`), read without the tensor data.
pub fn header(file: &Path) -> Result<serde_json::Value> {
    let bad = |why: String| {
        Error::bad_file(
            file,
            format!(
                "{} is not a valid safetensors file ({why}). It is probably a truncated or corrupt \
                 download: delete it and fetch it again.",
                file.display()
            ),
        )
    };
    let mut f = std::fs::File::open(file).map_err(|e| Error::read(file, e))?;
    let len = f.metadata().map_err(|e| Error::read(file, e))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad("shorter than its 8-byte header length".into()))?;
    let header_len = u64::from_le_bytes(n);
    if header_len > MAX_HEADER || 8 + header_len > len {
        return Err(bad(format!(
            "header length {header_len} does not fit a {len}-byte file"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(bad("header is not a JSON object".into()));
    }
    let end = v
        .as_object()
        .map(|o| {
            o.values()
                .filter_map(|t| t.get("data_offsets")?.as_array()?.get(1)?.as_u64())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0);
    if 8 + header_len + end > len {
        return Err(bad(format!(
            "tensors need {} bytes but the file has {len}",
            8 + header_len + end
        )));
    }
    Ok(v)
}

/// Checks that the header parses and every tensor's bytes lie inside the file, so a
/// truncated download gets a message naming it instead of a failure deep in loading.
pub fn check_complete(file: &Path) -> Result<()> {
    header(file).map(|_| ())
}

/// One entry of the header's `__metadata__` map, if present.
pub fn metadata(file: &Path, key: &str) -> Result<Option<String>> {
    Ok(header(file)?
        .get("__metadata__")
        .and_then(|m| m.get(key))
        .and_then(|v| v.as_str())
        .map(String::from))
}
