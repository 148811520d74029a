#!/usr/bin/env python3
"""Reference fixtures for magictailor's parity tests (run by hand, not by CI).

Builds a tiny Stable Diffusion model of each family with diffusers/transformers, saves it
in the diffusers layout under tests/fixtures/[FAMILY/]tiny-sd/, and records what the
reference implementation computes on it into parity.safetensors next to it (+ a LoRA in
three layouts, pseudo-word embeddings, two 10-step DDIM images as PNG and one training
step). SD 2.x's files sit at the top of tests/fixtures/, SD 1.x's under tests/fixtures/sd1/.

    pip install torch diffusers transformers peft safetensors
    python scripts/make_parity_fixtures.py [sd2|sd1 ...]   # default: every family

Versions used for the committed fixtures: see tests/fixtures/VERSIONS.txt.
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
# What tells the families apart, at tiny size.
FAMILIES = {
    # SD 2.x: linear projections, a GELU text encoder padded with "!", heads per block.
    "sd2": dict(root=ROOT, channels=(8, 16, 16, 16), heads=(2, 2, 4, 4), linear_proj=True, act="gelu", pad="!"),
    # SD 1.x: 1x1-conv projections, quick_gelu, 8 heads in every block (diffusers' legacy
    # `attention_head_dim`), padded with the end-of-text token.
    "sd1": dict(root=os.path.join(ROOT, "sd1"), channels=(16, 16, 16, 16), heads=8, linear_proj=False,
                act="quick_gelu", pad="<|endoftext|>"),
}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]
WORDS = ["a", "photo", "of", "with", "the", "in", "snow", "person", "hair", "painting",
         "dog", "cat", "on", "beach", "red", "style"]
torch.set_num_threads(2)


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def tiny_vocab(dirname):
    """Bytes, bytes + </w>, merges that spell WORDS, then the special tokens."""
    chars = bytes_to_unicode()
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for w in WORDS:
        parts = list(w)
        parts[-1] += "</w>"
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
                vocab.append(parts[0] + parts[1])
            parts[:2] = [parts[0] + parts[1]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(dirname, exist_ok=True)
    with open(os.path.join(dirname, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(dirname, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(vocab)


def jitter_(module, scale=0.05):
    """Default inits leave norms at 1/0 and some biases at 0; perturb every parameter so
    a wrong weight name or a skipped bias shows up as a mismatch."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def build_model(fam):
    torch.manual_seed(0)
    root, model = fam["root"], os.path.join(fam["root"], "tiny-sd")
    unet = UNet2DConditionModel(
        block_out_channels=fam["channels"], layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=fam["heads"], use_linear_projection=fam["linear_proj"],
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 16, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
    )
    tok_dir = os.path.join(root, "_tok")
    vocab_size = tiny_vocab(tok_dir)
    tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                              pad_token=fam["pad"], model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act=fam["act"], layer_norm_eps=1e-5, bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1, pad_token_id=0, projection_dim=32,
    ))
    for m in (unet, vae, text_encoder):
        jitter_(m)
        m.eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    shutil.rmtree(model, ignore_errors=True)
    pipe.save_pretrained(model, safe_serialization=True)
    # Keep the slow-tokenizer files next to tokenizer.json so both load paths are tested.
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(tok_dir, f), os.path.join(model, "tokenizer", f))
    shutil.rmtree(tok_dir)
    return pipe


class ProbsRecorder(AttnProcessor):
    """The plain attention processor, keeping head-averaged probabilities of cross-attention."""

    def __init__(self, name, store):
        super().__init__()
        self.name, self.store = name, store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        if encoder_hidden_states is not None:
            q = attn.head_to_batch_dim(attn.to_q(hidden_states))
            key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
            probs = attn.get_attention_scores(q, key, None)
            b = hidden_states.shape[0]
            self.store[self.name] = probs.reshape(b, attn.heads, *probs.shape[1:]).mean(1)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def encode(pipe, prompts):
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, pipe.text_encoder(ids)[0]


