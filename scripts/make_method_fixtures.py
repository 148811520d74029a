#!/usr/bin/env python3
"""Reference steps of the comparison methods (`train --method`), run by hand, not by CI.

Each method's step is written here the way its source trains it, with torch, diffusers
and transformers, on the tiny model of tests/fixtures/tiny-sd/ (made by
make_parity_fixtures.py), and what it computes goes into
tests/fixtures/method_steps.safetensors under the method's prefix. Nothing here is
shared with the Rust side: the tests compare two independent computations.

    pip install torch diffusers transformers safetensors
    python scripts/make_method_fixtures.py

Versions used for the committed fixture: tests/fixtures/VERSIONS.txt.
"""
import os

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
MODEL = os.path.join(ROOT, "tiny-sd")
torch.set_num_threads(2)


def load():
    tok = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet")
    sched = DDPMScheduler.from_pretrained(MODEL, subfolder="scheduler")
    for m in (te, unet):
        m.requires_grad_(False)
    return tok, te, unet, sched


def step_inputs(g, b):
    """Latents, noise, timesteps and rectangular masks (64 px images, 8x8 latents)."""
    z0, eps = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    masks = torch.zeros(b, 1, 64, 64)
    boxes = [(8, 40, 16, 56), (20, 64, 0, 30), (0, 24, 10, 50), (30, 60, 30, 60)]
    for i in range(b):
        y0, y1, x0, x1 = boxes[i % len(boxes)]
        masks[i, :, y0:y1, x0:x1] = 1
    return z0, eps, t, masks


def masked_mse(pred, eps, masks):
    """The paper's eq. 1 as the released script computes it: ((pred - eps) * M)^2 averaged
    over every latent element, masked-out zeros included."""
    m = F.interpolate(masks, size=pred.shape[-2:], mode="nearest")
    return ((pred.float() - eps.float()) * m).pow(2).mean()


