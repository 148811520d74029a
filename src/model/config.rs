//! Component configs, read from the `config.json` files diffusers writes.
//!
//! Nothing about SD 2.1 is hard-coded: every size comes from these files, so tiny
//! random models of the same family load through the same code. Options we do not
//! implement are refused by `validate` with a message that names the key.

use serde::Deserialize;
use std::path::Path;

use crate::error::{Error, Result};

/// A value diffusers writes either as one number or as one number per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v[i.min(v.len() - 1)],
        }
    }
    fn len_ok(&self, n: usize) -> bool {
        match self {
            PerBlock::One(_) => true,
            PerBlock::Each(v) => v.len() == n,
        }
    }
}

fn one() -> PerBlock {
    PerBlock::One(1)
}
fn default_groups() -> usize {
    32
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_silu() -> String {
    "silu".into()
}
fn default_string(s: &str) -> String {
    s.to_string()
}

#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub layers_per_block: usize,
    /// Despite the name, diffusers uses this as the number of heads (a legacy quirk).
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "one")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default)]
    pub downsample_padding: Option<usize>,
    #[serde(default)]
    pub mid_block_scale_factor: Option<f64>,
    #[serde(default)]
    pub sample_size: Option<usize>,
    // Options we refuse when set to anything but the SD default.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Attention scores in f32 whatever the weights' precision (SD 2.x 768).
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// SDXL's `text_time`: the pooled text embedding and six size/crop numbers, projected
    /// and added to the timestep embedding.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// The sinusoidal width of each of the six numbers (SDXL: 256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// The pooled text width plus six times `addition_time_embed_dim` (SDXL: 2816).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    #[serde(default)]
    pub conv_in_kernel: Option<usize>,
    #[serde(default)]
    pub conv_out_kernel: Option<usize>,
}

