#!/usr/bin/env python3
"""The PyTorch side of `cargo bench` (run by hand), on the same models and pair folder.

    MAGICTAILOR_BENCH_DIR=/tmp/mtb cargo bench      # writes tiny/, mid/, the pair; keeps them
    python scripts/bench_pytorch.py /tmp/mtb        # 2 threads, like the Rust bench here
    python scripts/bench_pytorch.py /tmp/mtb mid    # one config

Rows, as in benches/model.rs (peak RSS is per row: the high-water mark is reset before
each):
- U-Net forward+backward with peft LoRA (rank 32, MagicTailor's targets, batch 6) and a
  DDIM step (CFG, batch 2);
- a MagicTailor training step with 3+3 images, warm-up and DS-Bal: colour jitter + flip,
  DM-Deg noise, VAE encode, text encoder with two trainable pseudo-word rows, U-Net with
  LoRA recording the cross-attention maps the attention loss reads, masked diffusion
  loss, attention loss, (DS-Bal: momentum forward through a second peft adapter without
  grad, L_pres), backward, grad clipping, AdamW, EMA of the momentum adapter.

This is PyTorch used well (SDPA attention, no second U-Net copy), not the released
script verbatim, so the ratio compares implementations of the same computation.
"""
import math
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from peft import LoraConfig
from PIL import Image
from transformers import CLIPTextModel

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]
CONFIGS = {"tiny": dict(resolution=128, reps=5), "mid": dict(resolution=256, reps=3)}


