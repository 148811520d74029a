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
    require_file(file)?;
    check(file)?;
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

/// [`read`] for files of float tensors (embeddings, LoRA, checkpoints, latents): any other
/// dtype, except in the tensors named in `integers`, is refused by name. Integers would
/// otherwise be cast to floats without a word, making weights of whatever they hold.
pub fn read_floats(
    file: &Path,
    device: &Device,
    integers: &[&str],
) -> Result<HashMap<String, Tensor>> {
    let tensors = read(file, device)?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let dtype = tensors[name].dtype();
        if !dtype.is_float() && !integers.contains(&name.as_str()) {
            return Err(Error::bad_file(
                file,
                format!(
                    "{}: the tensor {name:?} holds {} values where floats belong. The file was \
                     not written as embeddings, LoRA weights or a checkpoint (or was altered); \
                     use the file the training tool saved.",
                    file.display(),
                    dtype.as_str()
                ),
            ));
        }
    }
    Ok(tensors)
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

/// A parsed header: its JSON (tensor entries and `__metadata__`) and where the tensor
/// data starts in the file.
struct Header {
    json: serde_json::Value,
    data_start: u64,
}

/// The header's JSON, read without the tensor data.
pub fn header(file: &Path) -> Result<serde_json::Value> {
    Ok(read_header(file)?.json)
}

fn read_header(file: &Path) -> Result<Header> {
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
    let mut raw = vec![0u8; header_len as usize];
    f.read_exact(&mut raw).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value =
        serde_json::from_slice(&raw).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let Some(entries) = json.as_object() else {
        return Err(bad("header is not a JSON object".into()));
    };
    let end = (entries.values())
        .filter_map(|t| t.get("data_offsets")?.as_array()?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    let data_start = 8 + header_len;
    if end > len - data_start {
        return Err(bad(format!(
            "tensors need {} bytes but the file has {len}",
            data_start.saturating_add(end)
        )));
    }
    Ok(Header { json, data_start })
}

/// Refuses a path that is not a file, naming it.
pub fn require_file(file: &Path) -> Result<()> {
    if file.is_file() {
        return Ok(());
    }
    Err(Error::bad_file(
        file,
        format!("{} does not exist or is not a file.", file.display()),
    ))
}

/// Checks that the header parses, every tensor's bytes lie inside the file, and no
/// float holds NaN or infinity, so a truncated download or a file saved from a diverged
/// run gets a message naming it instead of a failure (or black images) later.
pub fn check(file: &Path) -> Result<()> {
    let header = read_header(file)?;
    if let Some(name) = first_non_finite(file, &header)? {
        return Err(Error::bad_file(
            file,
            format!(
                "{}: the tensor {name:?} holds NaN or infinite values. The file is corrupt or was \
                 saved from a diverged run: download it again, or retrain (a lower learning rate, \
                 --dtype f32).",
                file.display()
            ),
        ));
    }
    Ok(())
}

/// A float format's width in bytes and its exponent bits: all set means NaN or infinity.
fn exponent_mask(dtype: &str) -> Option<(usize, u64)> {
    match dtype {
        "F16" => Some((2, 0x7C00)),
        "BF16" => Some((2, 0x7F80)),
        "F32" => Some((4, 0x7F80_0000)),
        "F64" => Some((8, 0x7FF0_0000_0000_0000)),
        _ => None,
    }
}

/// Bytes read at a time when scanning (a multiple of every float width).
const CHUNK: u64 = 1 << 24;

/// Scans the raw bytes of every float tensor, in file order; returns the first one with
/// a NaN or an infinity. Integer tensors are skipped.
fn first_non_finite(file: &Path, header: &Header) -> Result<Option<String>> {
    let Some(entries) = header.json.as_object() else {
        return Ok(None);
    };
    let mut floats: Vec<(u64, u64, usize, u64, &String)> = Vec::new();
    for (name, t) in entries {
        let dtype = t.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let offsets = t.get("data_offsets").and_then(|o| o.as_array());
        let range = offsets.and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)));
        if let (Some((width, mask)), Some((a, b))) = (exponent_mask(dtype), range) {
            floats.push((a, b, width, mask, name));
        }
    }
    floats.sort();
    let mut f = std::fs::File::open(file).map_err(|e| Error::read(file, e))?;
    let mut buf = Vec::new();
    for (start, end, width, mask, name) in floats {
        let at = std::io::SeekFrom::Start(header.data_start + start);
        std::io::Seek::seek(&mut f, at).map_err(|e| Error::read(file, e))?;
        let mut left = end.saturating_sub(start);
        while left > 0 {
            let n = left.min(CHUNK);
            buf.resize(n as usize, 0);
            f.read_exact(&mut buf).map_err(|e| Error::read(file, e))?;
            if has_non_finite(&buf, width, mask) {
                return Ok(Some(name.clone()));
            }
            left -= n;
        }
    }
    Ok(None)
}

fn has_non_finite(bytes: &[u8], width: usize, mask: u64) -> bool {
    match width {
        2 => any_exponent_full::<2>(bytes, mask),
        4 => any_exponent_full::<4>(bytes, mask),
        _ => any_exponent_full::<8>(bytes, mask),
    }
}

/// Whether any little-endian `W`-byte word has all `mask` bits set. Blocks of words are
/// folded without an early exit, so the inner loop vectorizes.
fn any_exponent_full<const W: usize>(bytes: &[u8], mask: u64) -> bool {
    let word = |c: &[u8]| {
        let mut b = [0u8; 8];
        b[..W].copy_from_slice(c);
        u64::from_le_bytes(b)
    };
    bytes
        .chunks(W * 1024)
        .any(|block| (block.chunks_exact(W)).fold(false, |hit, c| hit | (word(c) & mask == mask)))
}

/// One entry of the header's `__metadata__` map, if present.
pub fn metadata(file: &Path, key: &str) -> Result<Option<String>> {
    Ok(header(file)?
        .get("__metadata__")
        .and_then(|m| m.get(key))
        .and_then(|v| v.as_str())
        .map(String::from))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_floats_are_found_in_every_format() {
        let cases: [(&str, &[u8]); 6] = [
            ("F16", &0x7C00u16.to_le_bytes()),  // +inf
            ("F16", &0xFE01u16.to_le_bytes()),  // NaN, sign set
            ("BF16", &0x7FC0u16.to_le_bytes()), // NaN
            ("F32", &f32::NEG_INFINITY.to_le_bytes()),
            ("F32", &f32::NAN.to_le_bytes()),
            ("F64", &f64::INFINITY.to_le_bytes()),
        ];
        for (dtype, bad) in cases {
            let (w, mask) = exponent_mask(dtype).unwrap();
            // A bad value at the end of a long run of finite extremes and zeros.
            let mut bytes: Vec<u8> = match dtype {
                "F16" => 0x7BFFu16.to_le_bytes().repeat(5000), // largest finite f16
                "BF16" => 0x7F7Fu16.to_le_bytes().repeat(5000),
                "F32" => f32::MAX.to_le_bytes().repeat(5000),
                _ => f64::MIN.to_le_bytes().repeat(5000),
            };
            assert!(!has_non_finite(&bytes, w, mask), "{dtype}: false positive");
            bytes.extend_from_slice(bad);
            assert!(has_non_finite(&bytes, w, mask), "{dtype}: missed {bad:?}");
        }
    }
}
