#!/usr/bin/env python3
"""One MagicTailor warm-up step and one DS-Bal step on the tiny SDXL model, as PyTorch
computes them from the paper's formulas (run by hand).

    python scripts/make_sdxl_magictailor_fixture.py      # after make_sdxl_fixtures.py

On tests/fixtures/sdxl/tiny-sdxl (64 px images, 8x8 latents), as training_step_fixture in
make_parity_fixtures.py does on SD 2.x, with SDXL's conditioning:

- "<v0>", "<v1>" in both tokenizers, with rows 0.1 N(0, 1) in each encoder's table
  (make_sdxl_ti_fixture.add_words); the tables require grad.
- peft LoRA r 4, alpha 4 on every layer MagicTailor adapts (q/k/v/out of both attentions,
  proj_in, proj_out, ff.net.2); A and B set to 0.3 N(0, 1) in sorted name order.
- Three images: "a photo of <v0>" twice and "a photo of <v1>" (samples 0, 0, 1).
- Conditioning: both encoders' penultimate states side by side, text_encoder_2's pooled
  projection, time_ids 64 64 0 0 64 64 (make_sdxl_ti_fixture's).
- L_attn on SDXL's latent/4 level (2x2 here): the head-averaged cross-attention maps of
  every transformer layer of down_blocks.2 and up_blocks.0 (2 x 2 + 3 x 2 = 10 maps; the
  mid block, also at that level, left out as on SD 2.x), averaged; each image's word
  column max-normalised against its mask nearest-resized to 2x2 (docs/method.md, eq. 6).
- Warm-up loss = mean masked L_diff + 0.01 L_attn; backward.
- DS-Bal: momentum adapters = online + 0.05 N(0, 1); per-sample masked losses, the
  largest one chosen, L_pres (eq. 8) over the other sample against the momentum U-Net's
  prediction on the same (detached) conditioning.

Saves tests/fixtures/sdxl/magictailor_step.safetensors: the inputs (ids_1, ids_2, z_t,
eps, t, masks, rows_1, rows_2), per_image, l_attn, l_diff, loss, the rows' gradients
(grad_1, grad_2), for every adapted module `{path}.A`, `{path}.B`, `grad.{path}.A|B`,
`mom.{path}.A|B`, and per_sample, chosen, l_diff_max, l_pres. Nothing is shared with the
Rust side.

Versions used for the committed fixture: tests/fixtures/VERSIONS.txt.
"""
import os

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from make_parity_fixtures import ProbsRecorder, TARGETS
from make_sdxl_ti_fixture import SIZE, add_words, load_sdxl

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "sdxl")
PROMPTS, SAMPLE_OF = ["a photo of <v0>", "a photo of <v0>", "a photo of <v1>"], [0, 0, 1]
# SDXL's latent/4 level: the blocks whose cross-attention queries are 2x2 at 8x8 latents.
ATTN_BLOCKS = ("down_blocks.2.", "up_blocks.0.")
torch.set_num_threads(2)


def seeded_lora(unet, g):
    """peft LoRA r 4, alpha 4 on every layer MagicTailor adapts, A and B set to 0.3 N(0, 1)
    from `g` in sorted module order, trainable; returns (A, B) by module name."""
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    mods = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    lora = {}
    with torch.no_grad():
        for name in sorted(mods):
            a, b = mods[name].lora_A["default"].weight, mods[name].lora_B["default"].weight
            for p in (a, b):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
                p.requires_grad_(True)
            lora[name] = (a, b)
    return lora


