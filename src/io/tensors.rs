//! safetensors files: whole-file reads that name the file on failure, a header check
//! that catches truncated downloads before loading, and atomic, deterministic writes.

use std::collections::HashMap;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor};

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

/// A model's safetensors files, read tensor by tensor as its loader asks (a `VarBuilder`
/// backend): each weight is resident once. Through a memory map, the file's pages count
/// beside the copies candle makes of them: twice the model at the load's peak (19.6 GB
/// for SDXL's 10.3 GB U-Net, benches/README.md). Float tensors are read straight into
/// their storage (transparent huge pages where Linux allows) and scanned for NaN and
/// infinity as they arrive: one pass over the file, where a separate [`check`] was two.
pub struct FileTensors {
    files: Vec<(PathBuf, Mutex<std::fs::File>)>,
    entries: HashMap<String, Entry>,
}

/// Where one tensor's bytes are, as the header says.
struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    start: u64,
    len: usize,
}

impl FileTensors {
    /// Reads the headers of `files` (checked as [`read_header`] checks them).
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let mut entries = HashMap::new();
        let mut handles = Vec::with_capacity(files.len());
        for (i, file) in files.iter().enumerate() {
            let header = read_header(file)?;
            for (name, t) in header.json.as_object().into_iter().flatten() {
                if name != "__metadata__" {
                    let e = entry(file, i, header.data_start, name, t)?;
                    entries.insert(name.clone(), e);
                }
            }
            let handle = std::fs::File::open(file).map_err(|e| Error::read(file, e))?;
            handles.push((file.clone(), Mutex::new(handle)));
        }
        Ok(Self {
            files: handles,
            entries,
        })
    }

    /// Every tensor's name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.entries.keys().cloned().collect();
        names.sort();
        names
    }

    /// The stored shape of `name`, from the header.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The tensor `name` on `dev`, in its stored dtype as candle reads it (candle's own
    /// conversion: U16 widens to U32, and a dtype candle lacks is refused). A float
    /// tensor holding NaN or infinity is refused as [`check`] refuses it, the error
    /// [`carry`](crate::error::carry)ed through candle's.
    pub fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| not_found(name))?;
        let (path, file) = &self.files[e.file];
        let context =
            |what: String| candle_core::Error::Msg(format!("{}: {name}: {what}", path.display()));
        let mut f = file
            .lock()
            .map_err(|_| context("the file's lock was poisoned".into()))?;
        f.seek(std::io::SeekFrom::Start(e.start))
            .map_err(|err| context(err.to_string()))?;
        // The floats are read straight into the tensor's storage: one copy, not two.
        let t = match e.dtype {
            safetensors::Dtype::F32 => read_tensor::<f32>(&mut f, e),
            safetensors::Dtype::F16 => read_tensor::<half::f16>(&mut f, e),
            safetensors::Dtype::BF16 => read_tensor::<half::bf16>(&mut f, e),
            safetensors::Dtype::F64 => read_tensor::<f64>(&mut f, e),
            _ => {
                let mut bytes = vec![0u8; e.len];
                f.read_exact(&mut bytes)
                    .map_err(|err| context(err.to_string()))?;
                let view = safetensors::tensor::TensorView::new(e.dtype, e.shape.clone(), &bytes)
                    .map_err(|err| context(err.to_string()))?;
                candle_core::safetensors::Load::load(&view, &Device::Cpu).map_err(ReadError::Candle)
            }
        };
        let t = t.map_err(|err| match err {
            ReadError::Io(err) => context(err.to_string()),
            ReadError::Candle(err) => context(crate::error::brief(&err)),
            ReadError::NonFinite => crate::error::carry(non_finite(path, name)),
        })?;
        t.to_device(dev)
    }
}

/// Why a tensor's bytes did not become a tensor.
enum ReadError {
    Io(std::io::Error),
    Candle(candle_core::Error),
    NonFinite,
}

