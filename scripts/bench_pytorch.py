#!/usr/bin/env python3
"""The PyTorch side of `cargo bench` (run by hand), on the same models and pair folder.

    MAGICTAILOR_BENCH_DIR=/tmp/mtb cargo bench      # writes tiny/, mid/, the pair; keeps them
    python scripts/bench_pytorch.py /tmp/mtb        # 2 threads, like the Rust bench here
    python scripts/bench_pytorch.py /tmp/mtb mid    # one config
    python scripts/bench_pytorch.py /tmp/mtb full --device cuda --dtype fp16   # scripts/gpu_bench.sh

Rows, as in benches/model.rs (peak RSS is per row: the high-water mark is reset before
each):
- U-Net forward+backward with peft LoRA (rank 32, MagicTailor's targets, batch 6) and a
  DDIM step (CFG, batch 2);
- a MagicTailor training step with 3+3 images, warm-up and DS-Bal: colour jitter + flip,
  DM-Deg noise, VAE encode, text encoder with two trainable pseudo-word rows, U-Net with
  LoRA recording the cross-attention maps the attention loss reads, masked diffusion
  loss, attention loss, (DS-Bal: momentum forward through a second peft adapter without
  grad, L_pres), backward, grad clipping, AdamW, EMA of the momentum adapter.

- `full` (SD 2.1-base shapes at 512 px, written by the Rust bench when a device is
  selected) adds a whole 50-step DDIM sampling with CFG 7.5 through diffusers'
  StableDiffusionPipeline.

This is PyTorch used well (SDPA attention, no second U-Net copy), not the released
script verbatim, so the ratio compares implementations of the same computation.

`--device cuda --dtype fp16` runs as the released script's fp16 mixed precision does
(accelerate): frozen weights in fp16, LoRA weights and pseudo-word rows in fp32, the
forward under fp16 autocast, a GradScaler. Times are taken between
torch.cuda.synchronize() calls; each row reports torch's peak allocated and reserved
memory and, when nvidia-smi is there, the GPU's peak memory.used (CUDA context included)
polled every 50 ms.
"""
import argparse
import json
import gc
import math
import resource
import shutil
import statistics
import subprocess
import threading
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
from transformers import CLIPTextModel, CLIPTextModelWithProjection

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]
CONFIGS = {
    "tiny": dict(resolution=128, reps=5),
    "mid": dict(resolution=256, reps=3),
    "full": dict(resolution=512, reps=3, infer=True),
    # SDXL's structure at a quarter width (benches/model.rs, `sdxl` rows).
    "sdxl": dict(resolution=256, reps=3, infer=True, infer_reps=2),
    # SDXL-base's U-Net at its real shape (`cargo bench -- xl1024-ddim`), row `ddim` only.
    "xl1024": dict(resolution=1024, reps=2),
}
# Set by main(): where the rows run, the frozen weights' dtype, and whether to autocast.
DEV = torch.device("cpu")
DTYPE = torch.float32


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def autocast():
    """fp16 mixed precision as accelerate applies it; a no-op context in f32."""
    return torch.autocast(DEV.type, dtype=DTYPE, enabled=DTYPE != torch.float32)


def timed(reps, f):
    f()
    sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


class GpuPeak:
    """nvidia-smi's memory.used of GPU 0 every 50 ms while a row runs, in a thread."""

    def __init__(self):
        self.peak_mib, self.proc = 0, None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--id=0", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "50"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.peak_mib = max(self.peak_mib, int(line.strip()))
            except ValueError:
                pass

    def stop(self):
        if self.proc:
            time.sleep(0.1)  # one more sample after the row's last kernel
            self.proc.terminate()
            self.proc.wait()
        return self.peak_mib / 1024


