#!/usr/bin/env python3
"""A reference Break-A-Scene phase-2 step (`train --method break-a-scene`), run by hand, not
by CI.

Break-A-Scene (Avrahami et al. 2023, github.com/google/break-a-scene, train.py) fine-tunes
the whole U-Net and text encoder in its second phase, with the masked diffusion loss, the
prior loss of a class image and the attention loss: each word's cross-attention map at
the coarse level (the source's 16x16 of a 64x64 latent, so latent/4; 2x2 on the tiny
model's 8x8) from the down and up blocks, divided by its max, against the word's mask.
Written here with torch, diffusers and transformers on the tiny model of
tests/fixtures/tiny-sd/, as this project adapts it: one word per instance image, so the
source's sum over an image's masks becomes a sum over the two images; the instance rows
come first and the class row last. Nothing here is shared with the Rust side: the test
compares two independent computations. Writes tests/fixtures/bas_step.safetensors
(inputs, the loss terms, the gradient of every parameter).

    pip install torch diffusers transformers safetensors
    python scripts/make_bas_fixture.py

Versions used for the committed fixture: tests/fixtures/VERSIONS.txt.
"""
import math
import os

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file

from make_method_fixtures import masked_mse, step_inputs  # the same inputs and loss
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
MODEL = os.path.join(ROOT, "tiny-sd")
torch.set_num_threads(2)
LAMBDA_PRIOR, LAMBDA_ATTN = 1.0, 1e-2


class Probe:
    """The source's P2PCrossAttnProcessor: diffusers' AttnProcessor that also keeps the
    probabilities (not detached: L_attn trains through them) where there are `queries`."""

    def __init__(self, store, queries):
        self.store, self.queries = store, queries

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
        assert attn.norm_cross is None and not attn.residual_connection and attn.rescale_output_factor == 1
        b, n, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, n, b)
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k, v = attn.head_to_batch_dim(attn.to_k(ctx)), attn.head_to_batch_dim(attn.to_v(ctx))
        probs = attn.get_attention_scores(q, k, attention_mask)
        if n == self.queries:
            self.store.append(probs.reshape(b, attn.heads, n, -1))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def main():
    g = torch.Generator().manual_seed(31)
    tok = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet")
    sched = DDPMScheduler.from_pretrained(MODEL, subfolder="scheduler")

    # Phase 1's outcome stands in as random rows for the two words; phase 2 then trains
    # every weight of both models, the whole table and the position embedding included.
    words = ["<v0>", "<v1>"]
    vocab = len(tok)
    tok.add_tokens(words)
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    new = tok.convert_tokens_to_ids(words)
    assert new == [vocab, vocab + 1], new
    table = te.get_input_embeddings().weight
    rows = 0.1 * torch.randn(2, table.shape[1], generator=g)
    with torch.no_grad():
        table[vocab:] = rows
    te.requires_grad_(True)
    unet.requires_grad_(True)

    # The source's attention store at latent/4 (two halvings, rounding up) in the down and
    # up blocks' cross-attentions; the mid block is left out, as in its aggregation.
    latent = 8
    side = math.ceil(math.ceil(latent / 2) / 2)
    maps, procs = [], {}
    for name, proc in unet.attn_processors.items():
        cross = name.endswith("attn2.processor") and name.startswith(("down_blocks", "up_blocks"))
        procs[name] = Probe(maps, side * side) if cross else proc
    unet.set_attn_processor(procs)

    prompts = ["a photo of <v0>", "a photo of <v1>", "a photo at the beach"]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    word_pos = [int((ids[i] == new[i]).nonzero().item()) for i in range(2)]
    z0, eps, t, masks = step_inputs(g, 3)
    masks[2] = 1.0  # the class image is learned whole
    z_t = sched.add_noise(z0, eps, t)

    pred = unet(z_t, t, encoder_hidden_states=te(ids)[0]).sample.float()
    l_diff = masked_mse(pred[:2], eps[:2], masks[:2])
    l_prior = F.mse_loss(pred[2], eps[2].float(), reduction="mean")

    # Heads, then layers, averaged (every layer here has the same heads, so this is the
    # source's flat mean); each word's column over its max against its nearest mask.
    agg = torch.stack([m.mean(1) for m in maps]).mean(0)  # [3, side*side, 77]
    l_attn = 0
    for i in range(2):
        col = agg[i, :, word_pos[i]].reshape(side, side)
        gt = F.interpolate(masks[i : i + 1], size=(side, side))[0, 0]
        l_attn = l_attn + F.mse_loss(col / col.max(), gt, reduction="mean")

    loss = l_diff + LAMBDA_PRIOR * l_prior + LAMBDA_ATTN * l_attn
    loss.backward()

    out = {"bas.ids": ids.to(torch.int64), "bas.z_t": z_t, "bas.eps": eps, "bas.t": t.to(torch.int64),
           "bas.masks": masks, "bas.rows": rows, "bas.loss": loss, "bas.l_diff": l_diff,
           "bas.l_prior": l_prior, "bas.l_attn": l_attn}
    out.update({f"bas.grad.unet.{n}": p.grad for n, p in unet.named_parameters()})
    out.update({f"bas.grad.text_encoder.{n}": p.grad for n, p in te.named_parameters()})
    # The table's gradient as the base's rows, the new words' apart.
    tkey = next(k for k in out if k.endswith("embeddings.token_embedding.weight"))
    out["bas.grad.rows"] = out[tkey][vocab:]
    out[tkey] = out[tkey][:vocab]

    # The names must be those of the files the Rust side loads.
    for sub, fname, prefix in [("unet", "diffusion_pytorch_model.safetensors", "bas.grad.unet."),
                               ("text_encoder", "model.safetensors", "bas.grad.text_encoder.")]:
        with safe_open(os.path.join(MODEL, sub, fname), "pt") as f:
            keys = set(f.keys())
        assert keys == {k[len(prefix):] for k in out if k.startswith(prefix)}, sub

    grads = {k: v for k, v in out.items() if k.startswith("bas.grad.")}
    zero = [k for k, v in grads.items() if v is None or not v.abs().sum() > 0]
    class_only = sorted(set(ids[2].tolist()) - set(ids[:2].flatten().tolist()))
    print("ids", new, "word positions", word_pos, "attn2 layers at", f"{side}x{side}:", len(maps),
          [m.shape[1] for m in maps])
    print(f"loss {loss.item():.8f} l_diff {l_diff.item():.8f} l_prior {l_prior.item():.8f}"
          f" l_attn {l_attn.item():.8f}")
    print("gradients", len(grads), "all-zero", zero)
    print("class-only token rows", class_only, "grad norms",
          [f"{table.grad[i].norm().item():.3e}" for i in class_only])
    print("new rows grad norms", [f"{r.norm().item():.3e}" for r in out["bas.grad.rows"]])
    path = os.path.join(ROOT, "bas_step.safetensors")
    save_file({k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
               for k, v in out.items()}, path)
    print("wrote", os.path.abspath(path), os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
