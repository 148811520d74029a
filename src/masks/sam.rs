//! `--refine sam`: Segment Anything (candle-transformers' `segment_anything`: SAM ViT-B,
//! -L, -H or MobileSAM's TinyViT, in candle's layout as `lmz/candle-sam` publishes them)
//! snaps an attention mask to the object's edges. It is prompted with the attention
//! mask's bounding box and its strongest points; of its three proposals the best-scoring
//! one that overlaps the attention mask wins, and none overlapping keeps the attention
//! mask.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::segment_anything::{
    image_encoder::ImageEncoderViT,
    mask_decoder::MaskDecoder,
    prompt_encoder::PromptEncoder,
    tiny_vit::{tiny_vit_5m, TinyViT},
};

use super::pair::ImageMask;
use super::Binary;
use crate::error::{Error, Result};
use crate::model::loader::{hub_file, looks_like_hub_id as is_hub_id};

/// `--sam-model`'s default: SAM ViT-B in candle's layout.
pub const DEFAULT_MODEL: &str = "lmz/candle-sam";
const DEFAULT_FILE: &str = "sam_vit_b_01ec64.safetensors";
/// SAM's input side, patch size and prompt width (fixed by its weights).
const SIDE: usize = 1024;
const PATCH: usize = 16;
const PROMPT_DIM: usize = 256;
/// A proposal must cover at least this IoU with the attention mask to replace it.
const MIN_OVERLAP: f64 = 0.25;
/// Positive points: the strongest attention inside the mask, this many, spread apart.
const POINTS: usize = 2;

enum Encoder {
    Vit(Box<ImageEncoderViT>),
    Tiny(Box<TinyViT>),
}

pub struct Refiner {
    pub source: PathBuf,
    encoder: Encoder,
    prompt: PromptEncoder,
    decoder: MaskDecoder,
    mean: Tensor,
    std: Tensor,
}

impl Refiner {
    /// `spec`: a `.safetensors` file, a folder holding one, a hub repo id (its ViT-B file)
    /// or `owner/repo/file.safetensors`.
    pub fn load(spec: &str, device: &Device) -> Result<Self> {
        let file = locate(spec)?;
        crate::io::tensors::check(&file)?;
        let encoder_kind = kind(&file)?;
        // SAFETY: read-only mapping of a file magictailor does not write while loaded.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&file], DType::F32, device) }
            .map_err(|e| wrong(&file, &e.to_string()))?;
        Self::build(&vb, encoder_kind, file.clone()).map_err(|e| wrong(&file, &e.to_string()))
    }

    fn build(vb: &VarBuilder, kind: Kind, source: PathBuf) -> candle_core::Result<Self> {
        let grid = SIDE / PATCH;
        let encoder = match kind {
            Kind::Tiny => Encoder::Tiny(Box::new(tiny_vit_5m(vb.pp("image_encoder"))?)),
            Kind::Vit {
                dim,
                depth,
                heads,
                global,
            } => Encoder::Vit(Box::new(ImageEncoderViT::new(
                SIDE,
                PATCH,
                3,
                dim,
                depth,
                heads,
                PROMPT_DIM,
                true,
                true,
                true,
                14,
                &global,
                vb.pp("image_encoder"),
            )?)),
        };
        let dev = vb.device();
        Ok(Self {
            source,
            encoder,
            prompt: PromptEncoder::new(
                PROMPT_DIM,
                (grid, grid),
                (SIDE, SIDE),
                16,
                vb.pp("prompt_encoder"),
            )?,
            decoder: MaskDecoder::new(PROMPT_DIM, 3, 3, 256, vb.pp("mask_decoder"))?,
            mean: Tensor::new(&[123.675f32, 116.28, 103.53], dev)?.reshape((1, 3, 1, 1))?,
            std: Tensor::new(&[58.395f32, 57.12, 57.375], dev)?.reshape((1, 3, 1, 1))?,
        })
    }

    /// The refined mask of `m` on its crop `pixels` (`[3, R, R]` in [-1, 1]).
    pub fn refine(&self, pixels: &Tensor, m: &ImageMask) -> Result<Binary> {
        let (bbox, points) = prompts(&m.word, &m.map);
        let (proposals, scores) = self.proposals(pixels, bbox, &points)?;
        let word = match choose(&proposals, &scores, &m.word) {
            Some(i) => proposals[i].clone(),
            None => m.word.clone(),
        };
        Ok(match &m.exclude {
            Some(parts) => word.minus(parts),
            None => word,
        })
    }

