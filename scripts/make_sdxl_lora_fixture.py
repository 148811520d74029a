#!/usr/bin/env python3
"""An SDXL LoRA in kohya's naming on the tiny SDXL pipeline and what diffusers draws with it (run by hand).

    python scripts/make_sdxl_lora_fixture.py      # after make_sdxl_fixtures.py

Adds a peft LoRA (r 4, alpha 8) to the tiny SDXL U-Net's attention layers (to_q/k/v,
to_out.0, proj_in, proj_out, ff.net.2) with seeded random A and B, and writes it to
tests/fixtures/sdxl/lora_kohya_sdxl.safetensors in the names kohya sd-scripts writes for
SDXL, which follow the original SGM/LDM U-Net layout:

    down_blocks.L.attentions.j.REST -> input_blocks.{1 + L*(layers_per_block+1) + j}.1.REST
    mid_block.attentions.0.REST     -> middle_block.1.REST
    up_blocks.L.attentions.j.REST   -> output_blocks.{L*(layers_per_block+1) + j}.1.REST

key `lora_unet_` + that path with '.' -> '_', tensors `.lora_down.weight` (A),
`.lora_up.weight` (B), `.alpha` (8.0). Then loads the file into a fresh pipeline with
diffusers' own kohya converter (`load_lora_weights`), checks that it maps every module and
draws the same image as the peft-adapted U-Net, and saves that image as `ddim_lora_kohya.png`
("a photo of a dog", 10 DDIM steps with guidance 7.5 from the parity latents).
"""
import os
import re

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "sdxl")
MODEL = os.path.join(ROOT, "tiny-sdxl")
OUT = os.path.join(ROOT, "lora_kohya_sdxl.safetensors")
PROMPT = "a photo of a dog"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]
RANK, ALPHA = 4, 8
RUN = dict(num_inference_steps=10, guidance_scale=7.5, height=64, width=64, output_type="np")


def sgm_path(path, config):
    """A diffusers U-Net module path -> the SGM/LDM path kohya names SDXL modules by."""
    per = config.layers_per_block + 1
    m = re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path)
    if m:
        assert config.down_block_types[int(m[1])].startswith("CrossAttn"), path
        return f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", path)
    if m:
        assert config.up_block_types[int(m[1])].startswith("CrossAttn"), path
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
    m = re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path)
    if m:
        return f"middle_block.1.{m[1]}"
    raise ValueError(f"no SGM name for {path}")


def lora_modules(unet):
    return {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}


def draw(pipe, lat):
    return np.round(pipe(PROMPT, latents=lat.clone(), **RUN).images[0] * 255).astype(np.int16)


def main():
    torch.set_num_threads(2)
    lat = load_file(os.path.join(ROOT, "parity.safetensors"))["init_latents"]

    # 1. The plain pipeline, then the same U-Net with a peft LoRA that does something.
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    plain = draw(pipe, lat)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                     init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(11)
    mods = lora_modules(pipe.unet)
    with torch.no_grad():
        for name in sorted(mods):
            a, b = mods[name].lora_A["default"].weight, mods[name].lora_B["default"].weight
            a.copy_(torch.randn(a.shape, generator=g) / RANK)  # peft's "gaussian" init, seeded here
            b.copy_(0.05 * torch.randn(b.shape, generator=g))

    # 2. The adapter in kohya's SDXL (SGM) names.
    kohya = {}
    for name in sorted(mods):
        m = mods[name]
        assert isinstance(m.base_layer, torch.nn.Linear), f"{name} is {type(m.base_layer).__name__}"
        key = "lora_unet_" + sgm_path(name, pipe.unet.config).replace(".", "_")
        kohya[f"{key}.lora_down.weight"] = m.lora_A["default"].weight.detach().clone().contiguous()
        kohya[f"{key}.lora_up.weight"] = m.lora_B["default"].weight.detach().clone().contiguous()
        kohya[f"{key}.alpha"] = torch.tensor(float(ALPHA))
    save_file(kohya, OUT)
    written = len(mods)

    # 3. Diffusers' own kohya converter reads it back into a fresh pipeline: same modules, same map.
    pipe2 = StableDiffusionXLPipeline.from_pretrained(MODEL)
    pipe2.set_progress_bar_config(disable=True)
    pipe2.load_lora_weights(OUT)
    loaded = lora_modules(pipe2.unet)
    te_loaded = sum(len(lora_modules(te)) for te in (pipe2.text_encoder, pipe2.text_encoder_2))
    assert sorted(loaded) == sorted(mods) and te_loaded == 0, (sorted(set(mods) ^ set(loaded)), te_loaded)
    worst = 0.0
    for name, m in mods.items():
        m2 = loaded[name]
        (ad,) = m2.lora_A.keys()
        d1 = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
        d2 = m2.scaling[ad] * m2.lora_B[ad].weight @ m2.lora_A[ad].weight
        worst = max(worst, (d1 - d2).abs().max().item())
    assert worst < 1e-6, worst

    peft_img, kohya_img = draw(pipe, lat), draw(pipe2, lat)
    diff = int(np.abs(peft_img - kohya_img).max())
    vs_plain = int(np.abs(kohya_img - plain).max())
    assert diff <= 1, diff
    assert vs_plain > 8, vs_plain
    StableDiffusionXLPipeline.numpy_to_pil(kohya_img.astype(np.float32) / 255)[0].save(
        os.path.join(ROOT, "ddim_lora_kohya.png"))
    print(f"modules written {written} ({len(kohya)} keys), diffusers loaded {len(loaded)} "
          f"(text encoders {te_loaded}), max |delta W| gap {worst:.1e}, peft vs kohya draw max level diff {diff}, "
          f"LoRA vs plain max level diff {vs_plain}")


if __name__ == "__main__":
    main()
