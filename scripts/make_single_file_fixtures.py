#!/usr/bin/env python3
"""Single-file checkpoints of the tiny fixture models, written by diffusers' own conversion
script (run by hand, not by CI).

    python scripts/make_single_file_fixtures.py PATH/TO/convert_diffusers_to_original_stable_diffusion.py

The script is diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py` (not
part of the pip package: take it from a diffusers checkout; the commit used is in
tests/fixtures/VERSIONS.txt). For each family's tiny model (tests/fixtures/[sd1/]tiny-sd,
from make_parity_fixtures.py) this writes `single.safetensors` next to it in the original
Stable Diffusion layout (`model.diffusion_model.*`, `first_stage_model.*`,
`cond_stage_model.*`), and for SD 1.x also an fp16 copy, as `--half` writes it. The tiny
SD 2.x text encoder has 2 layers, so the script's depth test would take it for SD 1.x: its
OpenCLIP conversion (fused `in_proj`) is applied by hand, as the script does for SD 2.x.

Each file is then loaded back with diffusers' `from_single_file` (the tiny folder as its
config) and every tensor compared with the folder's: the check that the files are what
A1111/ComfyUI checkpoints look like, not a layout of our own.
"""
import importlib.util
import os
import sys

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
FAMILIES = {"sd2": ROOT, "sd1": os.path.join(ROOT, "sd1")}


def load_converter(path):
    spec = importlib.util.spec_from_file_location("convert_sd", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def convert(conv, model, open_clip):
    """The script's `__main__`, as functions: prefixes and all."""
    unet = conv.convert_unet_state_dict(load_file(os.path.join(model, "unet", "diffusion_pytorch_model.safetensors")))
    vae = conv.convert_vae_state_dict(load_file(os.path.join(model, "vae", "diffusion_pytorch_model.safetensors")))
    # transformers 5 saves CLIPTextModel without its `text_model.` wrapper; the hub's SD
    # repos, the script and every single file have it.
    text = load_file(os.path.join(model, "text_encoder", "model.safetensors"))
    text = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text.items()}
    if open_clip:
        text = conv.convert_text_enc_state_dict_v20({"transformer." + k: v for k, v in text.items()})
        text = {"cond_stage_model.model." + k: v for k, v in text.items()}
    else:
        text = {"cond_stage_model.transformer." + k: v for k, v in conv.convert_text_enc_state_dict(text).items()}
    out = {"model.diffusion_model." + k: v for k, v in unet.items()}
    out.update({"first_stage_model." + k: v for k, v in vae.items()})
    out.update(text)
    return {k: v.contiguous() for k, v in out.items()}


def same_as_folder(path, model, dtype):
    """diffusers reads the file back into the folder's modules, tensor for tensor."""
    pipe = StableDiffusionPipeline.from_single_file(path, config=model, safety_checker=None, torch_dtype=dtype)
    folder = {
        "unet": UNet2DConditionModel.from_pretrained(model, subfolder="unet"),
        "vae": AutoencoderKL.from_pretrained(model, subfolder="vae"),
        "text_encoder": CLIPTextModel.from_pretrained(model, subfolder="text_encoder"),
    }
    worst = 0.0
    for name, module in folder.items():
        want = module.state_dict()
        got = getattr(pipe, name).state_dict()
        for k, v in want.items():
            if k.endswith("position_ids"):
                continue
            worst = max(worst, (got[k].float() - v.to(dtype).float()).abs().max().item())
    return worst


def main(script):
    conv = load_converter(script)
    for family, root in FAMILIES.items():
        model = os.path.join(root, "tiny-sd")
        state = convert(conv, model, open_clip=family == "sd2")
        files = {"single.safetensors": (state, torch.float32)}
        if family == "sd1":
            files["single_fp16.safetensors"] = ({k: v.half() for k, v in state.items()}, torch.float16)
        for name, (tensors, dtype) in files.items():
            path = os.path.join(root, name)
            save_file(tensors, path)
            worst = same_as_folder(path, model, dtype)
            print(f"{family} {name}: {len(tensors)} tensors; diffusers' from_single_file reads the folder's "
                  f"weights back within {worst}")
            assert worst == 0.0, path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
