//! CLIP text encoder (transformers' `CLIPTextModel`), taking token ids plus the embedding
//! rows of added pseudo-words, so those rows can be trained while the table stays frozen.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::ClipTextConfig;
use super::nn::{softmax_last, Ctx, LayerNorm, Linear};

#[derive(Debug, Clone)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

#[derive(Debug, Clone)]
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// `[projection, hidden]`: `CLIPTextModelWithProjection`'s (SDXL's second encoder).
    text_projection: Option<Tensor>,
    /// `[1, 1, positions, positions]` additive mask, made once on the model's device.
    causal_mask: Tensor,
}

/// Every layer's output (`hidden[0]` the embeddings', as transformers' `hidden_states`)
/// and the last after the final LayerNorm.
pub struct TextStates {
    pub hidden: Vec<Tensor>,
    pub last: Tensor,
}

impl TextStates {
    /// The second-to-last layer's output, without the final LayerNorm: what SDXL
    /// conditions on.
    pub fn penultimate(&self) -> &Tensor {
        &self.hidden[self.hidden.len().saturating_sub(2)]
    }
}

impl EncoderLayer {
    fn load(vb: &VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let (d, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let attn = vb.pp("self_attn");
        Ok(Self {
            layer_norm1: LayerNorm::load(&vb.pp("layer_norm1"), d, eps)?,
            q_proj: Linear::load(&attn.pp("q_proj"), d, d, true)?,
            k_proj: Linear::load(&attn.pp("k_proj"), d, d, true)?,
            v_proj: Linear::load(&attn.pp("v_proj"), d, d, true)?,
            out_proj: Linear::load(&attn.pp("out_proj"), d, d, true)?,
            layer_norm2: LayerNorm::load(&vb.pp("layer_norm2"), d, eps)?,
            fc1: Linear::load(&vb.pp("mlp").pp("fc1"), d, i, true)?,
            fc2: Linear::load(&vb.pp("mlp").pp("fc2"), i, d, true)?,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, cfg: &ClipTextConfig) -> Result<Tensor> {
        let ctx = Ctx::default();
        let (b, n, d) = x.dims3()?;
        let heads = cfg.num_attention_heads;
        let split = |t: Tensor| {
            t.reshape((b, n, heads, d / heads))?
                .transpose(1, 2)?
                .contiguous()
        };
        let h = self.layer_norm1.forward(x)?;
        let scale = 1.0 / ((d / heads) as f64).sqrt();
        let q = split((self.q_proj.forward(&h, ctx)? * scale)?)?;
        let k = split(self.k_proj.forward(&h, ctx)?)?;
        let v = split(self.v_proj.forward(&h, ctx)?)?;
        let probs = softmax_last(&q.matmul(&k.t()?)?.broadcast_add(mask)?)?;
        let a = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        let x = (self.out_proj.forward(&a, ctx)? + x)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?, ctx)?;
        let h = match cfg.hidden_act.as_str() {
            "gelu" => h.gelu_erf()?,
            _ => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?, // quick_gelu
        };
        self.fc2.forward(&h, ctx)? + x
    }
}

impl ClipTextModel {
    pub fn load(vb: &VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        // `CLIPTextModelWithProjection` (SDXL's second encoder) projects its pooled output.
        let with_projection = (cfg.architectures.iter()).any(|a| a.contains("WithProjection"));
        let text_projection = match with_projection {
            true => Some(vb.get(
                (cfg.projection_dim, cfg.hidden_size),
                "text_projection.weight",
            )?),
            false => None,
        };
        // transformers < 5 saves under `text_model.`; transformers 5 saves without it.
        let vb = if vb.contains_tensor("embeddings.token_embedding.weight") {
            vb.clone()
        } else {
            vb.pp("text_model")
        };
        let emb = vb.pp("embeddings");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::load(&vb.pp("encoder").pp("layers").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: cfg.clone(),
            token_embedding: emb
                .pp("token_embedding")
                .get((cfg.vocab_size, cfg.hidden_size), "weight")?,
            position_embedding: emb
                .pp("position_embedding")
                .get((cfg.max_position_embeddings, cfg.hidden_size), "weight")?,
            layers,
            final_layer_norm: LayerNorm::load(
                &vb.pp("final_layer_norm"),
                cfg.hidden_size,
                cfg.layer_norm_eps,
            )?,
            text_projection,
            causal_mask: causal_mask(cfg.max_position_embeddings, DType::F32, vb.device())?,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    pub fn device(&self) -> &Device {
        self.token_embedding.device()
    }

    /// The frozen token-embedding table `[vocab, hidden]`.
    pub fn token_table(&self) -> &Tensor {
        &self.token_embedding
    }

    /// The frozen embedding row of one token id (initializes a pseudo-word).
    pub fn token_row(&self, id: u32) -> Result<Tensor> {
        self.token_embedding.get(id as usize)
    }

    /// Embeds ids `[b, n]`: ids below the vocabulary size read the frozen table, id
    /// `vocab + k` reads row k of `extra` (`[k_max, hidden]`), which may be trainable.
    pub fn embed(&self, ids: &Tensor, extra: Option<&Tensor>) -> Result<Tensor> {
        self.embed_with_table(ids, &self.token_embedding, extra)
    }

    /// `embed` reading the base vocabulary from `table` (a trainable copy of the frozen
    /// table, for reproducing the released script, which optimizes all of it).
    pub fn embed_with_table(
        &self,
        ids: &Tensor,
        table: &Tensor,
        extra: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, n) = ids.dims2()?;
        let vocab = self.vocab_size() as u32;
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        let ids_host = flat.to_vec1::<u32>()?;
        let needs_extra = ids_host.iter().any(|&i| i >= vocab);
        let base_ids: Vec<u32> = ids_host
            .iter()
            .map(|&i| if i >= vocab { 0 } else { i })
            .collect();
        let base_ids = Tensor::from_vec(base_ids, b * n, ids.device())?;
        let base = table.index_select(&base_ids, 0)?;
        let emb = match (needs_extra, extra) {
            (false, _) => base,
            (true, None) => candle_core::bail!(
                "token id >= vocabulary size but no added-token embeddings were given"
            ),
            (true, Some(extra)) => {
                let k = extra.dim(0)? as u32;
                if let Some(bad) = ids_host.iter().find(|&&i| i >= vocab + k) {
                    candle_core::bail!(
                        "token id {bad} has no embedding (vocabulary {vocab} + {k} added)"
                    );
                }
                let extra_ids: Vec<u32> = ids_host
                    .iter()
                    .map(|&i| i.saturating_sub(vocab).min(k - 1))
                    .collect();
                let extra_ids = Tensor::from_vec(extra_ids, b * n, ids.device())?;
                let picked = extra.to_dtype(base.dtype())?.index_select(&extra_ids, 0)?;
                let is_extra: Vec<u8> = ids_host.iter().map(|&i| u8::from(i >= vocab)).collect();
                let is_extra = Tensor::from_vec(is_extra, (b * n, 1), ids.device())?;
                is_extra
                    .broadcast_as(base.shape())?
                    .where_cond(&picked, &base)?
            }
        };
        emb.reshape((b, n, self.config.hidden_size))
    }

    /// The last hidden state after the final LayerNorm, which SD conditions on.
    pub fn forward(&self, ids: &Tensor, extra: Option<&Tensor>) -> Result<Tensor> {
        self.forward_with_table(ids, None, extra)
    }

    /// `forward` with an optional replacement of the token-embedding table.
    pub fn forward_with_table(
        &self,
        ids: &Tensor,
        table: Option<&Tensor>,
        extra: Option<&Tensor>,
    ) -> Result<Tensor> {
        Ok(self.forward_states(ids, table, extra)?.last)
    }

    /// The projected pooled output `[b, projection]`: the final hidden state (`last`) at
    /// each row's first end-of-text token, found by position (pseudo-words have larger
    /// ids than end-of-text, so transformers' `argmax` would find them).
    pub fn pooled(&self, last: &Tensor, ids: &Tensor, eos_id: u32) -> Result<Tensor> {
        let Some(projection) = &self.text_projection else {
            candle_core::bail!("this text encoder has no text_projection (not SDXL's second)");
        };
        let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let mut picked = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let at = row
                .iter()
                .position(|&id| id == eos_id)
                .unwrap_or(row.len() - 1);
            picked.push(last.get(i)?.get(at)?);
        }
        Tensor::stack(&picked, 0)?.matmul(&projection.t()?)
    }

    /// Every layer's output and the final one after the LayerNorm ([`TextStates`]).
    pub fn forward_states(
        &self,
        ids: &Tensor,
        table: Option<&Tensor>,
        extra: Option<&Tensor>,
    ) -> Result<TextStates> {
        let _p = crate::profile::scope(crate::profile::Kind::TextEncoder, ids.device());
        let (_, n) = ids.dims2()?;
        if n > self.config.max_position_embeddings {
            candle_core::bail!(
                "{n} tokens exceed the text encoder's {} positions",
                self.config.max_position_embeddings
            );
        }
        // A trainable f32 table (released-script mode) meets half-precision weights here.
        let x = self
            .embed_with_table(ids, table.unwrap_or(&self.token_embedding), extra)?
            .to_dtype(self.position_embedding.dtype())?;
        let pos = self.position_embedding.narrow(0, 0, n)?.unsqueeze(0)?;
        let mut x = x.broadcast_add(&pos)?;
        let mask = self
            .causal_mask
            .narrow(2, 0, n)?
            .narrow(3, 0, n)?
            .to_dtype(x.dtype())?;
        let mut hidden = vec![x.clone()];
        for layer in &self.layers {
            x = layer.forward(&x, &mask, &self.config)?;
            hidden.push(x.clone());
        }
        let last = self.final_layer_norm.forward(&x)?;
        Ok(TextStates { hidden, last })
    }
}

fn causal_mask(n: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (1, 1, n, n), device)?.to_dtype(dtype)
}
