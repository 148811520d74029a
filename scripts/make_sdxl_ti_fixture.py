#!/usr/bin/env python3
"""One SDXL textual-inversion step on the tiny SDXL model, as PyTorch computes it (run by hand).

    python scripts/make_sdxl_ti_fixture.py      # after make_sdxl_fixtures.py

The step of diffusers' examples/textual_inversion/textual_inversion_sdxl.py (the version
that trains both encoders' tables), with the MagicTailor paper's masked loss in place of
the plain MSE, on tests/fixtures/sdxl/tiny-sdxl (64 px images, 8x8 latents):

- "<v0>", "<v1>" added to both tokenizers, both text encoders' tables resized
  (mean_resizing=False) and the two new rows of each set to 0.1 N(0, 1) (`rows_1`,
  `rows_2`); the whole tables require grad, every other weight is frozen.
- Two images, "a photo of <v0>" and "a photo of <v1>", each tokenizer padding to 77.
- Conditioning as the script builds it: both encoders' penultimate hidden states side
  by side (`hidden`), text_encoder_2's projected pooled output (`pooled`, output[0]) as
  `text_embeds`, and `time_ids` (original size, crop top-left, target size) = 64 64 0 0 64 64.
- The loss: ((pred - eps) * M)^2 averaged over every latent element, M the masks
  nearest-resized to the latent grid (make_method_fixtures.py's masked_mse); backward.

Saves tests/fixtures/sdxl/ti_step.safetensors: the inputs (ids_1, ids_2, z_t, eps, t,
masks, rows_1, rows_2, time_ids), `loss`, the new rows' gradients (`grad_1`, `grad_2`),
and `hidden` and `pooled` to localise a mismatch. Nothing is shared with the Rust side.

Versions used for the committed fixture: tests/fixtures/VERSIONS.txt.
"""
import os

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

from make_method_fixtures import masked_mse, step_inputs  # the same inputs and loss
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "sdxl")
MODEL = os.path.join(ROOT, "tiny-sdxl")
WORDS = ["<v0>", "<v1>"]
PROMPTS = ["a photo of <v0>", "a photo of <v1>"]
SIZE = 64
torch.set_num_threads(2)


def add_words(tok, te, g):
    """The placeholder words in one tokenizer, its encoder's table resized, the new rows
    set to 0.1 N(0, 1); returns the new ids, the rows and the table (requiring grad)."""
    assert tok.add_tokens(WORDS) == len(WORDS)
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    table = te.get_input_embeddings().weight
    new = tok.convert_tokens_to_ids(WORDS)
    rows = 0.1 * torch.randn(len(WORDS), table.shape[1], generator=g)
    with torch.no_grad():
        table[new] = rows
    table.requires_grad_(True)
    return new, rows, table


def load_sdxl():
    """The tiny SDXL pipeline's parts in f32, frozen: both tokenizers and text encoders, the
    U-Net and the training scheduler."""
    tok_1 = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    tok_2 = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer_2")
    te_1 = CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder", torch_dtype=torch.float32)
    te_2 = CLIPTextModelWithProjection.from_pretrained(MODEL, subfolder="text_encoder_2", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet", torch_dtype=torch.float32)
    sched = DDPMScheduler.from_pretrained(MODEL, subfolder="scheduler")
    for m in (te_1, te_2, unet):
        m.requires_grad_(False)
        m.eval()
    return tok_1, tok_2, te_1, te_2, unet, sched


def main():
    g = torch.Generator().manual_seed(41)
    tok_1, tok_2, te_1, te_2, unet, sched = load_sdxl()

    new_1, rows_1, table_1 = add_words(tok_1, te_1, g)
    new_2, rows_2, table_2 = add_words(tok_2, te_2, g)

    def ids(tok):
        return tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    ids_1, ids_2 = ids(tok_1), ids(tok_2)
    z0, eps, t, masks = step_inputs(g, len(PROMPTS))
    z_t = sched.add_noise(z0, eps, t)

    h1 = te_1(ids_1, output_hidden_states=True).hidden_states[-2]
    out2 = te_2(ids_2, output_hidden_states=True)
    h2 = out2.hidden_states[-2]
    pooled = out2[0]
    assert torch.equal(pooled, out2.text_embeds)
    hidden = torch.cat([h1, h2], dim=-1)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * len(PROMPTS), dtype=torch.float32)

    pred = unet(z_t, t, hidden, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    loss = masked_mse(pred, eps, masks)
    loss.backward()
    grad_1, grad_2 = table_1.grad[new_1].clone(), table_2.grad[new_2].clone()

    print("loss", loss.item())
    print("new ids: tokenizer", new_1, "tokenizer_2", new_2)
    print("pad ids: tokenizer", tok_1.pad_token_id, repr(tok_1.pad_token), "tokenizer_2", tok_2.pad_token_id,
          repr(tok_2.pad_token), "; eos ids", tok_1.eos_token_id, tok_2.eos_token_id,
          "; text_encoder_2 config eos", te_2.config.eos_token_id)
    for i, p in enumerate(PROMPTS):
        print(f"{p!r}: ids_1[:8] {ids_1[i, :8].tolist()} ids_2[:8] {ids_2[i, :8].tolist()}")
        eos_at = (ids_2[i] == te_2.config.eos_token_id).int().argmax().item()
        print(f"    tokenizer_2 tail {ids_2[i, eos_at - 1:eos_at + 3].tolist()} (first eos at {eos_at})")
    print("grad norms: grad_1", grad_1.norm(dim=1).tolist(), "grad_2", grad_2.norm(dim=1).tolist())

    out = {
        "ids_1": ids_1.to(torch.int64), "ids_2": ids_2.to(torch.int64), "z_t": z_t, "eps": eps,
        "t": t.to(torch.int64), "masks": masks, "rows_1": rows_1, "rows_2": rows_2, "time_ids": time_ids,
        "loss": loss.detach(), "grad_1": grad_1, "grad_2": grad_2, "hidden": hidden.detach(),
        "pooled": pooled.detach(),
    }
    path = os.path.join(ROOT, "ti_step.safetensors")
    save_file({k: v.detach().contiguous() for k, v in out.items()}, path)
    print("wrote", os.path.abspath(path))


if __name__ == "__main__":
    main()