def peak_rss_mb():
    """This process's peak resident memory since the last `reset_peak()`."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak():
    global GPU_POLL
    if DEV.type == "cuda":
        sync()
        gc.collect()
        torch.cuda.empty_cache()  # the last row's cached blocks count in nvidia-smi's figure
        torch.cuda.reset_peak_memory_stats()
        GPU_POLL = GpuPeak()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


GPU_POLL = None


def peak():
    """The row's peak memory, as text (ends the row's nvidia-smi poll)."""
    if DEV.type != "cuda":
        return f"peak RSS {peak_rss_mb():.0f} MB"
    smi = GPU_POLL.stop() if GPU_POLL else 0.0
    gib = 2 ** 30
    return (f"peak GPU torch allocated {torch.cuda.max_memory_allocated() / gib:.2f} GiB, reserved"
            f" {torch.cuda.max_memory_reserved() / gib:.2f} GiB, nvidia-smi {smi:.2f} GiB")


def lora(unet, name):
    unet.add_adapter(LoraConfig(r=32, lora_alpha=32, target_modules=TARGETS, init_lora_weights="gaussian"),
                     adapter_name=name)
    # peft makes the adapter in the base layer's dtype; training keeps it in fp32.
    for n, p in unet.named_parameters():
        if f".{name}." in n:
            p.data = p.data.float()


def load(cls, path):
    return cls.from_pretrained(path, dtype=DTYPE).to(DEV)


def added(unet, b, latent):
    """SDXL's added conditioning (pooled text, the image's six sizes); {} for SD."""
    c = unet.config
    if c.addition_embed_type != "text_time":
        return {}
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    side = float(latent * 8)
    sizes = torch.tensor([[side, side, 0.0, 0.0, side, side]] * b, device=DEV)
    return {"added_cond_kwargs": {"text_embeds": torch.randn(b, pooled, device=DEV), "time_ids": sizes}}


def bench_unet(name, unet, latent, reps):
    d = unet.config.cross_attention_dim
    x6, ctx6 = torch.randn(6, 4, latent, latent, device=DEV), torch.randn(6, 77, d, device=DEV)
    t6 = torch.tensor([10, 200, 400, 600, 800, 990], device=DEV)
    added6 = added(unet, 6, latent)

    def train_step():
        with autocast():
            loss = unet(x6, t6, encoder_hidden_states=ctx6, **added6).sample.float().pow(2).mean()
        loss.backward()
        unet.zero_grad(set_to_none=True)

    tr, st = timed(reps, train_step), ddim_seconds(unet, latent, reps)
    print(f"{name:>5} latent {latent}x{latent} ({latent * 8} px): U-Net fwd+bwd, LoRA r32, batch 6: {tr:.3f} s/step"
          f" | DDIM step, CFG batch 2: {st:.3f} s/step | {peak()}")


def ddim_seconds(unet, latent, reps):
    """Seconds per DDIM step of `unet` at `latent`, CFG batch 2, from random latents and text."""
    added2 = added(unet, 2, latent)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sched.set_timesteps(50)
    d = unet.config.cross_attention_dim
    x1, ctx2 = torch.randn(1, 4, latent, latent, device=DEV), torch.randn(2, 77, d, device=DEV)
    t2 = torch.tensor([500, 500], device=DEV)

    def ddim_step():
        with torch.no_grad(), autocast():
            eps = unet(torch.cat([x1, x1]), t2, encoder_hidden_states=ctx2, **added2).sample.float()
            u, cnd = eps.chunk(2)
            sched.step(u + 7.5 * (cnd - u), 501, x1)

    return timed(reps, ddim_step)


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


def bench_infer(name, model, res, reps, steps=50):
    """What `magictailor infer` does after loading: diffusers' pipeline, output as numpy."""
    from diffusers import DiffusionPipeline

    # The folder's own pipeline class (SD, or SDXL for the `sdxl` rows).
    extra = {} if "XL" in json.loads((Path(model) / "model_index.json").read_text())["_class_name"] else {
        "safety_checker": None}
    pipe = DiffusionPipeline.from_pretrained(model, dtype=DTYPE, **extra).to(DEV)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(DEV).manual_seed(0)
    secs = timed(reps, lambda: pipe("a photo of a dog", height=res, width=res, num_inference_steps=steps,
                                    guidance_scale=7.5, generator=gen, output_type="np"))
    print(f"{name:>5} infer at {res} px: {steps} DDIM steps, CFG 7.5, + VAE decode: {secs:.3f} s/image"
          f" | {peak()}")


def load_pair(pair, res):
    imgs, masks = [], []
    for p in sorted(pair.glob("*.png")):
        img = Image.open(p).convert("RGB").resize((res, res), Image.BILINEAR)
        m = Image.open(pair / "masks" / p.name).convert("L").resize((res, res), Image.NEAREST)
        imgs.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1)
        masks.append(torch.from_numpy((np.array(m) >= 128).astype(np.float32))[None])
    return torch.stack(imgs).to(DEV), torch.stack(masks).to(DEV)


def frozen(model):
    """The U-Net, VAE and text encoder of `model`, none of them trainable."""
    parts = (load(UNet2DConditionModel, model / "unet"), load(AutoencoderKL, model / "vae"),
             load(CLIPTextModel, model / "text_encoder"))
    for m in parts:
        m.requires_grad_(False)
    return parts


def with_rows(te):
    """Two pseudo-words as trainable fp32 rows appended to `te`'s frozen token table;
    returns the rows and the table's size."""
    text = getattr(te, "text_model", te)  # transformers < 5 nests the modules one deeper
    table = text.embeddings.token_embedding
    rows = torch.nn.Parameter(table.weight[:2].detach().float().clone())

    class Table(torch.nn.Module):
        def forward(self, ids):
            return F.embedding(ids, torch.cat([table.weight, rows]))

    text.embeddings.token_embedding = Table()
    return rows, table.weight.shape[0]


def text_side(model, te):
    """The pseudo-word rows of every text encoder of `model` (SDXL's second one loaded
    here), the vocabulary size, and `encode(ids, res)`: the U-Net's context and keyword
    arguments (SDXL: both encoders' penultimate states, the pooled projection, the sizes)."""
    rows, vocab = with_rows(te)
    if not (model / "text_encoder_2").exists():
        return [rows], vocab, lambda ids, res: (te(ids).last_hidden_state, {})
    te_2 = load(CLIPTextModelWithProjection, model / "text_encoder_2")
    te_2.requires_grad_(False)
    rows_2, _ = with_rows(te_2)

    def encode(ids, res):
        h1 = te(ids, output_hidden_states=True).hidden_states[-2]
        out = te_2(ids, output_hidden_states=True)
        sizes = torch.tensor([[res, res, 0.0, 0.0, res, res]] * ids.shape[0], device=DEV)
        cond = {"text_embeds": out.text_embeds, "time_ids": sizes}
        return torch.cat([h1, out.hidden_states[-2]], -1), {"added_cond_kwargs": cond}

    return [rows, rows_2], vocab, encode