def attention_lora(unet, g):
    """DreamBooth-LoRA's adapters (peft, rank 4, alpha 4) on every attention's q/k/v/out,
    set to random values here so both matrices get gradients; returns them by name."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for p in lora.values():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
            p.requires_grad_(True)
    return lora


def save_lora(out, prefix, lora):
    """Each adapter matrix and its gradient, as `{prefix}.{module}.A` / `.grad.`."""
    for n, p in lora.items():
        module, which = n.split(".lora_")
        out[f"{prefix}.{module}.{which[0]}"] = p.detach().clone()
        out[f"{prefix}.grad.{module}.{which[0]}"] = p.grad.clone()


def textual_inversion(out):
    """diffusers' textual_inversion.py, one optimizer step: two placeholder tokens added
    to the tokenizer, their rows initialised from the class words' tokens, the whole
    embedding table handed to AdamW (lr 5e-4 x 4 images, weight decay 1e-2) and every
    other row restored after the step; the loss is the masked MSE on eps."""
    g = torch.Generator().manual_seed(11)
    tok, te, unet, sched = load()
    words, classes = ["<v0>", "<v1>"], ["person", "hair"]
    tok.add_tokens(words)
    te.resize_token_embeddings(len(tok))
    table = te.get_input_embeddings().weight
    new = tok.convert_tokens_to_ids(words)
    with torch.no_grad():
        for w, c in zip(new, classes):
            table[w] = table[tok.encode(c, add_special_tokens=False)[0]].clone()
    table.requires_grad_(True)
    original = table.detach().clone()

    # Four images as TI draws them: each its own sample's word in a template.
    prompts = ["a photo of a <v0>", "a rendering of a <v1>", "the photo of a <v0>", "a photo of my <v1>"]
    sample_of = [0, 1, 0, 1]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    z0, eps, t, masks = step_inputs(g, len(prompts))
    z_t = sched.add_noise(z0, eps, t)

    pred = unet(z_t, t, encoder_hidden_states=te(ids)[0]).sample
    loss = masked_mse(pred, eps, masks)
    loss.backward()
    rows_before = table[new].detach().clone()
    grad_rows = table.grad[new].clone()

    opt = torch.optim.AdamW([table], lr=5e-4 * 4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    opt.step()
    with torch.no_grad():
        keep = torch.ones(table.shape[0], dtype=torch.bool)
        keep[new] = False
        table[keep] = original[keep]
    out.update({
        "ti.ids": ids.to(torch.int64), "ti.sample_of": torch.tensor(sample_of), "ti.z_t": z_t, "ti.eps": eps,
        "ti.t": t.to(torch.int64), "ti.masks": masks, "ti.loss": loss.detach(), "ti.rows_init": rows_before,
        "ti.grad.rows": grad_rows, "ti.rows_after": table[new].detach().clone(),
    })


def dreambooth(out):
    """diffusers' train_dreambooth_lora.py, one step's loss and gradients: peft LoRA of rank
    4 (alpha 4, Gaussian A) on to_q/to_k/to_v/to_out.0 of every attention, B set to random
    values here so both matrices get gradients; one image prompted "a photo of sks person";
    the masked MSE on eps."""
    g = torch.Generator().manual_seed(12)
    tok, te, unet, sched = load()
    lora = attention_lora(unet, g)
    ids = tok(["a photo of sks person"], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids
    z0, eps, t, masks = step_inputs(g, 1)
    z_t = sched.add_noise(z0, eps, t)
    with torch.no_grad():
        ctx = te(ids)[0]
    pred = unet(z_t, t, encoder_hidden_states=ctx).sample
    loss = masked_mse(pred, eps, masks)
    loss.backward()
    out.update({"db.ids": ids.to(torch.int64), "db.z_t": z_t, "db.eps": eps, "db.t": t.to(torch.int64),
                "db.masks": masks, "db.loss": loss.detach()})
    save_lora(out, "db", lora)


def dreambooth_prior(out):
    """train_dreambooth_lora.py with --with_prior_preservation, one step's loss and
    gradients: the instance image "a photo of sks person" (masked loss) and a class image
    "a photo of person" (its whole-image loss), prior_loss_weight 1."""
    g = torch.Generator().manual_seed(16)
    tok, te, unet, sched = load()
    lora = attention_lora(unet, g)
    ids = tok(["a photo of sks person", "a photo of person"], padding="max_length", max_length=77,
              truncation=True, return_tensors="pt").input_ids
    z0, eps, t, masks = step_inputs(g, 2)
    masks[1] = 1.0  # the class image is learned whole
    z_t = sched.add_noise(z0, eps, t)
    with torch.no_grad():
        ctx = te(ids)[0]
    pred = unet(z_t, t, encoder_hidden_states=ctx).sample
    instance = masked_mse(pred[:1], eps[:1], masks[:1])
    prior = F.mse_loss(pred[1:].float(), eps[1:].float(), reduction="mean")
    loss = instance + 1.0 * prior
    loss.backward()
    out.update({"dbp.ids": ids.to(torch.int64), "dbp.z_t": z_t, "dbp.eps": eps, "dbp.t": t.to(torch.int64),
                "dbp.masks": masks, "dbp.loss": loss.detach(), "dbp.l_prior": prior.detach()})
    save_lora(out, "dbp", lora)


def v_prediction(out):
    """The tiny model as a v-prediction model (SD 2.x 768's scheduler setting): a 10-step
    DDIM image of diffusers' pipeline from the committed initial latents, and one
    DreamBooth-LoRA step whose target is diffusers' `get_velocity` (the masked loss against
    v). Only the scheduler's prediction_type differs from tiny-sd."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    pipe.set_progress_bar_config(disable=True)
    lat = load_file(os.path.join(ROOT, "init_latents.safetensors"))["latents"]
    img = pipe("a photo of a dog", latents=lat, num_inference_steps=10, guidance_scale=7.5, height=64,
               width=64).images[0]
    import numpy as np
    out["vp.image"] = torch.from_numpy(np.asarray(img).copy())

    g = torch.Generator().manual_seed(17)
    tok, te, unet, sched = load()
    sched = DDPMScheduler.from_config(sched.config, prediction_type="v_prediction")
    lora = attention_lora(unet, g)
    ids = tok(["a photo of sks person"], padding="max_length", max_length=77, truncation=True,
              return_tensors="pt").input_ids
    z0, eps, t, masks = step_inputs(g, 1)
    z_t = sched.add_noise(z0, eps, t)
    target = sched.get_velocity(z0, eps, t)
    with torch.no_grad():
        ctx = te(ids)[0]
    pred = unet(z_t, t, encoder_hidden_states=ctx).sample
    loss = masked_mse(pred, target, masks)
    loss.backward()
    out.update({"vp.ids": ids.to(torch.int64), "vp.z0": z0, "vp.z_t": z_t, "vp.eps": eps,
                "vp.target": target, "vp.t": t.to(torch.int64), "vp.masks": masks, "vp.loss": loss.detach()})
    save_lora(out, "vp", lora)


