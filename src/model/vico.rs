//! ViCo's plug-in visual condition (Hao et al. 2023, arXiv 2306.00971, as its authors'
//! code `haoosz/ViCo` builds it): an image cross-attention block inside some of the
//! U-Net's spatial transformers, after their transformer blocks and before `proj_out`,
//! whose keys and values are a reference image's tokens at the same layer, masked to where
//! the reference attends to its pseudo-word.
//!
//! The reference path is the same frozen U-Net on the reference's clean latent, with the
//! drawn image's timestep and text: a U-Net call of its own before the drawn rows' (a
//! [`Plug`] carries what it leaves to the second), and [`Routing`] says which references
//! each drawn row's blocks see. A drawn row that names two samples (`"<v0> with <v1>"`)
//! sees both references, their tokens one after the other in the keys, each masked by its
//! own word's attention (docs/method.md, ViCo).

use std::cell::RefCell;
use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::Rng;

use super::ops;
use super::unet::UNet;
use crate::error::{Error, Result};
use crate::masks::otsu::otsu_levels;

/// The block's name inside its transformer, as the authors' checkpoints name it.
pub const BLOCK: &str = "image_cross_attention";

/// The levels of ViCo's Otsu threshold.
pub const OTSU_LEVELS: usize = 10;

/// L_reg's weight in the authors' loss.
pub const REG_WEIGHT: f64 = 5e-4;

/// Where a block sits: a transformer's module path, width and heads.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    pub path: String,
    pub dim: usize,
    pub heads: usize,
    /// The cross-attention whose map masks the reference: the transformer's last layer's
    /// (its only one on SD 1.x and 2.x; SDXL's have 2 or 10).
    pub attn: String,
}

/// The transformers that carry a block: those of the decoder whose running id is even,
/// counting every spatial transformer of the U-Net from the encoder's first (the authors'
/// `image_cross=id_attention % 2 == 0` in the output blocks). For SD 1.x and 2.x: ids 8,
/// 10, 12, 14 = `up_blocks.1.attentions.1`, `up_blocks.2.attentions.0`,
/// `up_blocks.2.attentions.2`, `up_blocks.3.attentions.1`; for SDXL, ids 6, 8, 10 =
/// `up_blocks.0.attentions.1`, `up_blocks.1.attentions.0`, `up_blocks.1.attentions.2`.
pub fn sites(unet: &UNet) -> Vec<Site> {
    let all = unet.transformers();
    let decoder_from = all.iter().position(|(up, _)| *up).unwrap_or(all.len());
    (all.iter().enumerate())
        .filter(|(id, (up, _))| *up && id % 2 == 0 && *id >= decoder_from)
        .map(|(_, (_, t))| Site {
            path: t.path.clone(),
            dim: t.channels,
            heads: t.heads,
            attn: format!("{}.transformer_blocks.{}.attn2", t.path, t.layers() - 1),
        })
        .collect()
}

/// A block's parameters as `(name, shape)`: a transformer block at the layer's width
/// (self-attention, cross-attention onto the reference, GEGLU feed-forward, each after a
/// LayerNorm), in diffusers' names.
fn parameter_shapes(dim: usize) -> Vec<(String, Vec<usize>)> {
    let mut v = Vec::new();
    for n in ["norm1", "norm2", "norm3"] {
        v.push((format!("{n}.weight"), vec![dim]));
        v.push((format!("{n}.bias"), vec![dim]));
    }
    for a in ["attn1", "attn2"] {
        for p in ["to_q", "to_k", "to_v"] {
            v.push((format!("{a}.{p}.weight"), vec![dim, dim]));
        }
        v.push((format!("{a}.to_out.0.weight"), vec![dim, dim]));
        v.push((format!("{a}.to_out.0.bias"), vec![dim]));
    }
    v.push(("ff.net.0.proj.weight".into(), vec![dim * 8, dim]));
    v.push(("ff.net.0.proj.bias".into(), vec![dim * 8]));
    v.push(("ff.net.2.weight".into(), vec![dim, dim * 4]));
    v.push(("ff.net.2.bias".into(), vec![dim]));
    v
}