def bench_magictailor(name, model, pair, res, reps, steps=500, warmup=200):
    unet, vae, te = frozen(model)
    lora(unet, "default")
    lora(unet, "momentum")
    unet.set_adapter("default")
    online = {n: p for n, p in unet.named_parameters() if ".default." in n}
    for p in online.values():
        p.requires_grad_(True)
    momentum = {n.replace(".default.", ".momentum."): p for n, p in online.items()}
    momentum = {n: dict(unet.named_parameters())[n] for n in momentum}

    # Two pseudo-words as trainable rows appended to each frozen token table.
    rows, vocab, encode = text_side(model, te)
    ids = torch.randint(0, vocab, (6, 77), device=DEV)
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
    sample_of = torch.tensor([0, 0, 0, 1, 1, 1], device=DEV)
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    params = list(online.values()) + rows
    opt = torch.optim.AdamW(params, lr=4e-4, weight_decay=0.01)
    scaler = torch.amp.GradScaler(DEV.type, enabled=DTYPE == torch.float16)
    state = {"d": 0}

    def per_sample(per_image):
        return torch.stack([per_image[sample_of == s].mean() for s in range(2)])

    def step(dsbal):
        state["d"] += 1
        b = pixels.shape[0]
        f = lambda: (0.9 + 0.2 * torch.rand(b, 1, 1, 1, device=DEV))
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
        with torch.no_grad(), autocast():
            z0 = vae.encode(x.to(DTYPE)).latent_dist.sample().float() * vae.config.scaling_factor
        t = torch.randint(0, 1000, (b,), device=DEV)
        eps = torch.randn_like(z0)
        z_t = ddpm.add_noise(z0, eps, t)
        m_lat = F.interpolate(m, size=(latent, latent), mode="nearest")
        maps.clear()
        with autocast():
            ctx, added = encode(ids, res)
            pred = unet(z_t, t, encoder_hidden_states=ctx, **added).sample.float()
        per_image = ((pred - eps) * m_lat).pow(2).flatten(1).mean(1)
        ps = per_sample(per_image)
        own = [mp[torch.arange(b), :, token_pos] for mp in maps if mp.shape[1] == side * side]
        own = torch.stack(own).float().mean(0)
        m_small = F.interpolate(m, size=(side, side), mode="nearest").flatten(1)
        own = own / own.amax(dim=1, keepdim=True).clamp_min(1e-8)
        l_attn = (own - m_small).pow(2).mean()
        if dsbal:
            chosen = int(ps.argmax())
            unet.set_adapter("momentum")
            with torch.no_grad(), autocast():
                mpred = unet(z_t, t, encoder_hidden_states=ctx.detach(), **added).sample.float()
            unet.set_adapter("default")
            for p in online.values():
                p.requires_grad_(True)
            pres = per_sample(((pred - mpred) * m_lat).pow(2).flatten(1).mean(1))
            keep = [s for s in range(2) if s != chosen]
            loss = ps[chosen] + 0.2 * pres[keep].mean() + 0.01 * l_attn
        else:
            loss = ps.mean() + 0.01 * l_attn
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if dsbal:
            with torch.no_grad():
                for n, p in online.items():
                    momentum[n.replace(".default.", ".momentum.")].lerp_(p, 0.01)

    warm = timed(reps, lambda: step(False))
    dsbal = timed(reps, lambda: step(True))
    print(f"{name:>5} MagicTailor step, 3+3 images at {res} px: warm-up {warm:.3f} s/step | DS-Bal {dsbal:.3f}"
          f" s/step | {peak()}")


def bench_ti(name, model, pair, res, reps, per_step=4):
    """diffusers' textual_inversion.py step with the paper's masked loss: 4 images drawn from
    the pair (batch 1 x 4 accumulated, as one batch of 4), a flip each, AdamW over the whole
    token table (lr 5e-4 x 4, weight decay 1e-2), every row but the two words restored."""
    unet, vae, te = frozen(model)
    unet.set_attn_processor(AttnProcessor2_0())
    te.resize_token_embeddings(te.get_input_embeddings().weight.shape[0] + 2)
    table = te.get_input_embeddings().weight
    vocab = table.shape[0] - 2
    table.requires_grad_(True)
    original = table.detach().clone()
    opt = torch.optim.AdamW([table], lr=5e-4 * per_step, weight_decay=1e-2)
    pixels, masks = load_pair(pair, res)
    n = pixels.shape[0]
    sample_of = torch.tensor([0, 0, 0, 1, 1, 1], device=DEV)
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latent = res // 8

    def step():
        pick = torch.randint(0, n, (per_step,), device=DEV)
        x, m = pixels[pick], masks[pick]
        flip = torch.rand(per_step, device=DEV) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        m = torch.where(flip[:, None, None, None], m.flip(-1), m)
        ids = torch.randint(0, vocab, (per_step, 77), device=DEV)
        ids[:, 5] = vocab + sample_of[pick]
        with torch.no_grad(), autocast():
            z0 = vae.encode(x.to(DTYPE)).latent_dist.sample().float() * vae.config.scaling_factor
        t = torch.randint(0, 1000, (per_step,), device=DEV)
        eps = torch.randn_like(z0)
        z_t = ddpm.add_noise(z0, eps, t)
        with autocast():
            ctx = te(ids).last_hidden_state
            pred = unet(z_t, t, encoder_hidden_states=ctx).sample.float()
        m_lat = F.interpolate(m, size=(latent, latent), mode="nearest")
        loss = ((pred - eps) * m_lat).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            table[:vocab] = original[:vocab]

    secs = timed(reps, step)
    print(f"{name:>5} TI step, {per_step} images at {res} px: {secs:.3f} s/step | {peak()}")