impl From<candle_core::Error> for ReadError {
    fn from(e: candle_core::Error) -> Self {
        ReadError::Candle(e)
    }
}

/// Float element types whose every bit pattern is a value (all zeros too), stored
/// little-endian as safetensors stores them.
trait Plain: candle_core::WithDType {}
impl Plain for f32 {}
impl Plain for f64 {}
impl Plain for half::f16 {}
impl Plain for half::bf16 {}

/// The tensor of entry `e`, read from `f`'s position into its own storage and checked
/// for NaN and infinity chunk by chunk while the bytes are in cache.
fn read_tensor<T: Plain>(
    f: &mut std::fs::File,
    e: &Entry,
) -> std::result::Result<Tensor, ReadError> {
    let n = e.shape.iter().product();
    let layout = std::alloc::Layout::array::<T>(n)
        .map_err(|_| ReadError::Candle(candle_core::Error::msg("larger than memory")))?;
    let mut v = zeroed::<T>(layout, n);
    // SAFETY: `v` holds `n` initialised `T`s (`layout.size()` bytes), and any bytes
    // written through this view are a `T` (`Plain`).
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), layout.size()) };
    let mask = exponent_mask(e.dtype);
    for chunk in bytes.chunks_mut(CHUNK as usize) {
        f.read_exact(chunk).map_err(ReadError::Io)?;
        if mask.is_some_and(|(width, mask)| has_non_finite(chunk, width, mask)) {
            return Err(ReadError::NonFinite);
        }
    }
    Ok(Tensor::from_vec(v, e.shape.as_slice(), &Device::Cpu)?)
}

/// `n` zero `T`s in `layout`, allocated zeroed: fresh pages that the read then fills,
/// rather than a fill and then the read.
fn zeroed<T: Plain>(layout: std::alloc::Layout, n: usize) -> Vec<T> {
    if layout.size() == 0 {
        return Vec::new();
    }
    // SAFETY: a non-empty layout of `n` `T`s; all-zero bytes are a `T` (`Plain`); the
    // Vec gets the allocation with the layout it was made with.
    unsafe {
        let p = std::alloc::alloc_zeroed(layout);
        if p.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        huge_pages(p, layout.size());
        Vec::from_raw_parts(p.cast::<T>(), n, n)
    }
}

/// Asks Linux to back `len` bytes at `p` (fresh, untouched) with transparent huge pages
/// where the system allows them on request (`madvise`, Ubuntu's and Debian's default).
/// Each 4 KiB page's first touch is a fault the kernel answers by zeroing it: 62% of
/// SDXL's U-Net load on this project's box went there (benches/README.md).
#[cfg(target_os = "linux")]
fn huge_pages(p: *mut u8, len: usize) {
    const HUGE: usize = 2 << 20;
    if len < 2 * HUGE {
        return;
    }
    const PAGE: usize = 4096;
    let start = (p as usize).next_multiple_of(PAGE);
    let end = (p as usize + len) / PAGE * PAGE;
    // SAFETY: the page-aligned range lies inside one live allocation; the advice changes
    // how its pages are backed, never their contents. A refusal only loses the speed-up.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
    }
}

#[cfg(not(target_os = "linux"))]
fn huge_pages(_: *mut u8, _: usize) {}