impl UNetConfig {
    pub fn n_blocks(&self) -> usize {
        self.block_out_channels.len()
    }
    /// Heads of the attention in down block `i` (mid block: the last entry).
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(i)
    }
    /// Whether level `i` holds transformers: its down block, its up block (up blocks run
    /// in reverse) or, at the last level, the mid block.
    fn has_attention(&self, i: usize) -> bool {
        let n = self.n_blocks();
        i + 1 == n
            || self.down_block_types[i] == "CrossAttnDownBlock2D"
            || self.up_block_types[n - 1 - i] == "CrossAttnUpBlock2D"
    }
    pub fn transformer_layers(&self, i: usize) -> usize {
        self.transformer_layers_per_block.get(i)
    }

    pub fn validate(&self, file: &Path) -> Result<()> {
        let n = self.n_blocks();
        let bad = |what: String| Err(Error::unsupported(file, what));
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad("block_out_channels, down_block_types and up_block_types must have the same non-zero length".into());
        }
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim);
        if !heads.len_ok(n) || !self.transformer_layers_per_block.len_ok(n) {
            return bad("attention_head_dim / transformer_layers_per_block lists must have one entry per block".into());
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return bad(format!(
                    "down block type {t:?} (supported: CrossAttnDownBlock2D, DownBlock2D)"
                ));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return bad(format!(
                    "up block type {t:?} (supported: CrossAttnUpBlock2D, UpBlock2D)"
                ));
            }
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            // is_multiple_of(0) is false for c > 0: a zero count is refused, not divided by.
            if c == 0 || !c.is_multiple_of(self.norm_num_groups) {
                return bad(format!(
                    "norm_num_groups {} does not divide block_out_channels[{i}] = {c}",
                    self.norm_num_groups
                ));
            }
            // Only levels with attention split into heads: diffusers' own SD 1.x test
            // configs pair 8 heads with 4-channel blocks that have none.
            if self.has_attention(i) && !c.is_multiple_of(self.heads(i)) {
                return bad(format!(
                    "{} heads do not divide block_out_channels[{i}] = {c}",
                    self.heads(i)
                ));
            }
        }
        if self.act_fn != "silu" {
            return bad(format!("act_fn {:?} (only silu)", self.act_fn));
        }
        let only_cross = match &self.only_cross_attention {
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::Array(v) => v.iter().any(|x| x.as_bool() == Some(true)),
            _ => false,
        };
        let refusals = [
            (self.center_input_sample, "center_input_sample = true"),
            (self.dual_cross_attention, "dual_cross_attention = true"),
            (only_cross, "only_cross_attention = true"),
            (
                self.class_embed_type.is_some() || self.num_class_embeds.is_some(),
                "class embeddings",
            ),
            (
                self.addition_embed_type.as_deref().is_some_and(|t| t != "text_time")
                    || (self.addition_embed_type.is_some()
                        && (self.addition_time_embed_dim.is_none()
                            || self.projection_class_embeddings_input_dim.is_none())),
                "addition_embed_type other than SDXL's \"text_time\" (with addition_time_embed_dim and \
                 projection_class_embeddings_input_dim)",
            ),
            (self.encoder_hid_dim.is_some(), "encoder_hid_dim"),
            (self.time_cond_proj_dim.is_some(), "time_cond_proj_dim"),
            (
                self.resnet_time_scale_shift
                    .as_deref()
                    .is_some_and(|s| s != "default"),
                "resnet_time_scale_shift other than \"default\"",
            ),
            (
                self.time_embedding_type
                    .as_deref()
                    .is_some_and(|s| s != "positional"),
                "time_embedding_type other than \"positional\"",
            ),
            (
                self.mid_block_type
                    .as_deref()
                    .is_some_and(|s| s != "UNetMidBlock2DCrossAttn"),
                "mid_block_type other than UNetMidBlock2DCrossAttn",
            ),
            (
                self.conv_in_kernel.is_some_and(|k| k != 3)
                    || self.conv_out_kernel.is_some_and(|k| k != 3),
                "conv_in/out kernels other than 3",
            ),
            (
                self.downsample_padding.is_some_and(|p| p != 1),
                "downsample_padding other than 1",
            ),
            (
                self.mid_block_scale_factor.is_some_and(|s| s != 1.0),
                "mid_block_scale_factor other than 1",
            ),
        ];
        for (is_set, what) in refusals {
            if is_set {
                return bad(what.to_string());
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Decode in f32 whatever the model's precision (SDXL's pipeline reads it).
    #[serde(default = "default_true")]
    pub force_upcast: bool,
}

fn default_scaling() -> f64 {
    0.18215
}

