#!/usr/bin/env python3
"""A reference ViCo training step (`train --method vico`), run by hand, not by CI.

ViCo (Hao et al. 2023, github.com/haoosz/ViCo) is built on the LDM codebase, not on
diffusers, so its step is written here from its authors' code with torch and diffusers'
U-Net on the tiny model of tests/fixtures/tiny-sd/: an image cross-attention block (an
LDM `BasicTransformerBlock` with its cross-attention onto the reference's tokens) after the
transformer block of the decoder's transformers with an even running id; the reference's
clean latent through the same U-Net first, its cross-attention map of the pseudo-word
thresholded with their 10-level Otsu into the keys' mask; the loss eps-MSE + 5e-4 L_reg.
Nothing here is shared with the Rust side: the test compares two independent computations.
Writes tests/fixtures/vico_step.safetensors (inputs, the blocks as initialised, the loss
terms, every gradient).

With `sdxl`, the same step on tests/fixtures/sdxl/tiny-sdxl (after make_sdxl_fixtures.py)
into tests/fixtures/sdxl/vico_step.safetensors: the sites are SDXL's decoder transformers
with an even running id (6, 8, 10), each block after its transformer's last layer and
masked by that layer's cross-attention map; the words have rows in both encoders (`rows`,
`rows_2`), and the U-Net gets SDXL's conditioning (both encoders' penultimate states, the
pooled projection, sizes 64 64 0 0 64 64) in both passes.

    pip install torch diffusers transformers safetensors
    python scripts/make_vico_fixture.py [sdxl]

Versions used for the committed fixture: tests/fixtures/VERSIONS.txt.
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
MODEL = os.path.join(ROOT, "tiny-sd")
torch.set_num_threads(2)

# The decoder transformers with an even running id: 8, 10, 12, 14 of SD's 16; 6, 8, 10 of
# SDXL's 11 (4 in the encoder, 1 in the middle, 6 in the decoder).
SITES = {"sd": ["up_blocks.1.attentions.1", "up_blocks.2.attentions.0", "up_blocks.2.attentions.2",
                "up_blocks.3.attentions.1"],
         "sdxl": ["up_blocks.0.attentions.1", "up_blocks.1.attentions.0", "up_blocks.1.attentions.2"]}


class CrossAttention(nn.Module):
    """LDM's CrossAttention: no q/k/v bias, an output bias, masked keys filled with the
    lowest float before the softmax."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        b, h = x.shape[0], self.heads
        split = lambda t: t.reshape(b, t.shape[1], h, -1).transpose(1, 2)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        sim = q @ k.transpose(-1, -2) * self.scale
        if mask is not None:
            sim = sim.masked_fill(~mask[:, None, None, :], -torch.finfo(sim.dtype).max)
        out = (sim.softmax(-1) @ v).transpose(1, 2).reshape(b, x.shape[1], -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim * 8)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class ImageCrossBlock(nn.Module):
    """The authors' `image_cross_attention`: an LDM BasicTransformerBlock whose attn2 reads
    the reference's tokens (context_dim None: the layer's width); torch's default init."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1, self.attn2 = CrossAttention(dim, heads), CrossAttention(dim, heads)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim), nn.Identity(), nn.Linear(dim * 4, dim))

    def forward(self, x, context, mask):
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context, mask=mask) + x
        return self.ff.net(self.norm3(x)) + x


def otsu(maps, levels=10):
    """The authors' `otsu`: per row, min-max normalised, the level t/10 with the largest
    between-class variance (strictly larger wins; an empty class gives NaN, which never
    wins), values below it 0, above it 1, equal ones left as they are."""
    norm = (maps - maps.min(-1, keepdim=True)[0]) / (maps.max(-1, keepdim=True)[0] - maps.min(-1, keepdim=True)[0])
    out = []
    for row in norm:
        best, cut = 0.0, 0.0
        for t in range(levels):
            low, high = row[row < t / levels], row[row >= t / levels]
            g = (low.numel() / row.numel()) * (high.numel() / row.numel()) * (low.mean() - high.mean()) ** 2
            if g > best:
                best, cut = g, t / levels
        r = row.clone()
        r[r < cut] = 0
        r[r > cut] = 1
        out.append(r)
    return torch.stack(out).bool()


class ViCo:
    """ViCo on a diffusers U-Net: an attention processor on the attn2 of each site's last
    transformer block that keeps the head-mean probabilities (the authors' `return_attn`),
    and a forward hook on that block. In the reference pass (`reference(...)`) the hook records the
    tokens, the Otsu mask of row i's map of its word (position `word_pos[i]`) and L_reg's
    term (against `eot_pos[i]`); in the drawn pass (`drawing()`) it puts row i through the
    site's block onto reference row i's tokens."""

    def __init__(self, unet, blocks):
        self.blocks, self.maps, self.tokens, self.masks, self.reg = blocks, {}, {}, {}, []
        self.mode, self.word_pos, self.eot_pos = "ref", None, None
        self.read = {s: f"{s}.transformer_blocks.{len(unet.get_submodule(s).transformer_blocks) - 1}.attn2"
                     for s in blocks}
        procs = {}
        for name, proc in unet.attn_processors.items():
            layer = name[: -len(".processor")]
            procs[name] = self._probe(layer) if layer in self.read.values() else proc
        unet.set_attn_processor(procs)
        for s in blocks:
            unet.get_submodule(s).transformer_blocks[-1].register_forward_hook(self._hook(s))

    def reference(self, word_pos, eot_pos):
        self.mode, self.word_pos, self.eot_pos, self.reg = "ref", word_pos, eot_pos, []

    def drawing(self):
        self.mode = "main"

    def _probe(self, layer):
        vico = self

        class Proc:
            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **_):
                b, n, _ = hidden_states.shape
                ctx = encoder_hidden_states
                split = lambda t: t.reshape(b, t.shape[1], attn.heads, -1).transpose(1, 2)
                q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(ctx)), split(attn.to_v(ctx))
                p = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
                if vico.mode == "ref":
                    vico.maps[layer] = p.mean(1).float()
                out = (p @ v).transpose(1, 2).reshape(b, n, -1)
                return attn.to_out[1](attn.to_out[0](out))

        return Proc()

    def _hook(self, site):
        def after_block(module, args, out):
            if self.mode == "ref":
                attn = self.maps[self.read[site]].transpose(1, 2)  # b, 77, n
                rows = torch.arange(out.shape[0], device=out.device)
                ph, eot = attn[rows, self.word_pos], attn[rows, self.eot_pos].detach()
                self.reg.append(F.mse_loss(ph / ph.max(-1, keepdim=True)[0], eot / eot.max(-1, keepdim=True)[0]))
                self.masks[site] = otsu(ph.detach())
                self.tokens[site] = out
                return out
            return self.blocks[site](out, self.tokens[site].to(out.dtype), self.masks[site])
        return after_block


def site_blocks(unet, sites):
    """A new block at each site, torch's default init."""
    blocks = {}
    for s in sites:
        t2d = unet.get_submodule(s)
        proj = t2d.proj_in
        dim = proj.out_features if isinstance(proj, nn.Linear) else proj.out_channels
        blocks[s] = ImageCrossBlock(dim, t2d.transformer_blocks[0].attn1.heads)
    return blocks


def with_rows(tok, te, words, g):
    """`words` in the tokenizer, with trainable rows 0.3 N(0, 1) that enter the encoder's
    table differentiably (the rest of it the frozen base); returns their ids and the rows."""
    tok.add_tokens(words)
    te.resize_token_embeddings(len(tok))
    new = tok.convert_tokens_to_ids(words)
    table = te.get_input_embeddings().weight
    rows = (0.3 * torch.randn(len(words), table.shape[1], generator=g)).requires_grad_(True)
    base = table.detach().clone()
    emb = te.get_input_embeddings()
    emb.forward = lambda x: F.embedding(x, torch.cat([base[: new[0]], rows], 0))
    return new, rows


def main(family):
    g = torch.Generator().manual_seed(24)
    model = MODEL if family == "sd" else os.path.join(ROOT, "sdxl", "tiny-sdxl")
    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for m in (te, unet):
        m.requires_grad_(False)

    # Two samples' words, their rows trainable; each image's prompt names its own word.
    words = ["<v0>", "<v1>"]
    new, rows = with_rows(tok, te, words, g)
    prompts = ["a photo of a <v0>", "a rendering of a <v1>"]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    word_pos = [int((r == w).nonzero()[0]) for r, w in zip(ids, new)]
    eot_pos = [int((r == tok.eos_token_id).nonzero()[0]) for r in ids]
    cond, extra = {}, {}
    if family == "sd":
        text = te(ids)[0]
    else:
        tok_2 = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2")
        te_2 = CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2")
        te_2.requires_grad_(False)
        _, rows_2 = with_rows(tok_2, te_2, words, g)
        ids_2 = tok_2(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out_2 = te_2(ids_2, output_hidden_states=True)
        text = torch.cat([te(ids, output_hidden_states=True).hidden_states[-2], out_2.hidden_states[-2]], -1)
        sizes = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * len(prompts))
        cond = {"added_cond_kwargs": {"text_embeds": out_2.text_embeds, "time_ids": sizes}}
        extra = {"ids_2": ids_2.to(torch.int64), "rows_2": rows_2}

    # Blocks at the sites, torch's default init from a fixed seed.
    torch.manual_seed(7)
    blocks = site_blocks(unet, SITES[family])

    b = len(prompts)
    z0, zr, eps = (torch.randn(b, 4, 8, 8, generator=g) for _ in range(3))
    t = torch.randint(0, 1000, (b,), generator=g)
    z_t = sched.add_noise(z0, eps, t)

    vico = ViCo(unet, blocks)
    vico.reference(word_pos, eot_pos)
    unet(zr, t, encoder_hidden_states=text, **cond)  # the reference pass
    vico.drawing()
    pred = unet(z_t, t, encoder_hidden_states=text, **cond).sample
    l_diff = F.mse_loss(pred, eps)
    l_reg = sum(vico.reg)
    loss = l_diff + 5e-4 * l_reg
    params = {f"{s}.image_cross_attention.{n}": p for s, blk in blocks.items() for n, p in blk.named_parameters()}
    init = {k: v.detach().clone() for k, v in params.items()}
    loss.backward()

    out = {"ids": ids.to(torch.int64), "word_pos": torch.tensor(word_pos), "eot_pos": torch.tensor(eot_pos),
           "rows": rows.detach(), "z_t": z_t, "eps": eps, "reference": zr, "t": t.to(torch.int64),
           "loss": loss.detach(), "l_diff": l_diff.detach(), "l_reg": l_reg.detach(), "grad.rows": rows.grad}
    if extra:
        out.update({**extra, "grad.rows_2": extra["rows_2"].grad})
    out.update({f"block.{k}": v for k, v in init.items()})
    out.update({f"grad.{k}": p.grad for k, p in params.items()})
    out.update({f"mask.{s}": m.to(torch.uint8) for s, m in vico.masks.items()})
    path = os.path.join(ROOT, "" if family == "sd" else "sdxl", "vico_step.safetensors")
    save_file({k: v.detach().contiguous() for k, v in out.items()}, path)
    print("wrote", os.path.abspath(path), f"loss {loss.item():.6f} l_reg {l_reg.item():.6f}",
          "kept", {s: int(m.sum()) for s, m in vico.masks.items()})


if __name__ == "__main__":
    main("sdxl" if sys.argv[1:] == ["sdxl"] else "sd")