def main():
    g = torch.Generator().manual_seed(47)
    tok_1, tok_2, te_1, te_2, unet, sched = load_sdxl()
    new_1, rows_1, table_1 = add_words(tok_1, te_1, g)
    new_2, rows_2, table_2 = add_words(tok_2, te_2, g)

    lora = seeded_lora(unet, g)

    def ids(tok):
        return tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    ids_1, ids_2 = ids(tok_1), ids(tok_2)
    token_pos = [ids_1[i].tolist().index(new_1[s]) for i, s in enumerate(SAMPLE_OF)]
    b = len(PROMPTS)
    z0, eps = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    t = torch.tensor([50, 400, 900])
    masks = torch.zeros(b, 1, SIZE, SIZE)
    for i, (y0, y1, x0, x1) in enumerate([(8, 40, 16, 56), (20, 64, 0, 30), (0, 24, 10, 50)]):
        masks[i, :, y0:y1, x0:x1] = 1
    z_t = sched.add_noise(z0, eps, t)

    h1 = te_1(ids_1, output_hidden_states=True).hidden_states[-2]
    out2 = te_2(ids_2, output_hidden_states=True)
    hidden, pooled = torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2[0]
    cond = {"text_embeds": pooled, "time_ids": torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * b, dtype=torch.float32)}

    store = {}
    unet.set_attn_processor({n: ProbsRecorder(n.removesuffix(".processor"), store) for n in unet.attn_processors})
    pred = unet(z_t, t, hidden, added_cond_kwargs=cond).sample
    m_lat = F.interpolate(masks, size=(8, 8), mode="nearest")
    m_att = F.interpolate(masks, size=(2, 2), mode="nearest").flatten(1)
    per_image = ((pred - eps) * m_lat).pow(2).flatten(1).mean(1)
    maps = [m for n, m in store.items() if n.startswith(ATTN_BLOCKS)]
    assert len(maps) == 10 and all(m.shape[1] == 4 for m in maps), list(store)
    mean = torch.stack(maps).mean(0)
    own = mean[torch.arange(b), :, token_pos]
    own = own / own.max(dim=1, keepdim=True).values
    l_attn = (own - m_att).pow(2).mean()
    l_diff = per_image.mean()
    loss = l_diff + 0.01 * l_attn
    loss.backward()

    out = {"ids_1": ids_1.to(torch.int64), "ids_2": ids_2.to(torch.int64), "token_pos": torch.tensor(token_pos),
           "z_t": z_t, "eps": eps, "t": t.to(torch.int64), "masks": masks, "rows_1": rows_1, "rows_2": rows_2,
           "per_image": per_image, "l_attn": l_attn, "l_diff": l_diff, "loss": loss,
           "grad_1": table_1.grad[new_1].clone(), "grad_2": table_2.grad[new_2].clone()}
    momentum = {}
    for name, (a, bb) in lora.items():
        out[f"{name}.A"], out[f"{name}.B"] = a, bb
        out[f"grad.{name}.A"], out[f"grad.{name}.B"] = a.grad.clone(), bb.grad.clone()
        momentum[name] = (a.detach() + 0.05 * torch.randn(a.shape, generator=g),
                          bb.detach() + 0.05 * torch.randn(bb.shape, generator=g))
        out[f"mom.{name}.A"], out[f"mom.{name}.B"] = momentum[name]

    # DS-Bal: the largest per-sample loss, and L_pres against the momentum adapters.
    per_sample = torch.stack([per_image[[0, 1]].mean(), per_image[[2]].mean()])
    chosen = int(per_sample.argmax())
    with torch.no_grad():
        online = {n: (a.clone(), bb.clone()) for n, (a, bb) in lora.items()}
        for n, (a, bb) in lora.items():
            a.copy_(momentum[n][0])
            bb.copy_(momentum[n][1])
        mpred = unet(z_t, t, hidden.detach(), added_cond_kwargs={k: v.detach() for k, v in cond.items()}).sample
        for n, (a, bb) in lora.items():
            a.copy_(online[n][0])
            bb.copy_(online[n][1])
    pres_img = ((pred - mpred) * m_lat).pow(2).flatten(1).mean(1)
    pres_sample = torch.stack([pres_img[[0, 1]].mean(), pres_img[[2]].mean()])
    l_pres = torch.stack([pres_sample[s] for s in range(2) if s != chosen]).mean()
    out.update({"per_sample": per_sample, "chosen": torch.tensor(chosen), "l_diff_max": per_sample[chosen],
                "l_pres": l_pres})

    print("loss", loss.item(), "l_diff", l_diff.item(), "l_attn", l_attn.item())
    print("adapted modules", len(lora), "maps", len(maps), "token_pos", token_pos)
    print("per_sample", per_sample.tolist(), "chosen", chosen, "l_pres", l_pres.item())
    path = os.path.join(ROOT, "magictailor_step.safetensors")
    save_file({k: v.detach().clone().contiguous() for k, v in out.items()}, path)
    print("keys", len(out), "wrote", os.path.abspath(path))


if __name__ == "__main__":
    main()