def vico_setup(model):
    """The frozen parts, two pseudo-word rows (fp32, trainable) in the text encoder's table,
    and ViCo's blocks (fp32) installed on the U-Net (scripts/make_vico_fixture.py)."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    from make_vico_fixture import ViCo, site_blocks

    unet, vae, te = frozen(model)
    emb = te.get_input_embeddings()
    vocab = emb.weight.shape[0]
    rows = torch.randn(2, emb.weight.shape[1], device=DEV, requires_grad=True)
    emb.forward = lambda x: F.embedding(x, torch.cat([emb.weight, rows.to(emb.weight.dtype)]))
    blocks = {s: b.to(DEV) for s, b in site_blocks(unet).items()}
    return unet, vae, te, rows, vocab, blocks, ViCo(unet, blocks)


def bench_vico(name, model, pair, res, reps, per_step=4):
    """The authors' ViCo step: 4 images drawn from the pair, each with a reference drawn
    from its own sample's other images (posterior samples, no grad), the reference pass,
    then the images through the blocks; eps-MSE + 5e-4 L_reg; AdamW with the row at 5e-3 x
    4 and the blocks at 1e-5, weight decay 1e-2, no clipping."""
    unet, vae, te, rows, vocab, blocks, vico = vico_setup(model)
    params = [p for b in blocks.values() for p in b.parameters()]
    opt = torch.optim.AdamW([{"params": [rows], "lr": 5e-3 * per_step}, {"params": params}], lr=1e-5,
                            weight_decay=1e-2)
    pixels, _ = load_pair(pair, res)
    sample_of = [0, 0, 0, 1, 1, 1]
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

    def step():
        pick = torch.randint(0, len(sample_of), (per_step,)).tolist()
        refs = [int(np.random.choice([j for j in range(len(sample_of))
                                      if j != i and sample_of[j] == sample_of[i]])) for i in pick]
        ids = torch.randint(0, vocab, (per_step, 77), device=DEV)
        ids[:, 5] = torch.tensor([vocab + sample_of[i] for i in pick], device=DEV)
        with torch.no_grad(), autocast():
            z = vae.encode(pixels[pick + refs].to(DTYPE)).latent_dist.sample().float() * vae.config.scaling_factor
        z0, zr = z[:per_step], z[per_step:]
        t = torch.randint(0, 1000, (per_step,), device=DEV)
        eps = torch.randn_like(z0)
        z_t = ddpm.add_noise(z0, eps, t)
        with autocast():
            ctx = te(ids).last_hidden_state
            vico.reference([5] * per_step, [6] * per_step)
            unet(zr, t, encoder_hidden_states=ctx)
            vico.drawing()
            pred = unet(z_t, t, encoder_hidden_states=ctx).sample.float()
        loss = F.mse_loss(pred, eps) + 5e-4 * sum(r.float() for r in vico.reg)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    secs = timed(reps, step)
    print(f"{name:>5} ViCo step, {per_step} images at {res} px: {secs:.3f} s/step | {peak()}")


def bench_vico_infer(name, model, pair, res, reps, steps=50):
    """`infer --reference` after loading: the prompt and empty prompt encoded, the reference
    (a posterior sample) encoded once, then per DDIM step the reference pass for both
    texts (one batch of 2) and the guided pass through the blocks; VAE decode."""
    unet, vae, te, rows, vocab, blocks, vico = vico_setup(model)
    pixels, _ = load_pair(pair, res)
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    # Stand-ins for "" and "a photo of <v0>" (the small configs' vocabularies are tiny).
    ids = torch.randint(0, vocab, (2, 77), device=DEV)
    ids[1, 4] = vocab
    latent = res // 8

    def run():
        with torch.no_grad(), autocast():
            ctx = te(ids).last_hidden_state  # [empty, prompt]
            zr = vae.encode(pixels[:1].to(DTYPE)).latent_dist.sample() * vae.config.scaling_factor
            zr = zr.repeat(2, 1, 1, 1)
            x = torch.randn(1, 4, latent, latent, device=DEV)
            ddim.set_timesteps(steps)
            for t in ddim.timesteps:
                vico.reference([1, 4], [1, 5])
                unet(zr, t, encoder_hidden_states=ctx)
                vico.drawing()
                e = unet(torch.cat([x, x]).to(DTYPE), t, encoder_hidden_states=ctx).sample.float()
                e = e[0:1] + 7.5 * (e[1:2] - e[0:1])
                x = ddim.step(e, t, x).prev_sample
            vae.decode((x / vae.config.scaling_factor).to(DTYPE)).sample.float().cpu().numpy()

    secs = timed(reps, run)
    print(f"{name:>5} ViCo infer at {res} px: {steps} DDIM steps, CFG 7.5, + VAE decode: {secs:.3f} s/image"
          f" | {peak()}")


class RetouchState:
    """What every attention processor of one retouch step reads (set per step)."""

    def __init__(self):
        self.sources, self.layout_of, self.ref_rows, self.source = 0, [], [], None
        self.masks, self.maps, self.map_queries, self.cond_rows = {}, [], 0, slice(0)


class RetouchProcessor:
    """Self-attention of a retouch step: source rows attend to themselves; target rows to
    the layout's or the references' keys and values (in `swaps` layers), blended with the
    layout's output by the step's mask. Cross-attention records the conditional targets'
    maps at the mask's grid (decoder only)."""

    def __init__(self, st, swaps, up):
        self.st, self.swaps, self.up = st, swaps, up

    def __call__(self, attn, hs, encoder_hidden_states=None, attention_mask=None, temb=None):
        st, h = self.st, attn.heads
        heads = lambda x: x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)
        merge = lambda x: x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)
        sdpa = lambda q, k, v: merge(F.scaled_dot_product_attention(heads(q), heads(k), heads(v)))
        q = attn.to_q(hs)
        if encoder_hidden_states is not None:
            k, v = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
            if self.up and hs.shape[1] == st.map_queries:
                probs = (heads(q[st.cond_rows]) * attn.scale) @ heads(k[st.cond_rows]).transpose(-1, -2)
                st.maps.append(probs.softmax(-1).mean(1).float())
            return attn.to_out[0](sdpa(q, k, v))
        k, v = attn.to_k(hs), attn.to_v(hs)
        s, n = st.sources, hs.shape[1]
        if s == 0:
            return attn.to_out[0](sdpa(q, k, v))
        out_src = sdpa(q[:s], k[:s], v[:s])
        if self.swaps and st.source == "layout":
            kt, vt = k[st.layout_of], v[st.layout_of]
        elif self.swaps and st.source == "refs":
            t = q.shape[0] - s
            side = lambda x: x[st.ref_rows].reshape(1, -1, x.shape[-1]).expand(t, -1, -1)
            kt, vt = side(k), side(v)
        else:
            kt, vt = k[s:], v[s:]
        out_t = sdpa(q[s:], kt, vt)
        if n in st.masks:
            lay = out_src[st.layout_of]
            out_t = lay + st.masks[n].to(out_t.dtype) * (out_t - lay)
        return attn.to_out[0](torch.cat([out_src, out_t]))