/// One image cross-attention block: f32 weights, cast to the U-Net's dtype in forward.
/// A clone shares the weights.
#[derive(Clone)]
pub struct Block {
    pub site: Site,
    vars: BTreeMap<String, Var>,
    /// Read detached: sampling builds no graph through the weights ([`Blocks::frozen`]).
    frozen: bool,
}

impl Block {
    fn w(&self, name: &str, dtype: DType) -> candle_core::Result<Tensor> {
        let v = self.vars.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!("{}.{BLOCK}: no {name}", self.site.path))
        })?;
        match self.frozen {
            true => v.as_tensor().detach().to_dtype(dtype),
            false => v.as_tensor().to_dtype(dtype),
        }
    }

    fn linear(&self, x: &Tensor, name: &str, bias: bool) -> candle_core::Result<Tensor> {
        let y = x.broadcast_matmul(&self.w(&format!("{name}.weight"), x.dtype())?.t()?)?;
        match bias {
            true => y.broadcast_add(&self.w(&format!("{name}.bias"), x.dtype())?),
            false => Ok(y),
        }
    }

    /// LayerNorm with trained affine parameters, composed so that they get gradients
    /// (statistics in f32 for half inputs, as torch's).
    fn norm(&self, x: &Tensor, name: &str) -> candle_core::Result<Tensor> {
        let up = if x.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let x32 = x.to_dtype(up)?;
        let centred = x32.broadcast_sub(&x32.mean_keepdim(D::Minus1)?)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let y = centred.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        let y = y.broadcast_mul(&self.w(&format!("{name}.weight"), up)?)?;
        y.broadcast_add(&self.w(&format!("{name}.bias"), up)?)?
            .to_dtype(x.dtype())
    }

    /// `x: [m, n, dim]` drawn tokens, `kv: [m, k, dim]` reference tokens, `keep: [m, k]`
    /// (1 where a key is kept, 0 where masked out).
    pub fn forward(&self, x: &Tensor, kv: &Tensor, keep: &Tensor) -> candle_core::Result<Tensor> {
        let (heads, dim) = (self.site.heads, self.site.dim);
        let scale = 1.0 / ((dim / heads) as f64).sqrt();
        let h = self.norm(x, "norm1")?;
        let (q, k, v) = (
            self.linear(&h, "attn1.to_q", false)?,
            self.linear(&h, "attn1.to_k", false)?,
            self.linear(&h, "attn1.to_v", false)?,
        );
        let a = ops::attention(&q, &k, &v, heads, scale)?;
        let x = (x + self.linear(&a, "attn1.to_out.0", true)?)?;
        let h = self.norm(&x, "norm2")?;
        let q = self.linear(&h, "attn2.to_q", false)?;
        let (k, v) = (
            self.linear(kv, "attn2.to_k", false)?,
            self.linear(kv, "attn2.to_v", false)?,
        );
        let a = masked_attention(&q, &k, &v, keep, heads, scale)?;
        let x = (&x + self.linear(&a, "attn2.to_out.0", true)?)?;
        let h = self.norm(&x, "norm3")?;
        let hg = self.linear(&h, "ff.net.0.proj", true)?;
        &x + self.linear(&ops::geglu(&hg)?, "ff.net.2", true)?
    }
}

/// Attention whose masked keys get no weight (the authors fill their scores with the
/// lowest float), in f32 (f64 for f64 inputs) by composed ops: `[m, n, c]` queries,
/// `[m, k, c]` keys and values, `keep: [m, k]`.
fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    keep: &Tensor,
    heads: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let up = if q.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let split = |t: &Tensor| -> candle_core::Result<Tensor> {
        let (b, n, c) = t.dims3()?;
        (t.to_dtype(up)?.reshape((b, n, heads, c / heads))?)
            .transpose(1, 2)?
            .contiguous()
    };
    let scores = (split(q)?.matmul(&split(k)?.t()?)? * scale)?;
    // 0 where kept, -1e30 where not: exp() of a masked score is exactly 0.
    let bias = ((keep.to_dtype(up)? - 1.0)? * 1e30)?
        .unsqueeze(1)?
        .unsqueeze(1)?;
    let p = candle_nn::ops::softmax(&scores.broadcast_add(&bias)?, D::Minus1)?;
    let (b, n, c) = q.dims3()?;
    (p.matmul(&split(v)?)?.transpose(1, 2)?.reshape((b, n, c))?).to_dtype(q.dtype())
}