impl VaeConfig {
    /// Pixels per latent cell along one side.
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }
    pub fn validate(&self, file: &Path) -> Result<()> {
        let bad = |what: String| Err(Error::unsupported(file, what));
        if self.block_out_channels.is_empty() {
            return bad("empty block_out_channels".into());
        }
        if self.act_fn != "silu" {
            return bad(format!("act_fn {:?} (only silu)", self.act_fn));
        }
        if self.shift_factor.is_some_and(|s| s != 0.0) {
            return bad("shift_factor (SD3/Flux VAEs)".into());
        }
        if self
            .block_out_channels
            .iter()
            .any(|&c| c == 0 || !c.is_multiple_of(self.norm_num_groups))
        {
            return bad(format!(
                "norm_num_groups {} does not divide every block width",
                self.norm_num_groups
            ));
        }
        let ok_down = |t: &String| t == "DownEncoderBlock2D";
        let ok_up = |t: &String| t == "UpDecoderBlock2D";
        if !self.down_block_types.iter().all(ok_down) || !self.up_block_types.iter().all(ok_up) {
            return bad("block types other than DownEncoderBlock2D / UpDecoderBlock2D".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "default_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub architectures: Vec<String>,
    /// `CLIPTextModelWithProjection`'s output width (SDXL's second encoder).
    #[serde(default)]
    pub projection_dim: usize,
}

fn default_quick_gelu() -> String {
    "quick_gelu".into()
}

impl ClipTextConfig {
    pub fn validate(&self, file: &Path) -> Result<()> {
        if !matches!(self.hidden_act.as_str(), "gelu" | "quick_gelu") {
            return Err(Error::unsupported(
                file,
                format!("hidden_act {:?} (gelu or quick_gelu)", self.hidden_act),
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::unsupported(
                file,
                "num_attention_heads does not divide hidden_size".into(),
            ));
        }
        if (self.architectures.iter()).any(|a| a.contains("WithProjection"))
            && self.projection_dim == 0
        {
            return Err(Error::unsupported(
                file,
                "a CLIPTextModelWithProjection without projection_dim".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "default_train_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    #[serde(default = "default_epsilon")]
    pub prediction_type: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "default_leading")]
    pub timestep_spacing: String,
    #[serde(default = "default_true")]
    pub set_alpha_to_one: bool,
    /// DDIMScheduler's default is true; SD's own configs set false.
    #[serde(default = "default_true")]
    pub clip_sample: bool,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
}

fn default_train_steps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    default_string("linear")
}
fn default_epsilon() -> String {
    default_string("epsilon")
}
fn default_leading() -> String {
    default_string("leading")
}

impl SchedulerConfig {
    pub fn validate(&self, file: &Path) -> Result<()> {
        let bad = |what: String| Err(Error::unsupported(file, what));
        if !matches!(self.prediction_type.as_str(), "epsilon" | "v_prediction") {
            return bad(format!(
                "prediction_type {:?}: magictailor implements epsilon and v_prediction",
                self.prediction_type
            ));
        }
        if !matches!(self.beta_schedule.as_str(), "linear" | "scaled_linear") {
            return bad(format!(
                "beta_schedule {:?} (linear or scaled_linear)",
                self.beta_schedule
            ));
        }
        if !matches!(
            self.timestep_spacing.as_str(),
            "leading" | "trailing" | "linspace"
        ) {
            return bad(format!("timestep_spacing {:?}", self.timestep_spacing));
        }
        if self.rescale_betas_zero_snr {
            return bad(
                "rescale_betas_zero_snr (zero terminal SNR schedules) is not implemented".into(),
            );
        }
        if self.thresholding || self.trained_betas.is_some() {
            return bad("thresholding or trained_betas".into());
        }
        Ok(())
    }
}

/// Reads and parses one JSON config, naming the file on failure.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::read(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unet(channels: &str, down: &str, up: &str, heads: usize) -> UNetConfig {
        serde_json::from_str(&format!(
            r#"{{"in_channels": 4, "out_channels": 4, "layers_per_block": 1,
                "cross_attention_dim": 32, "norm_num_groups": 2, "attention_head_dim": {heads},
                "block_out_channels": {channels}, "down_block_types": {down},
                "up_block_types": {up}}}"#
        ))
        .unwrap()
    }

    #[test]
    fn heads_need_to_divide_only_levels_with_attention() {
        let file = Path::new("unet/config.json");
        // diffusers' SD 1.x test U-Net: 8 heads, a 4-channel level without attention.
        let (down, up) = (
            r#"["DownBlock2D", "CrossAttnDownBlock2D"]"#,
            r#"["CrossAttnUpBlock2D", "UpBlock2D"]"#,
        );
        unet("[4, 8]", down, up, 8).validate(file).unwrap();
        // The same level with attention in its up block is refused, naming the level.
        let up_attn = r#"["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]"#;
        let e = unet("[4, 8]", down, up_attn, 8).validate(file).unwrap_err();
        assert!(e.to_string().contains("block_out_channels[0] = 4"), "{e}");
        // The last level always has attention: the mid block's.
        let no_attn = r#"["DownBlock2D", "DownBlock2D"]"#;
        let up_none = r#"["UpBlock2D", "UpBlock2D"]"#;
        let e = unet("[8, 4]", no_attn, up_none, 8)
            .validate(file)
            .unwrap_err();
        assert!(e.to_string().contains("block_out_channels[1] = 4"), "{e}");
    }
}