def blend_mask(m, side):
    """Layout-and-Retouch's adaptive mask of one word's map [q] on a `side` latent: Otsu,
    distance transform scaled to [0.5, 1] inside, the attention's pixels 1."""
    g = int(math.isqrt(m.numel()))
    soft = F.interpolate(m.view(1, 1, g, g), size=(side, side), mode="bilinear", align_corners=False).flatten()
    hist, edges = np.histogram(soft.cpu().numpy(), bins=256)
    w = np.cumsum(hist) / hist.sum()
    mu = np.cumsum(hist * edges[:-1]) / hist.sum()
    between = (mu[-1] * w - mu) ** 2 / np.maximum(w * (1 - w), 1e-12)
    inside = soft > float(edges[np.argmax(between) + 1])
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pts = torch.stack([ys.flatten(), xs.flatten()], 1).float().to(soft.device)
    out = torch.zeros_like(soft)
    if inside.any() and (~inside).any():
        d = torch.cdist(pts[inside], pts[~inside]).min(1).values
        out[inside] = 0.5 + 0.5 * (d - d.min()) / (d.max() - d.min()).clamp_min(1e-6)
    out[inside] = 1.0
    return out


def bench_retouch(name, model, pair, res, steps=50):
    """`infer --retouch` after loading, as benches/model.rs's `mid-retouch` row: stage 1
    (CFG), the layout's DDIM inversion (unguided, trajectory kept), the reference's (first
    image only), then 50 steps of [layout, reference, target x 2] through one U-Net call with
    the swap (layout keys for the first fifth) and, from there, the blend; VAE decode."""
    from diffusers import DDIMInverseScheduler

    unet, vae, te = frozen(model)
    st = RetouchState()
    procs = {}
    for key in unet.attn_processors:
        up, level = key.startswith("up_blocks"), key.split(".")[1]
        procs[key] = RetouchProcessor(st, up and level in ("2", "3"), up)
    unet.set_attn_processor(procs)
    pixels, _ = load_pair(pair, res)
    cfg = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
               set_alpha_to_one=False, steps_offset=1)
    ddim, inverse = DDIMScheduler(**cfg), DDIMInverseScheduler(**cfg)
    vocab = te.config.vocab_size
    ids = torch.randint(0, vocab, (3, 77), device=DEV)  # "", the prompt, "a photo of <v0>"
    latent, k_layout = res // 8, steps // 5
    cache = {}

    def invert(z, ctx):
        inverse.set_timesteps(steps)
        path = []
        for t in inverse.timesteps:
            z = inverse.step(unet(z.to(DTYPE), t, encoder_hidden_states=ctx).sample.float(), t, z).prev_sample
            path.append(z)
        return path[::-1]

    def run():
        with torch.no_grad(), autocast():
            ctx = te(ids).last_hidden_state
            x = torch.randn(1, 4, latent, latent, device=DEV)
            ddim.set_timesteps(steps)
            for t in ddim.timesteps:
                e = unet(torch.cat([x, x]).to(DTYPE), t, encoder_hidden_states=ctx[:2]).sample.float()
                x = ddim.step(e[:1] + 7.5 * (e[1:] - e[:1]), t, x).prev_sample
            layout_pixels = vae.decode((x / vae.config.scaling_factor).to(DTYPE)).sample.float()
            layout = invert(x, ctx[1:2])
            if "ref" not in cache:
                zr = vae.encode(pixels[:1].to(DTYPE)).latent_dist.sample() * vae.config.scaling_factor
                cache["ref"] = invert(zr.float(), ctx[2:3])
            ref = cache["ref"]
            x, maps = layout[0], None
            ddim.set_timesteps(steps)
            for i, t in enumerate(ddim.timesteps):
                blending = i >= k_layout and maps is not None
                source = "layout" if i < k_layout else "refs"
                rows, ctxs = [], []
                if blending or source == "layout":
                    rows.append(layout[i]); ctxs.append(ctx[1:2])
                if source == "refs":
                    rows.append(ref[i]); ctxs.append(ctx[2:3])
                st.sources, st.source = len(rows), source
                st.layout_of = [0, 0] if (blending or source == "layout") else []
                st.ref_rows = [st.sources - 1] if source == "refs" else []
                st.masks = {}
                if blending:
                    m = blend_mask(maps, latent)
                    for g in (latent, latent // 2, latent // 4, latent // 8):
                        cell = F.adaptive_avg_pool2d(m.view(1, 1, latent, latent), g).flatten()
                        st.masks[g * g] = cell.view(1, -1, 1).expand(2, -1, 1)
                st.map_queries, st.cond_rows, st.maps = (latent // 4) ** 2, slice(st.sources + 1, st.sources + 2), []
                rows += [x, x]
                ctxs += [ctx[0:1], ctx[1:2]]
                e = unet(torch.cat(rows).to(DTYPE), t, encoder_hidden_states=torch.cat(ctxs)).sample.float()
                e = e[st.sources:]
                x = ddim.step(e[:1] + 7.5 * (e[1:] - e[:1]), t, x).prev_sample
                maps = torch.stack(st.maps).mean(0)[0, :, 4]  # the word's token
            st.sources, st.map_queries = 0, 0
            vae.decode((x / vae.config.scaling_factor).to(DTYPE)).sample.float().cpu().numpy()
            del layout_pixels

    t0 = time.perf_counter()
    run()
    sync()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    run()
    sync()
    after = time.perf_counter() - t0
    print(f"{name:>5} --retouch at {res} px, 50 DDIM steps, CFG 7.5: {first:.3f} s first image, {after:.3f} s"
          f" after (the reference's inversion kept) | {peak()}")


def bench_dreambooth(name, model, pair, res, reps):
    """diffusers' train_dreambooth_lora.py step with the paper's masked loss: one image, the
    frozen text encoder run on its prompt, peft LoRA rank 4 on every attention's
    q/k/v/out, gradients clipped to 1, AdamW at 1e-4."""
    unet, vae, te = frozen(model)
    unet.set_attn_processor(AttnProcessor2_0())
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    pixels, masks = load_pair(pair, res)
    vocab = te.get_input_embeddings().weight.shape[0]
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latent = res // 8

    def step():
        pick = torch.randint(0, pixels.shape[0], (1,), device=DEV)
        x, m = pixels[pick], masks[pick]
        ids = torch.randint(0, vocab, (1, 77), device=DEV)
        with torch.no_grad(), autocast():
            z0 = vae.encode(x.to(DTYPE)).latent_dist.sample().float() * vae.config.scaling_factor
            ctx = te(ids).last_hidden_state
        t = torch.randint(0, 1000, (1,), device=DEV)
        eps = torch.randn_like(z0)
        z_t = ddpm.add_noise(z0, eps, t)
        with autocast():
            pred = unet(z_t, t, encoder_hidden_states=ctx).sample.float()
        m_lat = F.interpolate(m, size=(latent, latent), mode="nearest")
        loss = ((pred - eps) * m_lat).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    secs = timed(reps, step)
    print(f"{name:>5} DreamBooth step, 1 image at {res} px: {secs:.3f} s/step | {peak()}")


def bench_custom_diffusion(name, model, pair, res, reps, per_step=2):
    """diffusers' train_custom_diffusion.py step (--freeze_model crossattn_kv) with the
    paper's masked loss and rate: CustomDiffusionAttnProcessor on every attention, the
    cross-attentions' key and value matrices trained in full, two new token rows (AdamW over
    the whole token table, the other rows' gradients zeroed, as the script does); two
    images, gradients of all trained weights clipped to 1 together, AdamW at 1e-4 x 2. The
    scale augmentation runs on the host in the script's data loader and is left out."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    unet, vae, te = frozen(model)
    st = unet.state_dict()
    procs = {}
    for pname in unet.attn_processors:
        layer = pname[: -len(".processor")]
        if pname.endswith("attn1.processor"):
            procs[pname] = CustomDiffusionAttnProcessor2_0(train_kv=False, train_q_out=False)
            continue
        w_k = st[layer + ".to_k.weight"]
        p = CustomDiffusionAttnProcessor2_0(train_kv=True, train_q_out=False, hidden_size=w_k.shape[0],
                                            cross_attention_dim=w_k.shape[1])
        p.load_state_dict({"to_k_custom_diffusion.weight": w_k,
                           "to_v_custom_diffusion.weight": st[layer + ".to_v.weight"]})
        procs[pname] = p.to(DEV).float()
    unet.set_attn_processor(procs)
    kv = [p for p in unet.attn_processors.values() for p in p.parameters()]
    for p in kv:
        p.requires_grad_(True)
    te.resize_token_embeddings(te.get_input_embeddings().weight.shape[0] + 2)
    table = te.get_input_embeddings().weight
    vocab = table.shape[0] - 2
    table.requires_grad_(True)
    params = [table] + kv
    opt = torch.optim.AdamW(params, lr=1e-4 * per_step, weight_decay=1e-2)
    pixels, masks = load_pair(pair, res)
    n = pixels.shape[0]
    sample_of = torch.tensor([0, 0, 0, 1, 1, 1], device=DEV)
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latent = res // 8

    def step():
        pick = torch.randint(0, n, (per_step,), device=DEV)
        x, m = pixels[pick], masks[pick]
        ids = torch.randint(0, vocab, (per_step, 77), device=DEV)
        ids[:, 5] = vocab + sample_of[pick]
        with torch.no_grad(), autocast():
            z0 = vae.encode(x.to(DTYPE)).latent_dist.sample().float() * vae.config.scaling_factor
        t = torch.randint(0, 1000, (per_step,), device=DEV)
        eps = torch.randn_like(z0)
        z_t = ddpm.add_noise(z0, eps, t)
        with autocast():
            ctx = te(ids).last_hidden_state
            pred = unet(z_t, t, encoder_hidden_states=ctx).sample.float()
        m_lat = F.interpolate(m, size=(latent, latent), mode="nearest")
        loss = ((pred - eps) * m_lat).pow(2).mean()
        loss.backward()
        table.grad[:vocab] = 0
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    secs = timed(reps, step)
    print(f"{name:>5} Custom Diffusion step, {per_step} images at {res} px: {secs:.3f} s/step | {peak()}")


def bench_clic(name, model, pair, res, reps):
    """CLiC's learning.py step (style mode) at the paper's rate: Custom Diffusion's
    processors tuning q/k/v/out of every cross-attention, two new token rows; one image
    with a brightness jitter and its masked copy through one U-Net pass, the up blocks'
    cross-attention maps recorded for L_att, L_context and L_RoI, all gradients clipped
    together, AdamW (5e-5, weight decay 0.1)."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    unet, vae, te = frozen(model)
    st = unet.state_dict()
    procs, maps = {}, []
    for pname in unet.attn_processors:
        layer = pname[: -len(".processor")]
        if pname.endswith("attn1.processor"):
            procs[pname] = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False)
            continue
        w_k = st[layer + ".to_k.weight"]
        p = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=True, hidden_size=w_k.shape[0],
                                         cross_attention_dim=w_k.shape[1])
        p.load_state_dict({"to_k_custom_diffusion.weight": w_k, "to_v_custom_diffusion.weight": st[layer + ".to_v.weight"],
                           "to_q_custom_diffusion.weight": st[layer + ".to_q.weight"],
                           "to_out_custom_diffusion.0.weight": st[layer + ".to_out.0.weight"],
                           "to_out_custom_diffusion.0.bias": st[layer + ".to_out.0.bias"]})
        procs[pname] = p.to(DEV).float()
    unet.set_attn_processor(procs)
    for mname, m in unet.named_modules():
        if mname.startswith("up_blocks") and mname.endswith("attn2"):
            orig, heads = m.get_attention_scores, m.heads
            m.get_attention_scores = (lambda q, k, mask=None, orig=orig, heads=heads:
                                      maps.append((orig(q, k, mask), heads)) or maps[-1][0])
    tuned = [p for p in unet.attn_processors.values() for p in p.parameters()]
    for p in tuned:
        p.requires_grad_(True)
    te.resize_token_embeddings(te.get_input_embeddings().weight.shape[0] + 2)
    table = te.get_input_embeddings().weight
    vocab = table.shape[0] - 2
    table.requires_grad_(True)
    params = [table] + tuned
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.1)
    pixels, masks = load_pair(pair, res)
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    latent = res // 8

    def step():
        pick = torch.randint(0, pixels.shape[0], (1,), device=DEV)
        x, m = pixels[pick] * (0.5 + torch.rand(1, device=DEV)), masks[pick]
        ids = torch.randint(0, vocab, (2, 77), device=DEV)
        ids[:, 5] = vocab
        with torch.no_grad(), autocast():
            z0 = vae.encode(torch.cat([x, x * m]).to(DTYPE)).latent_dist.sample().float() * vae.config.scaling_factor
        t = torch.randint(0, 1000, (1,), device=DEV).repeat(2)
        eps = torch.randn_like(z0[:1]).repeat(2, 1, 1, 1)
        z_t = ddpm.add_noise(z0, eps, t)
        maps.clear()
        with autocast():
            ctx = te(ids).last_hidden_state
            pred = unet(z_t, t, encoder_hidden_states=ctx).sample.float()
        att_mask = F.interpolate(m, size=(latent, latent), mode="bilinear", align_corners=False)
        resized = []
        for probs, heads in maps:
            q = probs.shape[1]
            side = int(round(q ** 0.5))
            a = probs.reshape(2, heads, q, -1)[:1].mean(1)[:, :, 5].reshape(1, 1, side, side).float()
            resized.append(F.interpolate(a, size=(latent, latent), mode="bilinear", align_corners=False))
        att = torch.stack(resized).mean(0)
        att = (att - att.min()) / (att.max() - att.min())
        cmask = att_mask.clone()
        cmask[cmask < 0.05] = 0.25

        def weighted(p, w):
            e = F.mse_loss(p, eps[:1], reduction="none")
            return ((e * w).sum([1, 2, 3]) / (w.sum([1, 2, 3]) + 1e-10)).mean()

        loss = 0.25 * F.mse_loss(att, att_mask) + 0.5 * weighted(pred[:1], cmask) + 0.25 * weighted(pred[1:], att_mask)
        loss.backward()
        table.grad[:vocab] = 0
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    secs = timed(reps, step)
    print(f"{name:>5} CLiC step, 1 image + its masked copy at {res} px: {secs:.3f} s/step | {peak()}")


