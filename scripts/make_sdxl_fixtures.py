#!/usr/bin/env python3
"""A tiny SDXL pipeline and what diffusers/transformers compute on it (run by hand).

    python scripts/make_sdxl_fixtures.py

Saves tests/fixtures/sdxl/tiny-sdxl/ in the diffusers layout (SDXL's shape at tiny size:
three levels, the first without attention, several transformer blocks a level, the
added time conditioning, two text encoders of which the second projects its pooled
output, an fp32-upcast VAE) and records into tests/fixtures/sdxl/parity.safetensors:
- each text encoder's penultimate hidden states (what SDXL conditions on), the second's
  projected pooled output at the end-of-text position;
- the U-Net's output for per-sample timesteps with `text_embeds` and `time_ids`;
- and `ddim_base.png`, 10 DDIM steps with guidance 7.5 from the recorded latents.
"""
import os
import shutil

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from make_parity_fixtures import jitter_, tiny_vocab

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "sdxl")
MODEL = os.path.join(ROOT, "tiny-sdxl")
TIME_DIM = 8


def text_config(vocab, act, projection):
    return CLIPTextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=77, hidden_act=act, layer_norm_eps=1e-5,
                          bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=0, projection_dim=projection)


def build():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16, 16), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4), cross_attention_dim=64,
        use_linear_projection=True, norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=6 * TIME_DIM + 24,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
        scaling_factor=0.13025, force_upcast=True,
    )
    tok_dir = os.path.join(ROOT, "_tok")
    vocab = tiny_vocab(tok_dir)
    files = (os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"))
    # SDXL's first tokenizer pads with end-of-text (CLIP-L), the second with "!" (OpenCLIP).
    tokenizer = CLIPTokenizer(*files, pad_token="<|endoftext|>", model_max_length=77)
    tokenizer_2 = CLIPTokenizer(*files, pad_token="!", model_max_length=77)
    text_encoder = CLIPTextModel(text_config(vocab, "quick_gelu", 32))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(vocab, "gelu", 24))
    for m in (unet, vae, text_encoder, text_encoder_2):
        jitter_(m)
        m.eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler)
    shutil.rmtree(MODEL, ignore_errors=True)
    pipe.save_pretrained(MODEL, safe_serialization=True)
    shutil.rmtree(tok_dir)
    return pipe


@torch.no_grad()
def main():
    torch.set_num_threads(2)
    os.makedirs(ROOT, exist_ok=True)
    pipe = build()
    g = torch.Generator().manual_seed(42)
    prompts = ["a photo of a dog", "", "the red cat, in snow"]
    out = {}
    for i, (tok, te) in enumerate([(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]):
        ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        o = te(ids, output_hidden_states=True)
        out[f"ids_{i + 1}"] = ids.to(torch.int64)
        out[f"penultimate_{i + 1}"] = o.hidden_states[-2]
        if i == 1:
            out["pooled_2"] = o.text_embeds
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    ctx = torch.cat([out["penultimate_1"], out["penultimate_2"]], -1)[:2]
    text_embeds = out["pooled_2"][:2]
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [96.0, 80, 8, 4, 64, 64]])
    out.update({"unet_x": x, "unet_t": t.to(torch.float32), "unet_ctx": ctx, "unet_text_embeds": text_embeds,
                "unet_time_ids": time_ids})
    out["unet_out"] = pipe.unet(x, t, encoder_hidden_states=ctx,
                                added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    # A 10-step DDIM image with guidance from fixed latents, as the SDXL pipeline draws it
    # (zero negative conditioning for the empty negative prompt, size ids from the image).
    lat = torch.randn(1, 4, 8, 8, generator=g)
    out["init_latents"] = lat
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a dog", latents=lat.clone(), num_inference_steps=10, guidance_scale=7.5, height=64,
                 width=64).images[0]
    image.save(os.path.join(ROOT, "ddim_base.png"))
    save_file({k: v.clone().contiguous() for k, v in out.items()}, os.path.join(ROOT, "parity.safetensors"))
    print("SDXL fixtures written to", os.path.abspath(ROOT))


if __name__ == "__main__":
    main()
