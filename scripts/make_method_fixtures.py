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
    from peft import LoraConfig

    g = torch.Generator().manual_seed(12)
    tok, te, unet, sched = load()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    lora = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for n, p in lora.items():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
            p.requires_grad_(True)
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
    for n, p in lora.items():
        module, which = n.split(".lora_")
        out[f"db.{module}.{which[0]}"] = p.detach().clone()
        out[f"db.grad.{module}.{which[0]}"] = p.grad.clone()


def main():
    out = {}
    textual_inversion(out)
    dreambooth(out)
    save_file({k: v.detach().contiguous() for k, v in out.items()}, os.path.join(ROOT, "method_steps.safetensors"))
    print("wrote", os.path.abspath(os.path.join(ROOT, "method_steps.safetensors")))


if __name__ == "__main__":
    main()