def timed(reps, f):
    f()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def peak_rss_mb():
    """This process's peak resident memory since the last `reset_peak()`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak():
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def lora(unet, name):
    unet.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=TARGETS, init_lora_weights="gaussian"),
                     adapter_name=name)


def bench_unet(name, unet, latent, reps):
    d = unet.config.cross_attention_dim
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
    print(f"{name:>5} latent {latent}x{latent} ({latent * 8} px): U-Net fwd+bwd, LoRA r32, batch 6: {tr:.3f} s/step"
          f" | DDIM step, CFG batch 2: {st:.3f} s/step | peak RSS {peak_rss_mb():.0f} MB")


class ProbeProcessor:
    """Cross-attention with explicit probabilities, recording their head mean."""

    def __init__(self, sink):
        self.sink = sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k)
        b = hidden_states.shape[0]
        self.sink.append(probs.view(b, -1, *probs.shape[1:]).mean(1))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def load_pair(pair, res):
    imgs, masks = [], []
    for p in sorted(pair.glob("*.png")):
        img = Image.open(p).convert("RGB").resize((res, res), Image.BILINEAR)
        m = Image.open(pair / "masks" / p.name).convert("L").resize((res, res), Image.NEAREST)
        imgs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1)
        masks.append(torch.from_numpy((np.array(m) >= 128).astype(np.float32))[None])
    return torch.stack(imgs), torch.stack(masks)


def bench_magictailor(name, model, pair, res, reps, steps=500, warmup=200):
    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    vae = AutoencoderKL.from_pretrained(model / "vae")
    te = CLIPTextModel.from_pretrained(model / "text_encoder")
    for m in (unet, vae, te):
        m.requires_grad_(False)
    lora(unet, "default")
    lora(unet, "momentum")
    unet.set_adapter("default")
    online = {n: p for n, p in unet.named_parameters() if ".default." in n}
    for p in online.values():
        p.requires_grad_(True)
    momentum = {n.replace(".default.", ".momentum."): p for n, p in online.items()}
    momentum = {n: dict(unet.named_parameters())[n] for n in momentum}

    # Two pseudo-words as trainable rows appended to the frozen token table.
    text = getattr(te, "text_model", te)  # transformers < 5 nests the modules one deeper
    table = text.embeddings.token_embedding
    rows = torch.nn.Parameter(table.weight[:2].detach().clone())

    class Table(torch.nn.Module):
        def forward(self, ids):
            return F.embedding(ids, torch.cat([table.weight, rows]))

    text.embeddings.token_embedding = Table()
    vocab = table.weight.shape[0]
    ids = torch.randint(0, vocab, (6, 77))
    token_pos = [5] * 6
    ids[:3, 5], ids[3:, 5] = vocab, vocab + 1

    latent = res // 8
    side = max(latent // 4, 1)
    maps = []
    procs = {}
    for n, proc in unet.attn_processors.items():
        is_probe = "attn2" in n and not n.startswith("mid_block")
        procs[n] = ProbeProcessor(maps) if is_probe else AttnProcessor2_0()
    unet.set_attn_processor(procs)

    pixels, masks = load_pair(pair, res)
    sample_of = torch.tensor([0, 0, 0, 1, 1, 1])
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    params = list(online.values()) + [rows]
    opt = torch.optim.AdamW(params, lr=4e-4, weight_decay=0.01)
    state = {"d": 0}

    def per_sample(per_image):
        return torch.stack([per_image[sample_of == s].mean() for s in range(2)])

    def step(dsbal):
        state["d"] += 1
        b = pixels.shape[0]
        f = lambda: (0.9 + 0.2 * torch.rand(b, 1, 1, 1))
        x = pixels * f()
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * f() + mean
        gray = x.mean(dim=1, keepdim=True)
        x = (x - gray) * f() + gray
        m = masks
        if torch.rand(()) < 0.5:
            x, m = x.flip(-1), m.flip(-1)
        alpha = 0.5 * (1 - state["d"] / steps) ** 2
        x = x + alpha * torch.randn_like(x) * (1 - m)
        with torch.no_grad():
            z0 = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
        t = torch.randint(0, 1000, (b,))
        eps = torch.randn_like(z0)
        z_t = ddpm.add_noise(z0, eps, t)
        m_lat = F.interpolate(m, size=(latent, latent), mode="nearest")
        ctx = te(ids).last_hidden_state
        maps.clear()
        pred = unet(z_t, t, encoder_hidden_states=ctx).sample
        per_image = ((pred - eps) * m_lat).pow(2).flatten(1).mean(1)
        ps = per_sample(per_image)
        own = [mp[torch.arange(b), :, token_pos] for mp in maps if mp.shape[1] == side * side]
        own = torch.stack(own).mean(0)
        m_small = F.interpolate(m, size=(side, side), mode="nearest").flatten(1)
        own = own / own.amax(dim=1, keepdim=True).clamp_min(1e-8)
        l_attn = (own - m_small).pow(2).mean()
        if dsbal:
            chosen = int(ps.argmax())
            unet.set_adapter("momentum")
            with torch.no_grad():
                mpred = unet(z_t, t, encoder_hidden_states=ctx.detach()).sample
            unet.set_adapter("default")
            for p in online.values():
                p.requires_grad_(True)
            pres = per_sample(((pred - mpred) * m_lat).pow(2).flatten(1).mean(1))
            keep = [s for s in range(2) if s != chosen]
            loss = ps[chosen] + 0.2 * pres[keep].mean() + 0.01 * l_attn
        else:
            loss = ps.mean() + 0.01 * l_attn
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dsbal:
            with torch.no_grad():
                for n, p in online.items():
                    momentum[n.replace(".default.", ".momentum.")].lerp_(p, 0.01)

    warm = timed(reps, lambda: step(False))
    dsbal = timed(reps, lambda: step(True))
    print(f"{name:>5} MagicTailor step, 3+3 images at {res} px: warm-up {warm:.3f} s/step | DS-Bal {dsbal:.3f}"
          f" s/step | peak RSS {peak_rss_mb():.0f} MB")


def main():
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    root, only = Path(sys.argv[1]), sys.argv[2:]  # optional config names: tiny, mid
    torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name, c in CONFIGS.items():
        if only and name not in only:
            continue
        model = root / name
        reset_peak()
        unet = UNet2DConditionModel.from_pretrained(model / "unet")
        unet.requires_grad_(False)
        lora(unet, "default")
        bench_unet(name, unet, c["resolution"] // 8, c["reps"])
        del unet
        reset_peak()
        bench_magictailor(name, model, root / "person_k+hair_c", c["resolution"], c["reps"])


if __name__ == "__main__":
    main()