/// Every block of a run, by site in U-Net order. A clone shares the weights.
#[derive(Clone)]
pub struct Blocks {
    pub blocks: Vec<Block>,
}

impl Blocks {
    /// New blocks at `sites`, initialised as torch initialises a new module (the authors'
    /// blocks are not zeroed): linear weights and biases uniform in ±1/sqrt(fan_in),
    /// LayerNorms 1 and 0; drawn from `seed`, held in `dtype` (f32 to train; f64 for
    /// finite differences).
    pub fn init(sites: &[Site], seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        let mut rng = crate::rng::seeded(seed ^ 0x5669_436f);
        let blocks = sites
            .iter()
            .map(|site| {
                let vars = parameter_shapes(site.dim)
                    .into_iter()
                    .map(|(name, shape)| {
                        let n: usize = shape.iter().product();
                        let data: Vec<f32> = match name.as_str() {
                            x if x.starts_with("norm") && x.ends_with(".weight") => vec![1.0; n],
                            x if x.starts_with("norm") => vec![0.0; n],
                            _ => {
                                let fan_in = match name.ends_with(".bias") {
                                    true => fan_in_of(&name, site.dim),
                                    false => shape[1],
                                };
                                let bound = 1.0 / (fan_in as f32).sqrt();
                                (0..n).map(|_| rng.random_range(-bound..bound)).collect()
                            }
                        };
                        let t = Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?;
                        Ok((name, Var::from_tensor(&t)?))
                    })
                    .collect::<Result<BTreeMap<_, _>>>()?;
                Ok(Block {
                    site: site.clone(),
                    vars,
                    frozen: false,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { blocks })
    }

    /// Blocks from named tensors (`<site>.image_cross_attention.<name>`), for `sites`;
    /// every parameter must be there with its shape.
    pub fn from_tensors(
        tensors: &std::collections::HashMap<String, Tensor>,
        file: &std::path::Path,
        sites: &[Site],
        device: &Device,
    ) -> Result<Self> {
        let mut blocks = Vec::new();
        for site in sites {
            let mut vars = BTreeMap::new();
            for (name, shape) in parameter_shapes(site.dim) {
                let key = format!("{}.{BLOCK}.{name}", site.path);
                let t = tensors.get(&key).ok_or_else(|| {
                    Error::bad_file(
                        file,
                        format!(
                            "{} has no {key}: it is not a ViCo blocks file, or was trained on a \
                             U-Net of another layout. Pass the base model it was trained on.",
                            file.display()
                        ),
                    )
                })?;
                if t.dims() != shape.as_slice() {
                    return Err(Error::mismatch(
                        file,
                        format!(
                            "{}: its {key} is {:?} but this U-Net needs {shape:?}: it was \
                             trained on another base model. Pass that model with --model.",
                            file.display(),
                            t.dims()
                        ),
                    ));
                }
                let t = t.to_dtype(DType::F32)?.to_device(device)?;
                vars.insert(name, Var::from_tensor(&t)?);
            }
            blocks.push(Block {
                site: site.clone(),
                vars,
                frozen: false,
            });
        }
        Ok(Self { blocks })
    }

    /// The same weights (shared, not copied) read without a graph: for sampling, where a
    /// trainable weight would chain every step's activations to the next through the
    /// latents.
    pub fn frozen(&self) -> Self {
        let blocks = (self.blocks.iter())
            .map(|b| Block {
                frozen: true,
                ..b.clone()
            })
            .collect();
        Self { blocks }
    }

    pub fn get(&self, path: &str) -> Option<&Block> {
        self.blocks.iter().find(|b| b.site.path == path)
    }

    /// Every parameter by its file name, in a fixed order.
    pub fn named(&self) -> Vec<(String, &Var)> {
        (self.blocks.iter())
            .flat_map(|b| {
                (b.vars.iter()).map(move |(n, v)| (format!("{}.{BLOCK}.{n}", b.site.path), v))
            })
            .collect()
    }

    pub fn vars(&self) -> Vec<Var> {
        self.named().into_iter().map(|(_, v)| v.clone()).collect()
    }

    /// Zeroes every residual branch's output projection: each block then passes its
    /// input through unchanged (for tests).
    pub fn zero_outputs(&self) -> Result<()> {
        for b in &self.blocks {
            for (name, v) in &b.vars {
                if name.contains("to_out.0") || name.starts_with("ff.net.2") {
                    v.set(&v.as_tensor().zeros_like()?)?;
                }
            }
        }
        Ok(())
    }
}

/// The fan-in a bias's bound comes from: its linear's input width.
fn fan_in_of(bias: &str, dim: usize) -> usize {
    match bias {
        "ff.net.2.bias" => dim * 4,
        _ => dim,
    }
}

/// Who sees whom: the reference rows' masks, and which references each drawn row sees.
#[derive(Debug, Clone)]
pub struct Routing {
    /// For each drawn row, the reference rows its blocks attend to, their tokens
    /// concatenated in this order.
    pub refs_of: Vec<Vec<usize>>,
    /// For each reference row, the prompt position whose attention masks its keys: its
    /// pseudo-word, or the end-of-text token where the prompt has none.
    pub mask_token: Vec<usize>,
    /// Training: each reference row's end-of-text position, for L_reg.
    pub reg_eot: Option<Vec<usize>>,
}

/// What the reference pass leaves at one block application: its tokens `[refs, n, dim]`,
/// the word's map `[refs, n]` (detached), and the keep mask thresholded from it when the
/// drawn pass starts.
struct Recorded {
    path: String,
    tokens: Tensor,
    word: Tensor,
    keep: Option<Tensor>,
}

/// What two U-Net calls carry for ViCo (`Ctx::vico`). First the reference pass (the
/// references' clean latents, their prompts' text): after each transformer block at a
/// site it records the tokens, the Otsu mask of the word's map and L_reg's term. Then,
/// after [`Plug::start_drawing`], the drawn pass: at the same places the drawn rows go
/// through the site's block onto the recorded tokens. Two calls rather than one batch, so
/// that the drawn rows' arithmetic is plain sampling's to the bit.
pub struct Plug<'a> {
    pub blocks: &'a Blocks,
    pub routing: Routing,
    drawing: std::cell::Cell<bool>,
    maps: RefCell<Vec<(String, Tensor)>>,
    recorded: RefCell<std::collections::VecDeque<Recorded>>,
    reg: RefCell<Vec<Tensor>>,
    /// Each L_reg term's word and (stop-gradient) end-of-text maps `[refs, n]`.
    reg_maps: RefCell<Vec<(Tensor, Tensor)>>,
}

impl<'a> Plug<'a> {
    pub fn new(blocks: &'a Blocks, routing: Routing) -> Self {
        Self {
            blocks,
            routing,
            drawing: std::cell::Cell::new(false),
            maps: RefCell::new(Vec::new()),
            recorded: RefCell::new(Default::default()),
            reg: RefCell::new(Vec::new()),
            reg_maps: RefCell::new(Vec::new()),
        }
    }

    /// The reference pass is over: every site's Otsu mask is thresholded (on the host,
    /// from one read back of all sites' maps) and the next U-Net call is the drawn rows'.
    pub fn start_drawing(&self) -> candle_core::Result<()> {
        self.drawing.set(true);
        let mut recorded = self.recorded.borrow_mut();
        let Some(first) = recorded.front() else {
            return Ok(());
        };
        let dev = first.word.device().clone();
        let words: Vec<&Tensor> = recorded.iter().map(|r| &r.word).collect();
        let maps = Tensor::cat(&words, 1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut offset = 0;
        for r in recorded.iter_mut() {
            let n = r.word.dim(1)?;
            let keep: Vec<f32> = (maps.iter())
                .flat_map(|row| otsu_levels(&row[offset..offset + n], OTSU_LEVELS))
                .map(|k| if k { 1.0 } else { 0.0 })
                .collect();
            r.keep = Some(Tensor::from_vec(keep, (maps.len(), n), &dev)?);
            offset += n;
        }
        Ok(())
    }

    /// The reference pass wants the cross-attention at `attn_path`: the one whose map a
    /// block reads.
    pub(crate) fn wants(&self, attn_path: &str) -> bool {
        !self.drawing.get() && (self.blocks.blocks.iter()).any(|b| b.site.attn == attn_path)
    }

    /// Records the reference rows' head-averaged probabilities `[refs, n, tokens]`.
    pub(crate) fn record(&self, attn_path: &str, probs: Tensor) {
        self.maps.borrow_mut().push((attn_path.to_string(), probs));
    }

    /// L_reg's terms so far, one per block application (training only).
    pub fn take_reg(&self) -> Vec<Tensor> {
        std::mem::take(&mut *self.reg.borrow_mut())
    }

    /// The maps each L_reg term compares: the word's (in the graph) and the end-of-text
    /// one (detached), `[refs, n]` each.
    pub fn take_reg_maps(&self) -> Vec<(Tensor, Tensor)> {
        std::mem::take(&mut *self.reg_maps.borrow_mut())
    }

    /// After the last transformer block of the transformer at `path`, on its tokens
    /// `[rows, n, dim]`: records the references (reference pass), or puts the drawn rows through the
    /// site's block (drawn pass). Tokens of a transformer without a block pass unchanged.
    pub(crate) fn apply(&self, path: &str, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let Some(block) = self.blocks.get(path) else {
            return Ok(tokens.clone());
        };
        if self.drawing.get() {
            return self.draw(block, tokens);
        }
        let probs = (self.maps.borrow_mut().pop())
            .filter(|(p, _)| p.starts_with(path))
            .map(|(_, m)| m)
            .ok_or_else(|| candle_core::Error::Msg(format!("{path}: no reference attention")))?;
        let r = &self.routing;
        let column = |pos: &[usize]| -> candle_core::Result<Tensor> {
            let rows = (0..pos.len())
                .map(|i| probs.get(i)?.narrow(1, pos[i], 1)?.squeeze(1))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::stack(&rows, 0)
        };
        let word = column(&r.mask_token)?;
        if let Some(eot) = &r.reg_eot {
            // The word's map and the stop-gradient end-of-text map, each over its maximum.
            let over_max = |m: &Tensor| m.broadcast_div(&m.max_keepdim(D::Minus1)?);
            let eot = column(eot)?.detach();
            let diff = (over_max(&word)? - over_max(&eot)?)?;
            self.reg.borrow_mut().push(diff.sqr()?.mean_all()?);
            self.reg_maps.borrow_mut().push((word.clone(), eot));
        }
        self.recorded.borrow_mut().push_back(Recorded {
            path: path.to_string(),
            tokens: tokens.clone(),
            word: word.detach(),
            keep: None,
        });
        Ok(tokens.clone())
    }

    /// The drawn rows through `block`, each onto its references' recorded tokens (one
    /// after the other; a row with fewer references than the most repeats its first,
    /// masked out).
    fn draw(&self, block: &Block, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let rec = (self.recorded.borrow_mut().pop_front())
            .filter(|r| r.path == block.site.path)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("{}: no recorded reference", block.site.path))
            })?;
        let refs_of = &self.routing.refs_of;
        let rows = tokens.dim(0)?;
        if refs_of.len() != rows {
            candle_core::bail!("ViCo: {rows} drawn rows, but routing for {}", refs_of.len());
        }
        let most = refs_of.iter().map(Vec::len).max().unwrap_or(1);
        let (mut idx, mut pad) = (Vec::new(), Vec::new());
        for refs in refs_of {
            for j in 0..most {
                idx.push(*refs.get(j).unwrap_or(&refs[0]) as u32);
                pad.push(if j < refs.len() { 1f32 } else { 0.0 });
            }
        }
        let dev = tokens.device();
        let idx = Tensor::from_vec(idx, rows * most, dev)?;
        let (n, dim) = (rec.tokens.dim(1)?, rec.tokens.dim(2)?);
        let kv = (rec.tokens.index_select(&idx, 0)?).reshape((rows, most * n, dim))?;
        let pad = Tensor::from_vec(pad, (rows * most, 1), dev)?;
        let keep = (rec.keep.as_ref())
            .ok_or_else(|| candle_core::Error::Msg("ViCo: drawing before start_drawing".into()))?;
        let keep = keep.index_select(&idx, 0)?.broadcast_mul(&pad)?;
        block.forward(tokens, &kv, &keep.reshape((rows, most * n))?)
    }
}
