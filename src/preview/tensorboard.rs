//! TensorBoard event files (`tb/events.out.tfevents.*`): scalars per step and images.
//!
//! The format is TFRecord: each record is `len: u64`, `masked_crc32c(len): u32`, the bytes,
//! `masked_crc32c(bytes): u32`, all little-endian. Each record is a protobuf `Event`; the
//! few fields written here are encoded by hand:
//!
//! ```text
//! Event   { 1: wall_time double, 2: step int64, 3: file_version string, 5: summary Summary }
//! Summary { 1: value repeated Value }
//! Value   { 1: tag string, 2: simple_value float, 4: image Image }
//! Image   { 1: height int32, 2: width int32, 3: colorspace int32, 4: encoded_image_string bytes }
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, IoOp, Result};

/// Appends events to one file; every record is flushed, so TensorBoard sees a live run.
pub struct EventWriter {
    path: PathBuf,
    file: std::fs::File,
}

impl EventWriter {
    /// A new event file in `dir`, opened with the version record TensorBoard expects.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(IoOp::CreateDir, dir, e))?;
        let host = crate::io::lock::hostname();
        let name = format!("events.out.tfevents.{}.{host}", now() as u64);
        let path = dir.join(name);
        let file = std::fs::File::create(&path).map_err(|e| Error::io(IoOp::Write, &path, e))?;
        let mut w = Self { path, file };
        let mut event = Vec::new();
        field_f64(&mut event, 1, now());
        field_bytes(&mut event, 3, b"brain.Event:2");
        w.record(&event)?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn scalar(&mut self, tag: &str, step: usize, value: f32) -> Result<()> {
        let mut v = Vec::new();
        field_bytes(&mut v, 1, tag.as_bytes());
        field_f32(&mut v, 2, value);
        self.summary(step, &v)
    }

    /// A PNG (`png` bytes of a `width` x `height` RGB image).
    pub fn image(
        &mut self,
        tag: &str,
        step: usize,
        png: &[u8],
        width: u32,
        height: u32,
    ) -> Result<()> {
        let mut img = Vec::new();
        field_varint(&mut img, 1, height as u64);
        field_varint(&mut img, 2, width as u64);
        field_varint(&mut img, 3, 3); // RGB
        field_bytes(&mut img, 4, png);
        let mut v = Vec::new();
        field_bytes(&mut v, 1, tag.as_bytes());
        field_bytes(&mut v, 4, &img);
        self.summary(step, &v)
    }

    fn summary(&mut self, step: usize, value: &[u8]) -> Result<()> {
        let mut summary = Vec::new();
        field_bytes(&mut summary, 1, value);
        let mut event = Vec::new();
        field_f64(&mut event, 1, now());
        field_varint(&mut event, 2, step as u64);
        field_bytes(&mut event, 5, &summary);
        self.record(&event)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut rec = Vec::with_capacity(data.len() + 16);
        rec.extend_from_slice(&len);
        rec.extend_from_slice(&masked_crc(&len).to_le_bytes());
        rec.extend_from_slice(data);
        rec.extend_from_slice(&masked_crc(data).to_le_bytes());
        (self.file.write_all(&rec))
            .and_then(|()| self.file.flush())
            .map_err(|e| Error::io(IoOp::Write, &self.path, e))
    }
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A protobuf field key: number and wire type.
fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, ((field as u64) << 3) | wire as u64);
}

fn field_varint(out: &mut Vec<u8>, field: u32, v: u64) {
    key(out, field, 0);
    varint(out, v);
}

fn field_f64(out: &mut Vec<u8>, field: u32, v: f64) {
    key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn field_bytes(out: &mut Vec<u8>, field: u32, v: &[u8]) {
    key(out, field, 2);
    varint(out, v.len() as u64);
    out.extend_from_slice(v);
}

fn field_f32(out: &mut Vec<u8>, field: u32, v: f32) {
    key(out, field, 5);
    out.extend_from_slice(&v.to_le_bytes());
}

/// CRC-32C (Castagnoli), bitwise: event records are small and few.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// TFRecord's masked CRC, which keeps a CRC of CRCs from looking like data.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value of "123456789" (RFC 3720, iSCSI).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn varints_and_fields_encode_as_protobuf() {
        let mut v = Vec::new();
        field_varint(&mut v, 2, 300);
        assert_eq!(v, [0x10, 0xAC, 0x02]);
        let mut v = Vec::new();
        field_bytes(&mut v, 1, b"hi");
        assert_eq!(v, [0x0A, 2, b'h', b'i']);
        let mut v = Vec::new();
        field_f32(&mut v, 2, 1.0);
        assert_eq!(v, [0x15, 0, 0, 0x80, 0x3F]);
    }
}