def bench_break_a_scene(name, model, pair, res, reps, lora_rank=None):
    """Break-A-Scene's phase-2 step (google/break-a-scene train.py) with the paper's masked
    loss, as benches/model.rs's `mid-break-a-scene` rows: one image of one sample, every
    U-Net and text-encoder parameter trainable (or, with `lora_rank`, peft adapters on the
    U-Net's attention layers and the word's row), the cross-attention loss on the latent/4
    maps at 1e-2, every gradient clipped to 1 together, AdamW (weight decay 1e-2) at 2e-6
    (adapters 1e-4); no prior preservation, as the Rust row."""
    unet, vae, te = frozen(model)
    text = getattr(te, "text_model", te)  # transformers < 5 nests the modules one deeper
    table = text.embeddings.token_embedding
    row = torch.nn.Parameter(table.weight[:1].detach().float().clone())

    class Table(torch.nn.Module):
        def forward(self, ids):
            return F.embedding(ids, torch.cat([table.weight, row.to(table.weight.dtype)]))

    text.embeddings.token_embedding = Table()
    if lora_rank is None:
        for m in (unet, te):
            m.float().requires_grad_(True)
        params = list(unet.parameters()) + list(te.parameters()) + [row]
        lr = 2e-6
    else:
        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=TARGETS,
                                    init_lora_weights="gaussian"))
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        params.append(row)
        lr = 1e-4
    latent = res // 8
    side = max(latent // 4, 1)
    maps = []
    unet.set_attn_processor({n: ProbeProcessor(maps) if "attn2" in n and not n.startswith("mid_block")
                             else AttnProcessor2_0() for n in unet.attn_processors})
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    pixels, masks = load_pair(pair, res)
    vocab = table.weight.shape[0]
    ddpm = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

    def step():
        pick = torch.randint(0, pixels.shape[0], (1,), device=DEV)
        x, m = pixels[pick], masks[pick]
        if torch.rand(()) < 0.5:
            x, m = x.flip(-1), m.flip(-1)
        ids = torch.randint(0, vocab, (1, 77), device=DEV)
        ids[0, 4] = vocab
        with torch.no_grad(), autocast():
            z0 = vae.encode(x.to(DTYPE)).latent_dist.sample().float() * vae.config.scaling_factor
        t = torch.randint(0, 1000, (1,), device=DEV)
        eps = torch.randn_like(z0)
        z_t = ddpm.add_noise(z0, eps, t)
        maps.clear()
        with autocast():
            ctx = te(ids).last_hidden_state
            pred = unet(z_t, t, encoder_hidden_states=ctx).sample.float()
        m_lat = F.interpolate(m, size=(latent, latent), mode="nearest")
        loss = ((pred - eps) * m_lat).pow(2).mean()
        own = torch.stack([mp[:, :, 4] for mp in maps if mp.shape[1] == side * side]).float().mean(0)
        own = own / own.amax(dim=1, keepdim=True).clamp_min(1e-8)
        m_small = F.interpolate(m, size=(side, side), mode="nearest").flatten(1)
        loss = loss + 0.01 * (own - m_small).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    secs = timed(reps, step)
    what = "every U-Net and text-encoder weight + words" if lora_rank is None else f"LoRA r{lora_rank} + words"
    print(f"{name:>5} Break-A-Scene phase-2 step ({what}), 1 image at {res} px: {secs:.3f} s/step | {peak()}")


def main():
    global DEV, DTYPE
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="MAGICTAILOR_BENCH_DIR of a `cargo bench` run")
    ap.add_argument("configs", nargs="*", help="tiny, mid, full (default: tiny and mid on the CPU, full on CUDA)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["f32", "fp16"], default="f32", help="the frozen weights' dtype")
    ap.add_argument("--rows", default="unet,train,ti,dreambooth,custom-diffusion,clic,vico,vico-infer,infer",
                    help="comma-separated: ddim (the U-Net's DDIM step alone), unet (fwd+bwd, DDIM step), train, ti, dreambooth, custom-diffusion, "
                         "clic, vico, vico-infer, infer (full only), retouch (at 512 px, and plain infer beside it), "
                         "break-a-scene-full, break-a-scene-lora")
    a = ap.parse_args()
    if set(a.configs) - set(CONFIGS):
        ap.error(f"configs are {', '.join(CONFIGS)}")
    DEV, DTYPE = torch.device(a.device), {"f32": torch.float32, "fp16": torch.float16}[a.dtype]
    only = a.configs or (["full"] if a.device == "cuda" else ["tiny", "mid"])
    rows = set(a.rows.split(","))
    if a.device == "cpu":
        torch.set_num_threads(2)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {a.device} {a.dtype}, threads {torch.get_num_threads()}")
    for name in only:
        c = CONFIGS[name]
        model = a.root / name
        if "ddim" in rows:
            # The U-Net alone, no adapters: SDXL-base's shapes at 1024 px (`xl1024`).
            reset_peak()
            start = time.perf_counter()
            unet = load(UNet2DConditionModel, model / "unet")
            load_s, load_peak = time.perf_counter() - start, peak()
            reset_peak()
            st = ddim_seconds(unet, c["resolution"] // 8, c["reps"])
            print(f"{name} U-Net at {c['resolution']} px: load {load_s:.1f} s, {load_peak} | DDIM step, CFG batch 2:"
                  f" {st:.3f} s/step | steps' {peak()}")
            del unet
        if "unet" in rows:
            reset_peak()
            unet = load(UNet2DConditionModel, model / "unet")
            unet.requires_grad_(False)
            lora(unet, "default")
            bench_unet(name, unet, c["resolution"] // 8, c["reps"])
            del unet
        if "train" in rows:
            reset_peak()
            bench_magictailor(name, model, a.root / "person_k+hair_c", c["resolution"], c["reps"])
        if "ti" in rows:
            reset_peak()
            bench_ti(name, model, a.root / "person_k+hair_c", c["resolution"], c["reps"])
        if "dreambooth" in rows:
            reset_peak()
            bench_dreambooth(name, model, a.root / "person_k+hair_c", c["resolution"], c["reps"])
        if "custom-diffusion" in rows:
            reset_peak()
            bench_custom_diffusion(name, model, a.root / "person_k+hair_c", c["resolution"], c["reps"])
        if "clic" in rows:
            reset_peak()
            bench_clic(name, model, a.root / "person_k+hair_c", c["resolution"], c["reps"])
        if "vico" in rows:
            reset_peak()
            bench_vico(name, model, a.root / "person_k+hair_c", c["resolution"], c["reps"])
        if "break-a-scene-full" in rows:
            reset_peak()
            bench_break_a_scene(name, model, a.root / "person_k", c["resolution"], c["reps"])
        if "break-a-scene-lora" in rows:
            reset_peak()
            bench_break_a_scene(name, model, a.root / "person_k", c["resolution"], c["reps"], lora_rank=4)
        if "vico-infer" in rows:
            reset_peak()
            bench_vico_infer(name, model, a.root / "person_k+hair_c", c["resolution"], 1)
        if "retouch" in rows:
            reset_peak()
            bench_retouch(name, model, a.root / "person_k+hair_c", 512)
            reset_peak()
            bench_infer(name, model, 512, 1)
        if "infer" in rows and c.get("infer"):
            reset_peak()
            bench_infer(name, model, c["resolution"], c.get("infer_reps", c["reps"]))


if __name__ == "__main__":
    main()
