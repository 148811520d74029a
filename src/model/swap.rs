//! Layout-and-Retouch's multi-source attention swap (seed 002, §3.2.2), inside the
//! U-Net's self-attention. One U-Net call carries every path of a retouch step: the
//! source rows first (each image's layout path, then the references' paths), then the
//! target rows (the images being retouched, unconditional then conditional under
//! guidance). Sources attend to themselves, as they would alone; a target's queries
//! attend to the keys and values of its layout path in the early steps and of every
//! reference together later (MasaCtrl's mutual self-attention, in MasaCtrl's layers);
//! where a blend mask is set, a target's output is `M out + (1 - M) out_layout` in every
//! self-attention layer.

use std::cell::{OnceCell, RefCell};
use std::collections::{HashMap, HashSet};

use candle_core::{Device, Result, Tensor};

use super::ops;
use super::unet::UNet;

/// Whose keys and values a target's self-attention reads in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Its own image's layout path.
    Layout,
    /// Every reference path's, side by side.
    References,
}

/// One retouch step's attention control.
pub struct Swap {
    /// Source rows at the front of the batch; the rest are targets.
    sources: usize,
    /// Per target row, its layout row (empty: the batch carries no layout rows).
    layout_of: Vec<u32>,
    /// The reference rows.
    references: Vec<u32>,
    /// Transformers whose self-attention swaps (module paths).
    layers: HashSet<String>,
    /// Whose keys and values the targets read this step (None: their own).
    source: Option<Source>,
    /// Per query count (a layer's `h * w`), the targets' blend masks `[targets, n, 1]`.
    blend: HashMap<usize, Tensor>,
    /// The references' keys and values read from a cache instead of rows, per layer
    /// path: `[1, refs * n, dim]` each.
    cached: HashMap<String, (Tensor, Tensor)>,
    /// A references' own pass: every swap layer's keys and values, kept for the cache.
    captured: Option<RefCell<KeysValues>>,
    /// Tests: each blended or swapped layer's (path, targets' output, their layouts').
    recorded: Option<RefCell<Vec<(String, Tensor, Tensor)>>>,
    /// `layout_of` and `references` on the device, made at the first layer that reads them.
    layout_idx: OnceCell<Tensor>,
    refs_idx: OnceCell<Tensor>,
}

/// Keys and values `[b, n, dim]` per self-attention module path.
pub type KeysValues = HashMap<String, (Tensor, Tensor)>;

impl Swap {
    /// `sources` rows, then targets whose layout rows are `layout_of`; `references` are
    /// source rows too. Swaps nothing and blends nothing until told.
    pub fn new(sources: usize, layout_of: Vec<u32>, references: Vec<u32>) -> Self {
        Self {
            sources,
            layout_of,
            references,
            layers: HashSet::new(),
            source: None,
            blend: HashMap::new(),
            cached: HashMap::new(),
            captured: None,
            recorded: None,
            layout_idx: OnceCell::new(),
            refs_idx: OnceCell::new(),
        }
    }

