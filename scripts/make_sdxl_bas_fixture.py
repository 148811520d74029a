#!/usr/bin/env python3
"""One Break-A-Scene phase-2 step on the tiny SDXL model, with `--phase2-lora` and as the
full fine-tune, as PyTorch computes it (run by hand).

    python scripts/make_sdxl_bas_fixture.py      # after make_sdxl_fixtures.py

make_bas_fixture.py's step (the masked diffusion loss of two instance images, each with
its own word; the prior loss of a "a photo at the beach" class image, learned whole; the
attention loss summed over the two words, each word's map over its max against its
nearest mask), with this project's `--phase2-lora` in place of the full fine-tune and on
SDXL:

- "<v0>", "<v1>" in both tokenizers with rows 0.1 N(0, 1) in each encoder's table
  (make_sdxl_ti_fixture.add_words), the tables requiring grad;
- peft LoRA r 4, alpha 4 (alpha = rank) on every layer MagicTailor adapts, A and B set to
  0.3 N(0, 1) in sorted name order;
- SDXL's conditioning (make_sdxl_tuned_fixture.conditioning);
- L_attn's maps: SDXL's latent/4 level, every transformer layer of down_blocks.2 and
  up_blocks.0 (make_sdxl_magictailor_fixture's).

Saves tests/fixtures/sdxl/bas_lora_step.safetensors: the inputs (ids_1, ids_2, z_t, eps,
t, masks, rows_1, rows_2), `loss`, `l_diff`, `l_prior`, `l_attn`, both rows' gradients
(`grad_1`, `grad_2`) and every adapter with its gradients (`{path}.A|B`,
`grad.{path}.A|B`). Nothing is shared with the Rust side.

And tests/fixtures/sdxl/bas_full_step.safetensors: the same step with every U-Net and
text-encoder weight of both encoders trainable (no adapters): the same inputs and terms,
and the gradient of every weight as `grad.unet.<key>`, `grad.text_encoder.<key>`,
`grad.text_encoder_2.<key>` (the files' keys; each token table's gradient as the base's
rows, the new words' in `grad_1`, `grad_2`).

Versions used for the committed fixture: tests/fixtures/VERSIONS.txt.
"""
import os

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from make_method_fixtures import masked_mse, step_inputs
from make_parity_fixtures import ProbsRecorder
from make_sdxl_magictailor_fixture import ATTN_BLOCKS, seeded_lora
from make_sdxl_ti_fixture import MODEL
from make_sdxl_tuned_fixture import conditioning, prepared

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "sdxl")
PROMPTS = ["a photo of <v0>", "a photo of <v1>", "a photo at the beach"]
LAMBDA_PRIOR, LAMBDA_ATTN = 1.0, 1e-2
torch.set_num_threads(2)


def step(full):
    g, parts, (new_1, rows_1, table_1), (new_2, rows_2, table_2) = prepared(61)
    unet, sched = parts[4], parts[5]
    te_1, te_2 = parts[2], parts[3]
    if full:
        lora = {}
        for m in (unet, te_1, te_2):
            m.requires_grad_(True)
    else:
        lora = seeded_lora(unet, g)
    store = {}
    unet.set_attn_processor({n: ProbsRecorder(n.removesuffix(".processor"), store) for n in unet.attn_processors})

    ids_1, ids_2, hidden, cond = conditioning(parts, PROMPTS)
    word_pos = [ids_1[i].tolist().index(new_1[i]) for i in range(2)]
    z0, eps, t, masks = step_inputs(g, 3)
    masks[2] = 1.0  # the class image is learned whole
    z_t = sched.add_noise(z0, eps, t)

    pred = unet(z_t, t, hidden, added_cond_kwargs=cond).sample.float()
    l_diff = masked_mse(pred[:2], eps[:2], masks[:2])
    l_prior = F.mse_loss(pred[2], eps[2].float(), reduction="mean")
    maps = [m for n, m in store.items() if n.startswith(ATTN_BLOCKS)]
    assert len(maps) == 10, list(store)
    agg = torch.stack(maps).mean(0)  # [3, 4, 77], heads already averaged
    l_attn = 0
    for i in range(2):
        col = agg[i, :, word_pos[i]]
        gt = F.interpolate(masks[i : i + 1], size=(2, 2), mode="nearest").flatten()
        l_attn = l_attn + F.mse_loss(col / col.max(), gt, reduction="mean")
    loss = l_diff + LAMBDA_PRIOR * l_prior + LAMBDA_ATTN * l_attn
    loss.backward()

    out = {"ids_1": ids_1.to(torch.int64), "ids_2": ids_2.to(torch.int64), "z_t": z_t, "eps": eps,
           "t": t.to(torch.int64), "masks": masks, "rows_1": rows_1, "rows_2": rows_2, "loss": loss,
           "l_diff": l_diff, "l_prior": l_prior, "l_attn": l_attn,
           "grad_1": table_1.grad[new_1], "grad_2": table_2.grad[new_2]}
    for name, (a, b) in lora.items():
        out[f"{name}.A"], out[f"{name}.B"] = a, b
        out[f"grad.{name}.A"], out[f"grad.{name}.B"] = a.grad, b.grad
    if full:
        for sub, fname, m, new in [("unet", "diffusion_pytorch_model.safetensors", unet, None),
                                   ("text_encoder", "model.safetensors", te_1, new_1),
                                   ("text_encoder_2", "model.safetensors", te_2, new_2)]:
            # A weight no loss reads (the first encoder's last layer: SDXL takes its
            # penultimate states) has no gradient: zeros.
            grads = {f"grad.{sub}.{n}": torch.zeros_like(p) if p.grad is None else p.grad
                     for n, p in m.named_parameters()}
            print(sub, "weights without a gradient:",
                  sorted(n for n, p in m.named_parameters() if p.grad is None))
            if new is not None:  # the table as the base's rows; the words' are grad_1, grad_2
                key = next(k for k in grads if k.endswith("embeddings.token_embedding.weight"))
                grads[key] = grads[key][: min(new)]
            with safe_open(os.path.join(MODEL, sub, fname), "pt") as f:
                assert set(f.keys()) == {k[len(f"grad.{sub}."):] for k in grads}, sub
            out.update(grads)
    name = "bas_full_step" if full else "bas_lora_step"
    path = os.path.join(ROOT, f"{name}.safetensors")
    save_file({k: v.detach().clone().contiguous() for k, v in out.items()}, path)
    print(f"loss {loss.item():.8f} l_diff {l_diff.item():.8f} l_prior {l_prior.item():.8f} "
          f"l_attn {l_attn.item():.8f}; word positions {word_pos}; adapters {len(lora)}; wrote {path}")


def main():
    step(full=False)
    step(full=True)


if __name__ == "__main__":
    main()
