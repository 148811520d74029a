#!/usr/bin/env python3
"""One Custom Diffusion step and one CLiC step on the tiny SDXL model, as PyTorch computes
them (run by hand).

    python scripts/make_sdxl_tuned_fixture.py      # after make_sdxl_fixtures.py

The steps of make_method_fixtures.py's custom_diffusion() and clic() (diffusers' Custom
Diffusion processors; CLiC's losses as its authors' learning.py computes them), on
tests/fixtures/sdxl/tiny-sdxl with SDXL's conditioning (make_sdxl_ti_fixture's: both
encoders' penultimate states side by side, text_encoder_2's pooled projection, time_ids
64 64 0 0 64 64), up to the gradients (the optimizer step is the SD 2.x fixtures'):

- "<v0>", "<v1>" in both tokenizers with rows 0.1 N(0, 1) in each encoder's table.
- Custom Diffusion: every cross-attention's key and value matrices tuned, at their base
  plus 0.05 N(0, 1); "photo of a <v0>" and "close up photo of a <v1>"; the masked MSE.
- CLiC: q/k/v/out (and the out bias) of every cross-attention tuned, from their base;
  "a photo of <v0>" and its masked copy's "<v0> on a blank background", the same noise
  and timestep; L_att on every up-block cross-attention layer (up_blocks.0 and .1 here),
  L_context and L_RoI; 0.25 / 0.5 / 0.25.

Saves tests/fixtures/sdxl/tuned_steps.safetensors, each method's tensors under its prefix
(`cd.`, `clic.`): the inputs (ids_1, ids_2, z_t, eps, t, masks; CLiC's first row of ids is
the image's, the second the masked copy's), rows_1, rows_2, the loss terms, the rows'
gradients (grad_1, grad_2), and every tuned tensor and its gradient by its diffusers path
(`{path}`, `grad.{path}`). Nothing is shared with the Rust side.

Versions used for the committed fixture: tests/fixtures/VERSIONS.txt.
"""
import os

import torch
from safetensors.torch import save_file

from make_method_fixtures import clic_terms, custom_processors, masked_mse, record_up_cross_attention, step_inputs
from make_sdxl_ti_fixture import SIZE, add_words, load_sdxl

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "sdxl")
torch.set_num_threads(2)


def prepared(seed):
    """The tiny SDXL with both words in both encoders; the generator, the parts, and each
    encoder's (new ids, rows, table)."""
    g = torch.Generator().manual_seed(seed)
    tok_1, tok_2, te_1, te_2, unet, sched = load_sdxl()
    return g, (tok_1, tok_2, te_1, te_2, unet, sched), add_words(tok_1, te_1, g), add_words(tok_2, te_2, g)


def conditioning(parts, prompts):
    """Both tokenizers' ids of `prompts`, the U-Net's text features and added conditioning."""
    tok_1, tok_2, te_1, te_2 = parts[:4]
    ids_1, ids_2 = (tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                    for tok in (tok_1, tok_2))
    h1 = te_1(ids_1, output_hidden_states=True).hidden_states[-2]
    out2 = te_2(ids_2, output_hidden_states=True)
    hidden = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * len(prompts), dtype=torch.float32)
    return ids_1, ids_2, hidden, {"text_embeds": out2[0], "time_ids": time_ids}


def save_step(out, prefix, inputs, words_1, words_2, tuned, **terms):
    """The step's inputs, loss terms, the rows' and the tuned tensors' gradients."""
    (new_1, rows_1, table_1), (new_2, rows_2, table_2) = words_1, words_2
    ids_1, ids_2, z_t, eps, t, masks = inputs
    values = {"ids_1": ids_1.to(torch.int64), "ids_2": ids_2.to(torch.int64), "z_t": z_t, "eps": eps,
              "t": t.to(torch.int64), "masks": masks, "rows_1": rows_1, "rows_2": rows_2,
              "grad_1": table_1.grad[new_1], "grad_2": table_2.grad[new_2], **terms}
    for path, w in tuned.items():
        values[path], values[f"grad.{path}"] = w, w.grad
    out.update({f"{prefix}.{k}": v.detach().clone().contiguous() for k, v in values.items()})
    print(prefix, {k: round(v.item(), 6) for k, v in terms.items()}, "tuned", len(tuned))


def custom_diffusion(out):
    g, parts, words_1, words_2 = prepared(53)
    unet, sched = parts[4], parts[5]
    tuned = custom_processors(unet, train_q_out=False, noise=g)
    ids_1, ids_2, hidden, cond = conditioning(parts, ["photo of a <v0>", "close up photo of a <v1>"])
    z0, eps, t, masks = step_inputs(g, 2)
    z_t = sched.add_noise(z0, eps, t)
    loss = masked_mse(unet(z_t, t, hidden, added_cond_kwargs=cond).sample, eps, masks)
    loss.backward()
    save_step(out, "cd", (ids_1, ids_2, z_t, eps, t, masks), words_1, words_2, tuned, loss=loss)


def clic(out):
    g, parts, words_1, words_2 = prepared(59)
    unet, sched = parts[4], parts[5]
    tuned = custom_processors(unet, train_q_out=True)
    maps = record_up_cross_attention(unet)
    ids_1, ids_2, hidden, cond = conditioning(parts, ["a photo of <v0>", "<v0> on a blank background"])
    z0, eps1, t1, masks = step_inputs(g, 2)
    eps, t = torch.cat([eps1[:1], eps1[:1]]), torch.cat([t1[:1], t1[:1]])
    z_t = sched.add_noise(z0, eps, t)
    pred = unet(z_t, t, hidden, added_cond_kwargs=cond).sample.float()
    assert len(maps) == 3 * 2 + 3 * 2, len(maps)  # up_blocks.0 and .1: 3 attentions x 2 layers each
    word = ids_1[0].tolist().index(words_1[0][0])
    l_att, l_ctx, l_roi, loss = clic_terms(pred, eps[:1], masks[:1], maps, word)
    loss.backward()
    save_step(out, "clic", (ids_1, ids_2, z_t, eps, t, masks[:1]), words_1, words_2, tuned,
              loss=loss, l_att=l_att, l_ctx=l_ctx, l_roi=l_roi)


def main():
    out = {}
    custom_diffusion(out)
    clic(out)
    path = os.path.join(ROOT, "tuned_steps.safetensors")
    save_file(out, path)
    print("keys", len(out), "wrote", os.path.abspath(path))


if __name__ == "__main__":
    main()