def custom_processors(unet, train_q_out, noise=None):
    """diffusers' Custom Diffusion processors on every attention: those of the
    cross-attentions tune k and v (and with `train_q_out` q and out with its bias) from
    their base weights, plus 0.05 N(0, 1) on k and v where `noise` (a generator) is given.
    Returns the tuned parameters by `<layer>.<proj>.<weight|bias>`."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    st = unet.state_dict()
    procs, tuned = {}, {}
    for name in unet.attn_processors:
        layer = name[: -len(".processor")]
        if name.endswith("attn1.processor"):
            procs[name] = CustomDiffusionAttnProcessor(train_kv=False, train_q_out=False)
            continue
        w_k = st[layer + ".to_k.weight"]
        p = CustomDiffusionAttnProcessor(train_kv=True, train_q_out=train_q_out, hidden_size=w_k.shape[0],
                                         cross_attention_dim=w_k.shape[1])
        weights = {"to_k_custom_diffusion.weight": w_k, "to_v_custom_diffusion.weight": st[layer + ".to_v.weight"]}
        if train_q_out:
            weights.update({"to_q_custom_diffusion.weight": st[layer + ".to_q.weight"],
                            "to_out_custom_diffusion.0.weight": st[layer + ".to_out.0.weight"],
                            "to_out_custom_diffusion.0.bias": st[layer + ".to_out.0.bias"]})
        p.load_state_dict(weights)
        if noise is not None:
            with torch.no_grad():
                for w in (p.to_k_custom_diffusion.weight, p.to_v_custom_diffusion.weight):
                    w.add_(0.05 * torch.randn(w.shape, generator=noise))
        p.requires_grad_(True)
        procs[name] = p
        if train_q_out:
            tuned[layer + ".to_q.weight"] = p.to_q_custom_diffusion.weight
        tuned[layer + ".to_k.weight"] = p.to_k_custom_diffusion.weight
        tuned[layer + ".to_v.weight"] = p.to_v_custom_diffusion.weight
        if train_q_out:
            tuned[layer + ".to_out.0.weight"] = p.to_out_custom_diffusion[0].weight
            tuned[layer + ".to_out.0.bias"] = p.to_out_custom_diffusion[0].bias
    unet.set_attn_processor(procs)
    return tuned


def custom_diffusion(out):
    """diffusers' train_custom_diffusion.py (--freeze_model crossattn_kv), one optimizer
    step: CustomDiffusionAttnProcessor on every attention, the cross-attentions' key and
    value matrices trained in full (set to their base plus noise here, so a forward that
    used the base would show), two modifier words initialised from "ktn" and "pll"; two
    images, the second with the scale augmentation's "close up " prefix; the masked MSE on
    eps (the paper's eq. 1 in place of the source's valid-region loss); then the source's
    clip of every trained gradient together to norm 1 and AdamW (lr 1e-4 x 2 images,
    weight decay 1e-2) over the new rows and the matrices."""
    g = torch.Generator().manual_seed(13)
    tok, te, unet, sched = load()
    words, inits = ["<v0>", "<v1>"], ["ktn", "pll"]
    tok.add_tokens(words)
    te.resize_token_embeddings(len(tok))
    table = te.get_input_embeddings().weight
    new = tok.convert_tokens_to_ids(words)
    with torch.no_grad():
        for w, c in zip(new, inits):
            table[w] = table[tok.encode(c, add_special_tokens=False)[0]].clone()
    rows_init = table[new].detach().clone()
    table.requires_grad_(True)

    tuned = custom_processors(unet, train_q_out=False, noise=g)

    prompts = ["photo of a <v0>", "close up photo of a <v1>"]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    z0, eps, t, masks = step_inputs(g, len(prompts))
    z_t = sched.add_noise(z0, eps, t)
    pred = unet(z_t, t, encoder_hidden_states=te(ids)[0]).sample
    loss = masked_mse(pred, eps, masks)
    loss.backward()
    # Only the new rows train (the source zeroes the other rows' gradients): they go to
    # the optimizer as a parameter of their own, with their gradient.
    rows = rows_init.clone().requires_grad_(True)
    rows.grad = table.grad[new].clone()
    params = [rows] + list(tuned.values())
    out.update({"cd.ids": ids.to(torch.int64), "cd.sample_of": torch.tensor([0, 1]), "cd.z_t": z_t,
                "cd.eps": eps, "cd.t": t.to(torch.int64), "cd.masks": masks, "cd.loss": loss.detach(),
                "cd.rows_init": rows_init, "cd.grad.rows": rows.grad.clone()})
    for path, w in tuned.items():
        out[f"cd.{path}"] = w.detach().clone()
        out[f"cd.grad.{path}"] = w.grad.clone()
    out["cd.grad_norm"] = torch.nn.utils.clip_grad_norm_(params, 1.0).detach()
    opt = torch.optim.AdamW(params, lr=1e-4 * 2, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    opt.step()
    out["cd.rows_after"] = rows.detach().clone()
    for path, w in tuned.items():
        out[f"cd.after.{path}"] = w.detach().clone()


def record_up_cross_attention(unet):
    """A list that collects (probabilities, heads) of every up-block cross-attention in
    forward order, as CLiC's store does."""
    maps = []
    for mname, m in unet.named_modules():
        if mname.startswith("up_blocks") and mname.endswith("attn2"):
            orig, heads = m.get_attention_scores, m.heads
            m.get_attention_scores = (lambda q, k, mask=None, orig=orig, heads=heads:
                                      maps.append((orig(q, k, mask), heads)) or maps[-1][0])
    return maps