def main(fam):
    pipe = build_model(fam)
    root, model = fam["root"], os.path.join(fam["root"], "tiny-sd")
    out = {}
    g = torch.Generator().manual_seed(42)

    # Scheduler and tokenizer.
    out["alphas_cumprod"] = pipe.scheduler.alphas_cumprod.clone()
    prompts = ["a photo of a dog", "", "A  Photo of the RED cat, in snow!! 123"]
    ids, hidden = encode(pipe, prompts)
    out["token_ids"] = ids.to(torch.int64)
    out["te_hidden"] = hidden

    # U-Net without and with a LoRA; cross-attention probabilities of every layer.
    unet = pipe.unet
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    ctx = hidden[:2]
    store = {}
    unet.set_attn_processor({n: ProbsRecorder(n.removesuffix(".processor"), store) for n in unet.attn_processors})
    with torch.no_grad():
        out["unet_x"], out["unet_t"] = x, t.to(torch.float32)
        out["unet_out"] = unet(x, t, encoder_hidden_states=ctx).sample
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    out["attn_probs"] = store[name]  # [b, 16 queries (4x4), 77 keys]
    unet.set_attn_processor(AttnProcessor2_0())

    lora_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="gaussian")
    unet.add_adapter(lora_cfg)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        out["unet_lora_out"] = unet(x, t, encoder_hidden_states=ctx).sample
    peft_sd = get_peft_model_state_dict(unet)
    StableDiffusionPipeline.save_lora_weights(
        root, unet_lora_layers=peft_sd, weight_name="lora_peft.safetensors",
        unet_lora_adapter_metadata={"r": 4, "lora_alpha": 8, "target_modules": TARGETS},
    )
    kohya, old = {}, {}
    for k, v in peft_sd.items():
        module, which = k.rsplit(".lora_", 1)
        down = which.startswith("A")
        kname = "lora_unet_" + module.replace(".", "_")
        kohya[f"{kname}.lora_{'down' if down else 'up'}.weight"] = v.contiguous()
        kohya[f"{kname}.alpha"] = torch.tensor(8.0)
        old[f"unet.{module}.lora.{'down' if down else 'up'}.weight"] = v.contiguous()
    save_file(kohya, os.path.join(root, "lora_kohya.safetensors"))
    # Old diffusers files carry no alpha: their scale is 1, so scale B by alpha/r = 2 to keep the same map.
    old = {k: (2 * v if ".up." in k else v) for k, v in old.items()}
    save_file(old, os.path.join(root, "lora_diffusers_old.safetensors"))
    unet.delete_adapters("default") if hasattr(unet, "delete_adapters") else None

    # VAE encode (mean, std) and decode.
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    z = torch.randn(1, 4, 4, 4, generator=g)
    with torch.no_grad():
        dist = pipe.vae.encode(img).latent_dist
        out["vae_in"], out["vae_mean"], out["vae_std"] = img, dist.mean, dist.std
        out["vae_z"], out["vae_decoded"] = z, pipe.vae.decode(z).sample

    # Pseudo-words: text features with two new tokens.
    emb = {"<v0>": torch.randn(32, generator=g), "<v1>": torch.randn(32, generator=g)}
    save_file({k: v.contiguous() for k, v in emb.items()}, os.path.join(root, "learned_embeds.safetensors"))

    # 10-step DDIM with guidance from fixed latents: base model, then with LoRA + embeddings.
    lat = torch.randn(1, 4, 8, 8, generator=g)
    save_file({"latents": lat.contiguous()}, os.path.join(root, "init_latents.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    run = dict(num_inference_steps=10, guidance_scale=7.5, height=64, width=64)
    image = pipe("a photo of a dog", latents=lat.clone(), **run).images[0]
    image.save(os.path.join(root, "ddim_base.png"))
    pipe.load_lora_weights(root, weight_name="lora_peft.safetensors")
    for tok, vec in emb.items():
        pipe.load_textual_inversion(vec, token=tok)
    prompt = "<v0> with <v1>, in the snow"
    ids, hidden = encode(pipe, [prompt])
    out["pseudo_token_ids"], out["te_hidden_pseudo"] = ids.to(torch.int64), hidden
    image = pipe(prompt, latents=lat.clone(), **run).images[0]
    image.save(os.path.join(root, "ddim_personal.png"))

    save_file({k: v.detach().contiguous().to(v.dtype) for k, v in out.items()}, os.path.join(root, "parity.safetensors"),
              metadata={"attn_probs_layer": name})
    print("fixtures written to", os.path.abspath(root))


def write_versions():
    """The first paragraph of VERSIONS.txt is this script's; the other scripts' stay."""
    import diffusers, peft, transformers
    path = os.path.join(ROOT, "VERSIONS.txt")
    rest = open(path).read().split("\n\n", 1)[1] if os.path.exists(path) else ""
    with open(path, "w") as f:
        f.write(f"torch {torch.__version__}\ndiffusers {diffusers.__version__}\n"
                f"transformers {transformers.__version__}\npeft {peft.__version__}\nnumpy {np.__version__}\n")
        f.write("\n" + rest if rest else "")


def training_step_fixture(fam):
    """One warm-up step's loss terms and gradients, and one DS-Bal step's L_diff-max and
    L_pres, on the tiny model with the fixture LoRA and pseudo-words (docs/method.md, eq. 1-2, 6-8;
    losses written here from the formulas, independently of magictailor's code)."""
    g = torch.Generator().manual_seed(7)
    root, model = fam["root"], os.path.join(fam["root"], "tiny-sd")
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    pipe.load_lora_weights(root, weight_name="lora_peft.safetensors")
    for tok, vec in load_file(os.path.join(root, "learned_embeds.safetensors")).items():
        pipe.load_textual_inversion(vec, token=tok)
    unet, te, tok = pipe.unet, pipe.text_encoder, pipe.tokenizer
    prompts, sample_of = ["A photo of <v0>", "A photo of <v0>", "A photo of <v1>"], [0, 0, 1]
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    token_pos = [ids[i].tolist().index(tok.convert_tokens_to_ids(f"<v{s}>")) for i, s in enumerate(sample_of)]
    b = len(prompts)
    z0, eps = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    t = torch.tensor([50, 400, 900])
    masks = torch.zeros(b, 1, 64, 64)
    for i, (y0, y1, x0, x1) in enumerate([(8, 40, 16, 56), (20, 64, 0, 30), (0, 24, 10, 50)]):
        masks[i, :, y0:y1, x0:x1] = 1
    z_t = pipe.scheduler.add_noise(z0, eps, t)

    emb = te.get_input_embeddings().weight
    vocab = emb.shape[0] - 2
    emb.requires_grad_(True)
    lora = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    for p in lora.values():
        p.requires_grad_(True)
    store = {}
    unet.set_attn_processor({n: ProbsRecorder(n.removesuffix(".processor"), store) for n in unet.attn_processors})

    ctx = te(ids)[0]
    pred = unet(z_t, t, encoder_hidden_states=ctx).sample
    m_lat = F.interpolate(masks, size=(8, 8), mode="nearest")
    m_att = F.interpolate(masks, size=(2, 2), mode="nearest").flatten(1)
    per_image = ((pred - eps) * m_lat).pow(2).flatten(1).mean(1)
    maps = [m for n, m in store.items() if m.shape[1] == 4 and not n.startswith("mid_block")]
    assert len(maps) == 5, [n for n in store]
    mean = torch.stack(maps).mean(0)
    own = mean[torch.arange(b), :, token_pos]
    own = own / own.max(dim=1, keepdim=True).values
    l_attn = (own - m_att).pow(2).mean()
    l_diff = per_image.mean()
    loss = l_diff + 0.01 * l_attn
    loss.backward()
    out = {"ids": ids.to(torch.int64), "token_pos": torch.tensor(token_pos), "sample_of": torch.tensor(sample_of),
           "z_t": z_t, "eps": eps, "t": t.to(torch.int64), "masks": masks, "per_image": per_image.detach(),
           "l_attn": l_attn.detach(), "l_diff": l_diff.detach(), "loss": loss.detach(),
           "grad.rows": emb.grad[vocab:].clone()}
    for n, p in lora.items():
        module, which = n.split(".lora_")
        out[f"grad.{module}.{which[0]}"] = p.grad.clone()

    # DS-Bal: momentum adapters near the online ones; max over samples; preserving term.
    momentum = {n: (p.detach() + 0.05 * torch.randn(p.shape, generator=g)) for n, p in lora.items()}
    per_sample = torch.stack([per_image[[0, 1]].mean(), per_image[[2]].mean()])
    chosen = int(per_sample.argmax())
    online = {n: p.detach().clone() for n, p in lora.items()}
    with torch.no_grad():
        for n, p in lora.items():
            p.copy_(momentum[n])
        mpred = unet(z_t, t, encoder_hidden_states=ctx.detach()).sample
        for n, p in lora.items():
            p.copy_(online[n])
    pres_img = ((pred - mpred) * m_lat).pow(2).flatten(1).mean(1)
    pres_sample = torch.stack([pres_img[[0, 1]].mean(), pres_img[[2]].mean()])
    l_pres = torch.stack([pres_sample[s] for s in range(2) if s != chosen]).mean()
    out.update({"per_sample": per_sample.detach(), "chosen": torch.tensor(chosen), "l_diff_max": per_sample[chosen].detach(),
                "l_pres": l_pres.detach()})
    peft_momentum = {}
    for n, v in momentum.items():
        module, which = n.split(".lora_")
        peft_momentum[f"unet.{module}.lora_{which[0]}.weight"] = v.contiguous()
    save_file(peft_momentum, os.path.join(root, "lora_momentum.safetensors"),
              metadata={"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 8})})
    save_file({k: v.detach().clone().contiguous() for k, v in out.items()}, os.path.join(root, "train_step.safetensors"))


if __name__ == "__main__":
    for family in sys.argv[1:] or FAMILIES:
        main(FAMILIES[family])
        training_step_fixture(FAMILIES[family])
    write_versions()