/// One header entry of `file` (the `i`-th), its offsets made absolute, its length checked
/// against its dtype and shape.
fn entry(
    file: &Path,
    i: usize,
    data_start: u64,
    name: &str,
    t: &serde_json::Value,
) -> Result<Entry> {
    let bad = |why: &str| {
        Error::bad_file(
            file,
            format!("{}: the tensor {name:?} {why}.", file.display()),
        )
    };
    let dtype: safetensors::Dtype = (t.get("dtype").cloned())
        .and_then(|d| serde_json::from_value(d).ok())
        .ok_or_else(|| bad("has no dtype safetensors knows"))?;
    let shape: Vec<usize> = (t.get("shape").and_then(|s| s.as_array()))
        .and_then(|s| s.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
        .ok_or_else(|| bad("has no shape"))?;
    let offsets = t.get("data_offsets").and_then(|o| o.as_array());
    let (a, b) = offsets
        .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)))
        .ok_or_else(|| bad("has no data offsets"))?;
    let want = (shape.iter().product::<usize>() * dtype.bitsize()).div_ceil(8);
    if b < a || b - a != want as u64 {
        return Err(bad(&format!(
            "has data offsets {a}..{b} but its shape {shape:?} of {dtype} needs {want} bytes"
        )));
    }
    Ok(Entry {
        file: i,
        dtype,
        shape,
        start: data_start + a,
        len: want,
    })
}

/// The error candle's own backends give for a tensor a file lacks.
pub(crate) fn not_found(name: &str) -> candle_core::Error {
    candle_core::Error::CannotFindTensor {
        path: name.to_string(),
    }
    .bt()
}

/// `t` where it has shape `want`; else the error candle's own backends give, naming
/// `what`.
pub(crate) fn shaped(
    t: Tensor,
    want: Shape,
    what: impl FnOnce() -> String,
) -> candle_core::Result<Tensor> {
    if t.shape() == &want {
        return Ok(t);
    }
    Err(candle_core::Error::UnexpectedShape {
        msg: format!("shape mismatch for {}", what()),
        expected: want,
        got: t.shape().clone(),
    }
    .bt())
}

impl candle_nn::var_builder::SimpleBackend for FileTensors {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        shaped(self.get_unchecked(name, dtype, dev)?, s, || {
            name.to_string()
        })
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
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
    match first_non_finite(file, &header)? {
        Some(name) => Err(non_finite(file, &name)),
        None => Ok(()),
    }
}

/// The error for `file`'s tensor `name` holding NaN or infinity.
fn non_finite(file: &Path, name: &str) -> Error {
    Error::bad_file(
        file,
        format!(
            "{}: the tensor {name:?} holds NaN or infinite values. The file is corrupt or was \
             saved from a diverged run: download it again, or retrain (a lower learning rate, \
             --dtype f32).",
            file.display()
        ),
    )
}