    /// `rows` as an index tensor on `device`, made once.
    fn index<'s>(cell: &'s OnceCell<Tensor>, rows: &[u32], device: &Device) -> Result<&'s Tensor> {
        if let Some(t) = cell.get() {
            return Ok(t);
        }
        let t = Tensor::new(rows, device)?;
        Ok(cell.get_or_init(|| t))
    }

    /// A pass that changes nothing and keeps the keys and values of `layers`' self-attention
    /// ([`Self::take_captured`]).
    pub fn capturing(layers: HashSet<String>) -> Self {
        Self {
            layers,
            captured: Some(RefCell::new(HashMap::new())),
            ..Self::new(0, Vec::new(), Vec::new())
        }
    }

    pub fn take_captured(&self) -> KeysValues {
        (self.captured.as_ref())
            .map(|c| std::mem::take(&mut *c.borrow_mut()))
            .unwrap_or_default()
    }

    /// Read the references' keys and values from `cached` (per path, `[1, refs * n, dim]`)
    /// instead of reference rows.
    pub fn with_cached(mut self, cached: KeysValues) -> Self {
        self.cached = cached;
        self
    }

    /// Swap keys and values from `source` in `layers` (transformer paths).
    pub fn swapping(mut self, source: Option<Source>, layers: HashSet<String>) -> Self {
        self.source = source;
        self.layers = layers;
        self
    }

    /// Blend with the layout by `masks` (per query count, `[targets, n, 1]`).
    pub fn blending(mut self, masks: HashMap<usize, Tensor>) -> Self {
        self.blend = masks;
        self
    }

    /// Keep every changed layer's outputs, for [`Self::take_recorded`].
    pub fn recording(mut self) -> Self {
        self.recorded = Some(RefCell::new(Vec::new()));
        self
    }

    pub fn take_recorded(&self) -> Vec<(String, Tensor, Tensor)> {
        (self.recorded.as_ref())
            .map(|r| std::mem::take(&mut *r.borrow_mut()))
            .unwrap_or_default()
    }

    fn in_layers(&self, path: &str) -> bool {
        (self.layers.iter()).any(|l| path.starts_with(l.as_str()))
    }

    fn swaps(&self, path: &str) -> bool {
        self.source.is_some() && self.in_layers(path)
    }

    /// The self-attention of `q, k, v: [b, n, dim]` at module `path`, or None where this
    /// layer is left alone (the caller attends as usual).
    pub(crate) fn self_attention(
        &self,
        path: &str,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        heads: usize,
        scale: f64,
    ) -> Result<Option<Tensor>> {
        if let Some(c) = &self.captured {
            if self.in_layers(path) {
                c.borrow_mut()
                    .insert(path.to_string(), (k.clone(), v.clone()));
            }
            return Ok(None);
        }
        let n = q.dim(1)?;
        let mask = self.blend.get(&n);
        let swap = self.swaps(path);
        if mask.is_none() && !swap {
            return Ok(None);
        }
        let (s, t) = (self.sources, q.dim(0)? - self.sources);
        let rows = |x: &Tensor, a, len| x.narrow(0, a, len);
        let out_src = match s {
            0 => None,
            _ => Some(ops::attention(
                &rows(q, 0, s)?,
                &rows(k, 0, s)?,
                &rows(v, 0, s)?,
                heads,
                scale,
            )?),
        };
        let (k_t, v_t) = match (swap, self.source) {
            (true, Some(Source::Layout)) => {
                let idx = Self::index(&self.layout_idx, &self.layout_of, q.device())?;
                (k.index_select(idx, 0)?, v.index_select(idx, 0)?)
            }
            (true, Some(Source::References)) => match self.cached.get(path) {
                Some((ck, cv)) => (ck.repeat((t, 1, 1))?, cv.repeat((t, 1, 1))?),
                None => (self.side_by_side(k, t)?, self.side_by_side(v, t)?),
            },
            _ => (rows(k, s, t)?, rows(v, s, t)?),
        };
        let mut out_t = ops::attention(&rows(q, s, t)?, &k_t, &v_t, heads, scale)?;
        let out_layout = match (&out_src, self.layout_of.is_empty()) {
            (Some(src), false) => {
                let idx = Self::index(&self.layout_idx, &self.layout_of, q.device())?;
                Some(src.index_select(idx, 0)?)
            }
            _ => None,
        };
        if let Some(m) = mask {
            let layout = (out_layout.as_ref())
                .ok_or_else(|| candle_core::Error::Msg("a blend without layout rows".into()))?;
            let m = m.to_dtype(out_t.dtype())?;
            out_t = (layout + m.broadcast_mul(&(&out_t - layout)?)?)?;
        }
        if let (Some(r), Some(layout)) = (&self.recorded, out_layout) {
            r.borrow_mut()
                .push((path.to_string(), out_t.clone(), layout));
        }
        Ok(Some(match out_src {
            Some(src) => Tensor::cat(&[&src, &out_t], 0)?,
            None => out_t,
        }))
    }

    /// The reference rows of `x: [b, n, dim]` side by side `[t, refs * n, dim]`, for each
    /// of `t` targets.
    fn side_by_side(&self, x: &Tensor, t: usize) -> Result<Tensor> {
        let (_, n, d) = x.dims3()?;
        let idx = Self::index(&self.refs_idx, &self.references, x.device())?;
        let refs = x
            .index_select(idx, 0)?
            .reshape((1, self.references.len() * n, d))?;
        refs.repeat((t, 1, 1))
    }
}

/// The transformers whose self-attention swaps: the decoder's, outside its coarsest level
/// with attention. For SD 1.x and 2.x these are MasaCtrl's layers 10 to 15 of 16 (running
/// order), `up_blocks.2` and `up_blocks.3`: 32x32 and 64x64 queries at 512 px.
pub fn swap_layers(unet: &UNet) -> HashSet<String> {
    let decoder: Vec<&str> = (unet.transformers().into_iter())
        .filter(|(up, _)| *up)
        .map(|(_, t)| t.path.as_str())
        .collect();
    let level = |p: &str| p.split('.').nth(1).map(str::to_string);
    let coarsest = decoder.first().and_then(|p| level(p));
    (decoder.into_iter())
        .filter(|p| level(p) != coarsest)
        .map(String::from)
        .collect()
}