    /// SAM's three proposals at the crop's size, and its predicted IoU for each. `bbox`
    /// is `[x0, y0, x1, y1]` and `points` `(x, y)`, in crop pixels.
    pub fn proposals(
        &self,
        pixels: &Tensor,
        bbox: [f32; 4],
        points: &[(f32, f32)],
    ) -> Result<(Vec<Binary>, Vec<f32>)> {
        let (_, res, _) = pixels.dims3()?;
        let dev = pixels.device();
        let scale = SIDE as f32 / res as f32;
        let image = ((pixels.to_dtype(DType::F32)?.unsqueeze(0)? + 1.0)? * 127.5)?
            .upsample_bilinear2d(SIDE, SIDE, false)?
            .broadcast_sub(&self.mean)?
            .broadcast_div(&self.std)?;
        let embedding = match &self.encoder {
            Encoder::Vit(e) => e.forward(&image)?,
            Encoder::Tiny(e) => e.forward(&image)?,
        };
        let xy: Vec<f32> = points
            .iter()
            .flat_map(|&(x, y)| [x * scale, y * scale])
            .collect();
        let coords = Tensor::from_vec(xy, (1, points.len(), 2), dev)?;
        let labels = Tensor::ones((1, points.len()), DType::F32, dev)?;
        let bbox = Tensor::from_vec(bbox.map(|v| v * scale).to_vec(), (1, 4), dev)?;
        let sparse = self.sparse_prompt(&coords, &labels, &bbox)?;
        let (_, dense) = self.prompt.forward(None, None, None)?;
        let pe = self.prompt.get_dense_pe()?;
        let (logits, iou) = self
            .decoder
            .forward(&embedding, &pe, &sparse, &dense, true)?;
        let logits = logits.upsample_bilinear2d(res, res, false)?.get(0)?;
        let scores = iou.flatten_all()?.to_vec1::<f32>()?;
        let mut out = Vec::with_capacity(scores.len());
        for k in 0..logits.dim(0)? {
            let v = logits.get(k)?.flatten_all()?.to_vec1::<f32>()?;
            out.push(Binary {
                width: res,
                height: res,
                bits: v.iter().map(|&l| l > 0.0).collect(),
            });
        }
        Ok((out, scores))
    }
}

impl Refiner {
    /// Points then the box's two corners, as SAM embeds them together. candle 0.11's
    /// `PromptEncoder::forward` fails on points plus a box (its box embedding comes out
    /// `[1, 512]`, not `[1, 2, 256]`), so each is embedded alone: the box reshaped, and
    /// the points without the padding token SAM adds only when there is no box.
    fn sparse_prompt(&self, coords: &Tensor, labels: &Tensor, bbox: &Tensor) -> Result<Tensor> {
        let n = coords.dim(1)?;
        let (points, _) = self.prompt.forward(Some((coords, labels)), None, None)?;
        let (corners, _) = self.prompt.forward(None, Some(bbox), None)?;
        let corners = corners.reshape((1, 2, PROMPT_DIM))?;
        Ok(Tensor::cat(&[&points.narrow(1, 0, n)?, &corners], 1)?)
    }
}

/// The box around `mask` and its strongest points of `map`, in crop pixels (centres).
pub fn prompts(mask: &Binary, map: &[f32]) -> ([f32; 4], Vec<(f32, f32)>) {
    let w = mask.width;
    let inside: Vec<usize> = (0..mask.bits.len()).filter(|&i| mask.bits[i]).collect();
    let (mut x0, mut y0, mut x1, mut y1) = (w, mask.height, 0, 0);
    for &i in &inside {
        let (x, y) = (i % w, i / w);
        (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1));
    }
    let mut ranked = inside;
    ranked.sort_by(|&a, &b| map[b].total_cmp(&map[a]));
    // Points at least an eighth of the crop apart, so two do not sit on one peak.
    let gap = (w / 8).max(1) as f32;
    let mut points: Vec<(f32, f32)> = Vec::with_capacity(POINTS);
    for i in ranked {
        let p = ((i % w) as f32 + 0.5, (i / w) as f32 + 0.5);
        let far = |q: &(f32, f32)| (q.0 - p.0).hypot(q.1 - p.1) >= gap;
        if points.iter().all(far) {
            points.push(p);
        }
        if points.len() == POINTS {
            break;
        }
    }
    ([x0 as f32, y0 as f32, x1 as f32, y1 as f32], points)
}