def clic_terms(pred, eps, mask, maps, word):
    """CLiC's losses of one image (pred[:1]) and its masked copy (pred[1:]) against noise
    `eps`: L_att from the first image's `word` maps (bilinear to the latent grid, averaged,
    min-max normalised) against the bilinear `mask`, L_context with the background at 0.25,
    L_RoI, and 0.25 / 0.5 / 0.25 of them."""
    latent = pred.shape[-1]
    att_mask = F.interpolate(mask, size=(latent, latent), mode="bilinear", align_corners=False)
    resized = []
    for probs, heads in maps:
        q = probs.shape[1]
        side = int(round(q ** 0.5))
        m = probs.reshape(2, heads, q, -1)[:1].mean(1)[:, :, word].reshape(1, 1, side, side)
        resized.append(F.interpolate(m, size=(latent, latent), mode="bilinear", align_corners=False))
    att = torch.stack(resized).mean(0)
    att = (att - att.min()) / (att.max() - att.min())
    l_att = F.mse_loss(att, att_mask)
    cmask = att_mask.clone()
    cmask[cmask < 0.05] = 0.25

    def weighted(p, m):
        e = F.mse_loss(p, eps, reduction="none")
        return ((e * m).sum([1, 2, 3]) / (m.sum([1, 2, 3]) + 1e-10)).mean()
    l_ctx, l_roi = weighted(pred[:1], cmask), weighted(pred[1:], att_mask)
    return l_att, l_ctx, l_roi, 0.25 * l_att + 0.5 * l_ctx + 0.25 * l_roi


