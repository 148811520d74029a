#!/usr/bin/env python3
"""One SDXL DreamBooth-LoRA step on the tiny SDXL model, as PyTorch computes it (run by hand).

    python scripts/make_sdxl_dreambooth_fixture.py      # after make_sdxl_fixtures.py

The step of diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py (U-Net LoRA only,
text encoders frozen), with the MagicTailor paper's masked loss in place of the plain MSE,
on tests/fixtures/sdxl/tiny-sdxl (64 px images, 8x8 latents):

- peft LoRA on the U-Net: r 4, alpha 4, "gaussian" init, to_k/to_q/to_v/to_out.0 of every
  attention. Every lora_A is then set to N(0, 1)/r (peft's gaussian init) and every lora_B
  to 0.05 N(0, 1), from a seeded torch.Generator in sorted module order, so the file does
  not depend on peft's RNG and both matrices get gradients. Every other weight is frozen.
- One image prompted "a photo of sks person", each tokenizer padding to 77.
- Conditioning as the script builds it, without grad: both encoders' penultimate hidden
  states side by side, text_encoder_2's projected pooled output (output[0]) as
  `text_embeds`, and `time_ids` (original size, crop top-left, target size) = 64 64 0 0 64 64.
- The loss: ((pred - eps) * M)^2 averaged over every latent element, M the mask
  nearest-resized to the latent grid (make_method_fixtures.py's masked_mse); backward.

Saves tests/fixtures/sdxl/dreambooth_step.safetensors: the inputs (ids_1, ids_2, z_t, eps,
t, masks), `loss`, and for every adapted module, by its diffusers path (e.g.
`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`): `{path}.A` (lora_A weight,
[r, in]), `{path}.B` ([out, r]), `grad.{path}.A`, `grad.{path}.B` -- save_lora's naming in
make_method_fixtures.py without the method prefix. Nothing is shared with the Rust side.

Versions used for the committed fixture: tests/fixtures/VERSIONS.txt.
"""
import os

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from make_method_fixtures import masked_mse, step_inputs  # the same inputs and loss
from make_sdxl_ti_fixture import load_sdxl

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "sdxl")
PROMPT = "a photo of sks person"
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
RANK, ALPHA = 4, 4
SIZE = 64
torch.set_num_threads(2)


def main():
    g = torch.Generator().manual_seed(43)
    tok_1, tok_2, te_1, te_2, unet, sched = load_sdxl()

    # The adapter, then seeded values for both matrices (sorted module order: A, then B).
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TARGETS))
    mods = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    lora = {}
    with torch.no_grad():
        for name in sorted(mods):
            a, b = mods[name].lora_A["default"].weight, mods[name].lora_B["default"].weight
            assert mods[name].scaling["default"] == ALPHA / RANK
            a.copy_(torch.randn(a.shape, generator=g) / RANK)  # peft's "gaussian" init, seeded here
            b.copy_(0.05 * torch.randn(b.shape, generator=g))
            a.requires_grad_(True)
            b.requires_grad_(True)
            lora[name] = (a, b)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(lora) and all("lora_" in n for n in trainable)

    def ids(tok):
        return tok([PROMPT], padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    ids_1, ids_2 = ids(tok_1), ids(tok_2)
    assert ids_1.shape == ids_2.shape == (1, 77)
    z0, eps, t, masks = step_inputs(g, 1)
    z_t = sched.add_noise(z0, eps, t)

    with torch.no_grad():
        h1 = te_1(ids_1, output_hidden_states=True).hidden_states[-2]
        out2 = te_2(ids_2, output_hidden_states=True)
        h2 = out2.hidden_states[-2]
        pooled = out2[0]
        hidden = torch.cat([h1, h2], dim=-1)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)

    pred = unet(z_t, t, hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    loss = masked_mse(pred, eps, masks)
    loss.backward()

    print("loss", loss.item())
    print("adapted modules", len(lora))
    print("ids_1[:8]", ids_1[0, :8].tolist())
    print("ids_2[:8]", ids_2[0, :8].tolist())

    out = {
        "ids_1": ids_1.to(torch.int64), "ids_2": ids_2.to(torch.int64), "z_t": z_t, "eps": eps,
        "t": t.to(torch.int64), "masks": masks, "loss": loss.detach(),
    }
    for name, (a, b) in lora.items():
        assert a.grad is not None and b.grad is not None, name
        out[f"{name}.A"] = a.detach().clone()
        out[f"{name}.B"] = b.detach().clone()
        out[f"grad.{name}.A"] = a.grad.clone()
        out[f"grad.{name}.B"] = b.grad.clone()
    path = os.path.join(ROOT, "dreambooth_step.safetensors")
    save_file({k: v.detach().contiguous() for k, v in out.items()}, path)
    print("keys", len(out))
    print("wrote", os.path.abspath(path))


if __name__ == "__main__":
    main()