/// The best-scoring proposal that overlaps `attention`, if any.
pub fn choose(proposals: &[Binary], scores: &[f32], attention: &Binary) -> Option<usize> {
    (0..proposals.len())
        .filter(|&i| proposals[i].area() > 0 && proposals[i].iou(attention) >= MIN_OVERLAP)
        .max_by(|&a, &b| scores[a].total_cmp(&scores[b]))
}

enum Kind {
    Tiny,
    Vit {
        dim: usize,
        depth: usize,
        heads: usize,
        global: Vec<usize>,
    },
}

/// Which encoder the weights hold, from their names and the patch embedding's width.
fn kind(file: &Path) -> Result<Kind> {
    let header = crate::io::tensors::header(file)?;
    let width = header
        .get("image_encoder.patch_embed.proj.weight")
        .and_then(|t| t.get("shape"))
        .and_then(|s| s.get(0))
        .and_then(|d| d.as_u64());
    let vit = |dim, depth, heads, global: &[usize]| Kind::Vit {
        dim,
        depth,
        heads,
        global: global.to_vec(),
    };
    match width {
        Some(768) => Ok(vit(768, 12, 12, &[2, 5, 8, 11])),
        Some(1024) => Ok(vit(1024, 24, 16, &[5, 11, 17, 23])),
        Some(1280) => Ok(vit(1280, 32, 16, &[7, 15, 23, 31])),
        None if header
            .get("image_encoder.patch_embed.seq.0.c.weight")
            .is_some() =>
        {
            Ok(Kind::Tiny)
        }
        _ => Err(wrong(
            file,
            "it holds neither a SAM ViT-B/L/H nor a MobileSAM (TinyViT) image encoder",
        )),
    }
}

/// `--sam-model` as a local file.
fn locate(spec: &str) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        return single_safetensors(path);
    }
    if is_hub_id(spec) {
        return hub_file(spec, DEFAULT_FILE, "--sam-model");
    }
    if let Some((repo, file)) = spec.rsplit_once('/') {
        if is_hub_id(repo) && file.ends_with(".safetensors") {
            return hub_file(repo, file, "--sam-model");
        }
    }
    Err(Error::ModelNotFound(format!(
        "--sam-model {spec}: no such file or folder. Pass a SAM .safetensors file in candle's layout, \
         a folder holding one, or a hub id such as {DEFAULT_MODEL} (or {DEFAULT_MODEL}/mobile_sam-tiny-vitt.safetensors)."
    )))
}

fn single_safetensors(dir: &Path) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(crate::error::IoOp::List, dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::ModelNotFound(format!(
            "--sam-model {}: the folder holds no .safetensors file. SAM weights in candle's layout are \
             on the hub as {DEFAULT_MODEL}.",
            dir.display()
        ))),
        _ => Err(Error::usage(format!(
            "--sam-model {}: the folder holds several .safetensors files ({}); pass the one to use.",
            dir.display(),
            found
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn wrong(file: &Path, why: &str) -> Error {
    Error::bad_file(
        file,
        format!(
            "{} is not usable SAM weights ({why}). --sam-model takes SAM in candle's layout, e.g. {DEFAULT_MODEL}.",
            file.display()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(side: usize, x0: usize, y0: usize, len: usize) -> Binary {
        Binary {
            width: side,
            height: side,
            bits: (0..side * side)
                .map(|i| {
                    (x0..x0 + len).contains(&(i % side)) && (y0..y0 + len).contains(&(i / side))
                })
                .collect(),
        }
    }

    #[test]
    fn prompts_box_the_mask_and_pick_distinct_peaks_inside_it() {
        let m = square(16, 4, 2, 6);
        let mut map = vec![0f32; 256];
        map[0] = 9.0; // outside the mask: never a point
        map[3 * 16 + 5] = 5.0;
        map[3 * 16 + 6] = 4.0; // next to the first peak: too close
        map[7 * 16 + 9] = 3.0;
        let (bbox, points) = prompts(&m, &map);
        assert_eq!(bbox, [4.0, 2.0, 10.0, 8.0]);
        assert_eq!(points, [(5.5, 3.5), (9.5, 7.5)]);
    }

    #[test]
    fn choose_takes_the_best_overlapping_proposal() {
        let attention = square(16, 2, 2, 8);
        let far = square(16, 12, 12, 4);
        let near = square(16, 3, 3, 8);
        let empty = square(16, 0, 0, 0);
        assert_eq!(
            choose(
                &[far.clone(), near.clone(), empty.clone()],
                &[0.99, 0.5, 1.0],
                &attention
            ),
            Some(1)
        );
        assert_eq!(choose(&[far, empty], &[0.9, 0.9], &attention), None);
    }
}
