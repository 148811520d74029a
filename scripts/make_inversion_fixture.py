#!/usr/bin/env python3
"""DDIM inversion on the tiny SD 2.x fixture model, as diffusers computes it (run by hand).

    python scripts/make_inversion_fixture.py

Writes tests/fixtures/ddim_inversion.safetensors: a clean latent, its inversion over 10
steps with `DDIMInverseScheduler.from_config(pipe.scheduler.config)` on "a photo of a dog"
(no guidance, as DiffEdit's `invert` defaults to; and with guidance 3), and the latent
DDIM sampling gives back from it over the same 10 steps (the reconstruction whose error
the Rust test states).
"""
import os

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
STEPS = 10
PROMPT = "a photo of a dog"


def eps(unet, x, t, cond, uncond, guidance):
    """The noise prediction, with classifier-free guidance when guidance > 1."""
    if guidance <= 1:
        return unet(x, t, encoder_hidden_states=cond).sample
    both = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
    u, c = both.chunk(2)
    return u + guidance * (c - u)


@torch.no_grad()
def main():
    torch.set_num_threads(2)
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(ROOT, "tiny-sd"), safety_checker=None)
    unet = pipe.unet
    ids = pipe.tokenizer([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    cond, uncond = pipe.text_encoder(ids)[0].chunk(2)
    g = torch.Generator().manual_seed(3)
    z0 = torch.randn(1, 4, 8, 8, generator=g) * 0.5
    out = {"z0": z0}
    for guidance in (1.0, 3.0):
        inverse = DDIMInverseScheduler.from_config(pipe.scheduler.config)
        inverse.set_timesteps(STEPS)
        x = z0.clone()
        for t in inverse.timesteps:
            x = inverse.step(eps(unet, x, t, cond, uncond, guidance), t, x).prev_sample
        forward = DDIMScheduler.from_config(pipe.scheduler.config)
        forward.set_timesteps(STEPS)
        y = x.clone()
        for t in forward.timesteps:
            y = forward.step(eps(unet, y, t, cond, uncond, guidance), t, y).prev_sample
        tag = f"g{guidance:g}"
        out[f"inverted_{tag}"] = x
        out[f"reconstructed_{tag}"] = y
        err = (y - z0).abs().max().item()
        print(f"guidance {guidance:g}: inverted to t={int(inverse.timesteps[-1])}; "
              f"DDIM gives z0 back within {err:.3g} (|z0| up to {z0.abs().max().item():.3g})")
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(ROOT, "ddim_inversion.safetensors"))


if __name__ == "__main__":
    main()
