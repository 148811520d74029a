#!/usr/bin/env python3
"""An SDXL embedding on the tiny SDXL pipeline and what diffusers draws with it (run by hand).

    python scripts/make_sdxl_embeds_fixture.py      # after make_sdxl_fixtures.py

Saves tests/fixtures/sdxl/v0.safetensors, an SDXL embedding as diffusers and A1111 store
one (`clip_l: [1, 32]`, `clip_g: [1, 32]`, the word named by the file: `<v0>`), loads it
into both text encoders with `load_textual_inversion`, and records into
tests/fixtures/sdxl/embeds_parity.safetensors the prompt embeddings (both encoders'
penultimate states side by side) and the pooled projection of "a photo of <v0>, in snow",
and `ddim_embeds.png`, 10 DDIM steps with guidance 7.5 from the parity latents.
"""
import os

import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "sdxl")
MODEL = os.path.join(ROOT, "tiny-sdxl")
PROMPT = "a photo of <v0>, in snow"


def main():
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(7)
    emb = {"clip_l": torch.randn(1, 32, generator=g), "clip_g": torch.randn(1, 32, generator=g)}
    save_file(emb, os.path.join(ROOT, "v0.safetensors"))
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(emb["clip_l"], token="<v0>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(emb["clip_g"], token="<v0>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    lat = load_file(os.path.join(ROOT, "parity.safetensors"))["init_latents"]
    image = pipe(PROMPT, latents=lat.clone(), num_inference_steps=10, guidance_scale=7.5, height=64,
                 width=64).images[0]
    image.save(os.path.join(ROOT, "ddim_embeds.png"))
    save_file({"prompt_embeds": embeds.contiguous(), "pooled": pooled.contiguous()},
              os.path.join(ROOT, "embeds_parity.safetensors"))
    print("SDXL embedding fixtures written to", os.path.abspath(ROOT))


if __name__ == "__main__":
    main()
