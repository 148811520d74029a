#!/usr/bin/env python3
"""The PyTorch side of `cargo bench` (run by hand): the same configs, batch and LoRA.

    python scripts/bench_pytorch.py          # 2 threads, like the Rust bench on this box

Prints seconds per U-Net forward+backward with peft LoRA (rank 32, MagicTailor targets,
batch 6) and per DDIM step (CFG, batch 2), tiny and mid-size configs, and peak RSS.
"""
import resource
import statistics
import time

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from peft import LoraConfig

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]
BASE = dict(layers_per_block=2, in_channels=4, out_channels=4, use_linear_projection=True,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
CONFIGS = {  # mirrors magictailor::tiny::{unet_config, mid_unet_config}
    "tiny": dict(block_out_channels=(16, 32, 32, 32), attention_head_dim=(2, 4, 4, 4), norm_num_groups=8,
                 cross_attention_dim=32, latent=16, reps=5),
    "mid": dict(block_out_channels=(80, 160, 320, 320), attention_head_dim=(5, 10, 20, 20), norm_num_groups=16,
                cross_attention_dim=256, latent=32, reps=3),
}


def timed(reps, f):
    f()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    torch.set_num_threads(2)
    torch.manual_seed(0)
    for name, c in CONFIGS.items():
        c = dict(c)
        latent, reps = c.pop("latent"), c.pop("reps")
        unet = UNet2DConditionModel(**BASE, **c)
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=TARGETS, init_lora_weights="gaussian"))
        d = c["cross_attention_dim"]
        x6, ctx6 = torch.randn(6, 4, latent, latent), torch.randn(6, 77, d)
        t6 = torch.tensor([10, 200, 400, 600, 800, 990])

        def train_step():
            loss = unet(x6, t6, encoder_hidden_states=ctx6).sample.pow(2).mean()
            loss.backward()
            unet.zero_grad(set_to_none=True)

        sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        sched.set_timesteps(50)
        x1, ctx2 = torch.randn(1, 4, latent, latent), torch.randn(2, 77, d)

        def ddim_step():
            with torch.no_grad():
                eps = unet(torch.cat([x1, x1]), torch.tensor([500, 500]), encoder_hidden_states=ctx2).sample
                u, cnd = eps.chunk(2)
                sched.step(u + 7.5 * (cnd - u), 501, x1)

        tr, st = timed(reps, train_step), timed(reps, ddim_step)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{name:>5} latent {latent}x{latent} ({latent * 8} px): U-Net fwd+bwd, LoRA r32, batch 6: {tr:.3f} s/step"
              f" | DDIM step, CFG batch 2: {st:.3f} s/step | peak RSS so far {rss:.0f} MB")


if __name__ == "__main__":
    main()
