#!/usr/bin/env python3
"""Reference fixtures for `magictailor eval` (run by hand, not by CI).

Builds a tiny random CLIP (transformers `CLIPModel`, openai layout) and a tiny random
DINOv2 (`Dinov2Model`, the layout of facebook/dinov2-small), saves them with their
preprocessor configs under tests/fixtures/tiny-clip/ and tests/fixtures/tiny-dinov2/, and
records what transformers computes on two fixed images and two prompts into
tests/fixtures/eval_parity.safetensors:

    clip.pixel_values.{a,b}   CLIPImageProcessorPil output, [1, 3, 32, 32]
    clip.image_embeds         get_image_features (projected, not normalized), [2, P]
    clip.input_ids.{0,1}      token ids (no padding), [1, n]
    clip.text_embeds          get_text_features, [2, P]
    dino.pixel_values.{a,b}   BitImageProcessorPil output (dinov2's processor), [1, 3, 28, 28]
    dino.cls                  Dinov2Model pooler_output (CLS after the final layernorm), [2, H]

The tiny DINOv2 has 4x4 position embeddings but sees 7x7 patches, so its bicubic position
interpolation is exercised. The tokenizer is the tiny one of tests/fixtures/tiny-sd
(written by scripts/make_parity_fixtures.py).

    pip install torch transformers safetensors numpy pillow
    python scripts/make_eval_fixtures.py
"""
import os
import shutil

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (BitImageProcessorPil, CLIPConfig, CLIPImageProcessorPil, CLIPModel,
                          CLIPTokenizerFast, Dinov2Config, Dinov2Model)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
CLIP_DIR = os.path.join(ROOT, "tiny-clip")
DINO_DIR = os.path.join(ROOT, "tiny-dinov2")
IMAGES = os.path.join(ROOT, "eval_images")
PROMPTS = ["a photo of a person with hair, in the snow", "a red dog on the beach"]
torch.manual_seed(0)
torch.set_num_threads(2)


def images():
    """Two small non-square RGB pictures with structure (so resizing matters)."""
    rng = np.random.default_rng(0)
    out = {}
    for name, (w, h) in {"a": (48, 40), "b": (37, 53)}.items():
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
        noise = rng.integers(0, 60, size=(h, w, 3))
        img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")
        os.makedirs(IMAGES, exist_ok=True)
        img.save(os.path.join(IMAGES, f"{name}.png"))
        out[name] = img
    return out


def randomize(model, std):
    """Random weights well away from the default init (layer scales, norms too)."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.add_(1.0)


def tiny_clip():
    tok_src = os.path.join(ROOT, "tiny-sd", "tokenizer")
    tokenizer = CLIPTokenizerFast.from_pretrained(tok_src)
    vocab = len(tokenizer)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    randomize(model, 0.2)
    shutil.rmtree(CLIP_DIR, ignore_errors=True)
    model.save_pretrained(CLIP_DIR, safe_serialization=True)
    tokenizer.save_pretrained(CLIP_DIR)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc.save_pretrained(CLIP_DIR)
    return model, tokenizer, proc


def tiny_dino():
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4,
                       image_size=16, patch_size=4, layer_norm_eps=1e-6)
    model = Dinov2Model(cfg).eval()
    randomize(model, 0.2)
    shutil.rmtree(DINO_DIR, ignore_errors=True)
    model.save_pretrained(DINO_DIR, safe_serialization=True)
    proc = BitImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 28, "width": 28},
                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    proc.save_pretrained(DINO_DIR)
    return model, proc


def main():
    imgs = images()
    out = {}
    clip, tokenizer, clip_proc = tiny_clip()
    dino, dino_proc = tiny_dino()
    with torch.no_grad():
        pix = []
        for name, img in imgs.items():
            p = clip_proc(images=img, return_tensors="pt")["pixel_values"]
            out[f"clip.pixel_values.{name}"] = p
            pix.append(p)
        out["clip.image_embeds"] = clip.get_image_features(pixel_values=torch.cat(pix)).pooler_output
        texts = []
        for i, prompt in enumerate(PROMPTS):
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            out[f"clip.input_ids.{i}"] = ids.to(torch.int64)
            texts.append(clip.get_text_features(input_ids=ids).pooler_output)
        out["clip.text_embeds"] = torch.cat(texts)
        pix = []
        for name, img in imgs.items():
            p = dino_proc(images=img, return_tensors="pt")["pixel_values"]
            out[f"dino.pixel_values.{name}"] = p
            pix.append(p)
        out["dino.cls"] = dino(pixel_values=torch.cat(pix)).pooler_output
    save_file({k: v.contiguous().float() if v.is_floating_point() else v.contiguous() for k, v in out.items()},
              os.path.join(ROOT, "eval_parity.safetensors"))
    for k, v in out.items():
        print(k, tuple(v.shape))


if __name__ == "__main__":
    main()