def clic(out):
    """CLiC's learning.py ("style" mode), one optimizer step: Custom Diffusion's processors
    with q/k/v/out of every cross-attention trained (train_q_out, the out bias too), from
    their base weights; rows from "ktn", "pll"; one image prompted "a photo of <v0>" and its
    masked copy (grey outside the mask) prompted "<v0> on a blank background", the same
    noise and timestep, one U-Net pass over both. L_att: the word's head-averaged maps of
    every up-block cross-attention of the first image, bilinear to the latent grid,
    averaged, min-max normalised, MSE against the bilinear mask; L_context and L_RoI as the
    source weighs them; 0.25 / 0.5 / 0.25. Then every gradient clipped together to 1 and
    AdamW (lr 5e-5, weight decay 0.1)."""
    g = torch.Generator().manual_seed(15)
    tok, te, unet, sched = load()
    words, inits = ["<v0>", "<v1>"], ["ktn", "pll"]
    tok.add_tokens(words)
    te.resize_token_embeddings(len(tok))
    table = te.get_input_embeddings().weight
    new = tok.convert_tokens_to_ids(words)
    with torch.no_grad():
        for w, c in zip(new, inits):
            table[w] = table[tok.encode(c, add_special_tokens=False)[0]].clone()
    rows_init = table[new].detach().clone()
    table.requires_grad_(True)

    tuned = custom_processors(unet, train_q_out=True)
    maps = record_up_cross_attention(unet)

    prompts = ["a photo of <v0>", "<v0> on a blank background"]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    z0, eps1, t1, masks = step_inputs(g, 2)
    eps = torch.cat([eps1[:1], eps1[:1]])
    t = torch.cat([t1[:1], t1[:1]])
    z_t = sched.add_noise(z0, eps, t)
    pred = unet(z_t, t, encoder_hidden_states=te(ids)[0]).sample.float()
    mask = masks[:1]
    l_att, l_ctx, l_roi, loss = clic_terms(pred, eps[:1], mask, maps, ids[0].tolist().index(new[0]))
    loss.backward()
    rows = rows_init.clone().requires_grad_(True)
    rows.grad = table.grad[new].clone()
    params = [rows] + list(tuned.values())
    out.update({"clic.ids": ids[:1].to(torch.int64), "clic.roi_ids": ids[1:].to(torch.int64),
                "clic.z_t": z_t, "clic.eps": eps, "clic.t": t.to(torch.int64), "clic.masks": mask,
                "clic.loss": loss.detach(), "clic.l_att": l_att.detach(), "clic.l_ctx": l_ctx.detach(),
                "clic.l_roi": l_roi.detach(), "clic.rows_init": rows_init, "clic.grad.rows": rows.grad.clone()})
    for name, w in tuned.items():
        out[f"clic.grad.{name}"] = w.grad.clone()
    out["clic.grad_norm"] = torch.nn.utils.clip_grad_norm_(params, 1.0).detach()
    opt = torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.999), weight_decay=0.1, eps=1e-8)
    opt.step()
    out["clic.rows_after"] = rows.detach().clone()
    for name, w in tuned.items():
        out[f"clic.after.{name}"] = w.detach().clone()


def custom_diffusion_rescale(out):
    """The scale augmentation of train_custom_diffusion.py's dataset (`preprocess`) on a
    64 px image with a latent factor of 8: PIL's bilinear resize to the drawn side, then
    placed on a zero canvas (a valid-region mask one latent cell inside the image) or
    cropped (mask all ones). One shrunk, one enlarged and one equal side."""
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(14)
    size, factor = 64, 8
    img = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    out["rescale.image"] = torch.from_numpy(img.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()
    for k, (side, top, left) in enumerate([(30, 7, 21), (83, 11, 4), (64, 0, 0)]):
        outer, inner = (side, size) if side > size else (size, side)
        assert 0 <= top <= outer - inner and 0 <= left <= outer - inner
        resized = np.array(Image.fromarray(img).resize((side, side), resample=Image.BILINEAR))
        resized = (resized / 127.5 - 1.0).astype(np.float32)
        canvas = np.zeros((size, size, 3), dtype=np.float32)
        mask = np.zeros((size // factor, size // factor))
        if side > size:
            canvas = resized[top:top + inner, left:left + inner, :]
            mask = np.ones((size // factor, size // factor))
        else:
            canvas[top:top + inner, left:left + inner, :] = resized
            mask[top // factor + 1:(top + side) // factor - 1, left // factor + 1:(left + side) // factor - 1] = 1.0
        out[f"rescale.{k}.args"] = torch.tensor([side, top, left])
        out[f"rescale.{k}.pixels"] = torch.from_numpy(np.ascontiguousarray(canvas)).permute(2, 0, 1).contiguous()
        out[f"rescale.{k}.mask"] = torch.from_numpy(mask.astype(np.float32))


def main():
    out = {}
    textual_inversion(out)
    dreambooth(out)
    dreambooth_prior(out)
    v_prediction(out)
    custom_diffusion(out)
    custom_diffusion_rescale(out)
    clic(out)
    save_file({k: v.detach().contiguous() for k, v in out.items()}, os.path.join(ROOT, "method_steps.safetensors"))
    print("wrote", os.path.abspath(os.path.join(ROOT, "method_steps.safetensors")))


if __name__ == "__main__":
    main()