/// A float format's width in bytes and its exponent bits: all set means NaN or infinity.
fn exponent_mask(dtype: safetensors::Dtype) -> Option<(usize, u64)> {
    use safetensors::Dtype as D;
    match dtype {
        D::F16 => Some((2, 0x7C00)),
        D::BF16 => Some((2, 0x7F80)),
        D::F32 => Some((4, 0x7F80_0000)),
        D::F64 => Some((8, 0x7FF0_0000_0000_0000)),
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
        let dtype = (t.get("dtype").cloned()).and_then(|d| serde_json::from_value(d).ok());
        let offsets = t.get("data_offsets").and_then(|o| o.as_array());
        let range = offsets.and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)));
        if let (Some((width, mask)), Some((a, b))) = (dtype.and_then(exponent_mask), range) {
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
        use safetensors::Dtype as D;
        let cases: [(D, &[u8]); 6] = [
            (D::F16, &0x7C00u16.to_le_bytes()),  // +inf
            (D::F16, &0xFE01u16.to_le_bytes()),  // NaN, sign set
            (D::BF16, &0x7FC0u16.to_le_bytes()), // NaN
            (D::F32, &f32::NEG_INFINITY.to_le_bytes()),
            (D::F32, &f32::NAN.to_le_bytes()),
            (D::F64, &f64::INFINITY.to_le_bytes()),
        ];
        for (dtype, bad) in cases {
            let (w, mask) = exponent_mask(dtype).unwrap();
            // A bad value at the end of a long run of finite extremes and zeros.
            let mut bytes: Vec<u8> = match dtype {
                D::F16 => 0x7BFFu16.to_le_bytes().repeat(5000), // largest finite f16
                D::BF16 => 0x7F7Fu16.to_le_bytes().repeat(5000),
                D::F32 => f32::MAX.to_le_bytes().repeat(5000),
                _ => f64::MIN.to_le_bytes().repeat(5000),
            };
            assert!(
                !has_non_finite(&bytes, w, mask),
                "{dtype:?}: false positive"
            );
            bytes.extend_from_slice(bad);
            assert!(has_non_finite(&bytes, w, mask), "{dtype:?}: missed {bad:?}");
        }
    }

    /// Tensor by tensor, across two files, every dtype a model may hold reads back as it
    /// was written; a VarBuilder over them checks shapes and names.
    #[test]
    fn file_tensors_read_what_candle_reads() {
        use candle_nn::var_builder::SimpleBackend;
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let ramp = |n: usize, dtype: DType| {
            let t = Tensor::arange(0f32, n as f32, &dev).unwrap();
            ((t * 0.37).unwrap().sin().unwrap())
                .to_dtype(dtype)
                .unwrap()
        };
        let one = HashMap::from([
            (
                "a.f16".to_string(),
                ramp(6, DType::F16).reshape((2, 3)).unwrap(),
            ),
            ("a.bf16".to_string(), ramp(5, DType::BF16)),
            (
                "a.f32".to_string(),
                ramp(12, DType::F32).reshape((3, 2, 2)).unwrap(),
            ),
        ]);
        let two = HashMap::from([
            ("b.f64".to_string(), ramp(4, DType::F64)),
            (
                "b.i64".to_string(),
                Tensor::new(&[3i64, -7, 9], &dev).unwrap(),
            ),
            ("b.u8".to_string(), Tensor::new(&[1u8, 255], &dev).unwrap()),
            ("b.i32".to_string(), Tensor::new(&[-5i32, 6], &dev).unwrap()),
            ("b.i16".to_string(), Tensor::new(&[-5i16, 7], &dev).unwrap()),
        ]);
        let files = [
            dir.path().join("1.safetensors"),
            dir.path().join("2.safetensors"),
        ];
        write(&files[0], &one, None).unwrap();
        write(&files[1], &two, None).unwrap();
        let ft = FileTensors::open(&files).unwrap();
        assert_eq!(ft.names().len(), 8);
        for (name, want) in one.iter().chain(&two) {
            let got = ft.load(name, &dev).unwrap();
            assert_eq!(got.dtype(), want.dtype(), "{name}");
            assert_eq!(got.dims(), want.dims(), "{name}");
            let (got, want) = (
                got.to_dtype(DType::F64).unwrap(),
                want.to_dtype(DType::F64).unwrap(),
            );
            let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f64>().unwrap(), 0.0, "{name}");
        }
        let f32_as = ft.get(
            (3, 2, 2).into(),
            "a.f32",
            candle_nn::Init::Const(0.),
            DType::F16,
            &dev,
        );
        assert_eq!(f32_as.unwrap().dtype(), DType::F16);
        assert!(ft
            .get(
                (12,).into(),
                "a.f32",
                candle_nn::Init::Const(0.),
                DType::F32,
                &dev
            )
            .is_err());
        assert!(ft.get_unchecked("missing", DType::F32, &dev).is_err());
        assert!(ft.contains_tensor("b.u8") && !ft.contains_tensor("missing"));
    }

    /// A header whose offsets disagree with a tensor's shape is refused, naming the file
    /// and the tensor, before any tensor is read.
    #[test]
    fn file_tensors_refuse_offsets_that_disagree_with_the_shape() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.safetensors");
        let header = br#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        bytes.extend_from_slice(&[0u8; 12]);
        std::fs::write(&file, bytes).unwrap();
        let err = FileTensors::open(std::slice::from_ref(&file))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("bad.safetensors") && err.contains("\"w\"") && err.contains("needs 16"),
            "{err}"
        );
    }
}
