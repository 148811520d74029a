#!/usr/bin/env python3
"""Loads the LoRA and embeddings magictailor wrote into diffusers (run by hand).

    cargo test --test formats --test train --test methods --test break_a_scene --test sdxl   # writes target/tmp/*-check/
    python scripts/check_rust_exports.py [target/tmp/export-check]

Passes when diffusers, with magictailor's pytorch_lora_weights.safetensors (via peft) and
learned_embeds.safetensors (via textual inversion), reproduces tests/fixtures/ddim_personal.png,
and, for a folder written by `magictailor train` (target/tmp/train-check/), reproduces the
image `magictailor infer --model-dir` drew from the same latents; and, for a `--method ti`
folder (target/tmp/ti-check/), that its A1111 embedding files, loaded the way Textual
Inversion's users load them, reproduce the image magictailor drew; the same for a
`--method dreambooth` folder's adapters (target/tmp/dreambooth-check/), and a
`--method custom-diffusion` folder's matrices and words (target/tmp/custom-diffusion-check/),
and a `--method clic` folder's (target/tmp/clic-check/), a `--method break-a-scene` folder's
--export-full U-Net and text encoder with its words (target/tmp/break-a-scene-check/), an SDXL
DreamBooth run's kohya and peft files (target/tmp/sdxl-dreambooth-check/), an SDXL MagicTailor
run's kohya file and A1111 words (target/tmp/sdxl-magictailor-check/), SDXL Custom Diffusion
and CLiC runs' matrices and words (target/tmp/sdxl-custom-diffusion-check/, sdxl-clic-check/),
an SDXL Break-A-Scene run's --export-full U-Net and both text encoders with its words
(target/tmp/sdxl-break-a-scene-check/), and an SD 1.x run's
adapters (peft and kohya files) and words (target/tmp/sd1-check/).
"""
import os
import sys

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "tests", "fixtures")


def tiny_pipeline(family=""):
    """The tiny fixture model (SD 2.x, or `sd1`) as a diffusers pipeline, quiet."""
    p = StableDiffusionPipeline.from_pretrained(os.path.join(FIX, family, "tiny-sd"), safety_checker=None)
    p.set_progress_bar_config(disable=True)
    return p


export = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "target", "tmp", "export-check")

pipe = tiny_pipeline()
pipe.load_lora_weights(export, weight_name="pytorch_lora_weights.safetensors")
n_lora = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("lora_A"))
for tok, vec in load_file(os.path.join(export, "learned_embeds.safetensors")).items():
    pipe.load_textual_inversion(vec, token=tok)
lat = load_file(os.path.join(FIX, "init_latents.safetensors"))["latents"]
img = pipe("<v0> with <v1>, in the snow", latents=lat, num_inference_steps=10, guidance_scale=7.5,
           height=64, width=64).images[0]
got = np.asarray(img).astype(int)
want = np.asarray(Image.open(os.path.join(FIX, "ddim_personal.png"))).astype(int)
diff = np.abs(got - want).max()
print(f"peft file: diffusers loaded {n_lora} LoRA modules; max pixel difference {diff}")

# The kohya export (what ComfyUI/A1111 read), through diffusers' kohya converter.
pipe.unload_lora_weights()
pipe.load_lora_weights(export, weight_name="lora_kohya.safetensors")
n_kohya = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("lora_A"))
img = pipe("<v0> with <v1>, in the snow", latents=lat, num_inference_steps=10, guidance_scale=7.5,
           height=64, width=64).images[0]
diff_k = np.abs(np.asarray(img).astype(int) - want).max()
print(f"kohya file: diffusers loaded {n_kohya} LoRA modules; max pixel difference {diff_k}")

# A folder written by `magictailor train`.
trained = os.path.join(os.path.dirname(os.path.abspath(export)), "train-check")
pipe = tiny_pipeline()
pipe.load_lora_weights(trained, weight_name="pytorch_lora_weights.safetensors")
for tok, vec in load_file(os.path.join(trained, "learned_embeds.safetensors")).items():
    pipe.load_textual_inversion(vec, token=tok)
img = pipe("<v0> with <v1>", latents=lat, num_inference_steps=10, guidance_scale=7.5, height=64, width=64).images[0]
ours = np.asarray(Image.open(os.path.join(trained, "infer.png"))).astype(int)
diff_t = np.abs(np.asarray(img).astype(int) - ours).max()
print(f"trained folder: diffusers reproduces magictailor's image within {diff_t} levels")


def words(pipe, folder):
    """`<v0>`, `<v1>` from a folder's A1111 files, the way Textual Inversion's users load them."""
    for word in ("v0", "v1"):
        pipe.load_textual_inversion(os.path.join(folder, "embeddings", f"{word}.safetensors"), token=f"<{word}>")


def levels(pipe, prompt, folder, latents=None):
    """How far diffusers' image of `prompt` from the fixed latents is from the `infer.png`
    magictailor drew into `folder`, in uint8 levels."""
    img = pipe(prompt, latents=lat if latents is None else latents, num_inference_steps=10, guidance_scale=7.5, height=64, width=64).images[0]
    ours = np.asarray(Image.open(os.path.join(folder, "infer.png"))).astype(int)
    return np.abs(np.asarray(img).astype(int) - ours).max()


def check_dir(name):
    return os.path.join(os.path.dirname(os.path.abspath(export)), name)


# A `--method ti` folder: no adapters, one A1111 file per word.
ti = check_dir("ti-check")
pipe = tiny_pipeline()
words(pipe, ti)
diff_ti = levels(pipe, "a photo of <v0> with <v1>", ti)
print(f"ti folder: diffusers reproduces magictailor's image within {diff_ti} levels")

# A `--method dreambooth` folder: adapters on the attention projections, `<v0>` = "sks person".
db = check_dir("dreambooth-check")
pipe = tiny_pipeline()
pipe.load_lora_weights(db, weight_name="pytorch_lora_weights.safetensors")
n_db = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("lora_A"))
diff_db = levels(pipe, "a photo of sks person", db)
print(f"dreambooth folder: diffusers loaded {n_db} LoRA modules; reproduces magictailor's image within "
      f"{diff_db} levels")


def worded(folder, load=lambda pipe: None):
    """The tiny pipeline with `load(pipe)` applied, then the folder's A1111 words."""
    pipe = tiny_pipeline()
    load(pipe)
    words(pipe, folder)
    return pipe


def attn_procs(folder):
    """Loads a folder's matrices file through the attention-processor loader."""
    return lambda pipe: pipe.unet.load_attn_procs(
        folder, weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=pipe)


def full_folders(folder, *parts):
    """Swaps in the `--export-full` folder's components (`unet`, `text_encoder`, SDXL's
    `text_encoder_2`)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    classes = {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    return lambda pipe: [setattr(pipe, p, classes[p].from_pretrained(os.path.join(folder, "full"), subfolder=p))
                         for p in parts]


# A `--method custom-diffusion` folder: the cross-attentions' k/v matrices through the
# attention-processor loader (diffusers 0.42 sets them only when given the pipeline), the
# words through textual inversion; then the words alone, and the --export-full U-Net.
cd = check_dir("custom-diffusion-check")
pipe = worded(cd, attn_procs(cd))
n_cd = sum(1 for p in pipe.unet.attn_processors.values() if getattr(p, "train_kv", False))
diff_cd = levels(pipe, "photo of a <v0> with <v1>", cd)
words_only = levels(worded(cd), "photo of a <v0> with <v1>", cd)
print(f"custom-diffusion folder: diffusers set {n_cd} tuned cross-attention processors; reproduces "
      f"magictailor's image within {diff_cd} levels (the words alone: {words_only} levels)")
diff_full = levels(worded(cd, full_folders(cd, "unet")), "photo of a <v0> with <v1>", cd)
print(f"custom-diffusion --export-full unet/: diffusers reproduces magictailor's image within {diff_full} levels")

# A `--method clic` folder: q/k/v/out (with the out bias) of every cross-attention through
# the same loader, whose processors then tune queries and outputs too.
cl = check_dir("clic-check")
pipe = worded(cl, attn_procs(cl))
n_cl = sum(1 for p in pipe.unet.attn_processors.values() if getattr(p, "train_q_out", False))
diff_cl = levels(pipe, "a photo of <v0> with <v1>", cl)
print(f"clic folder: diffusers set {n_cl} processors tuning q/k/v/out; reproduces magictailor's image within "
      f"{diff_cl} levels")
# A `--method break-a-scene` folder's --export-full U-Net and text encoder (every weight
# trained) with its A1111 words; then the words alone on the base.
bas = check_dir("break-a-scene-check")
diff_bas = levels(worded(bas, full_folders(bas, "unet", "text_encoder")), "<v0> with <v1>", bas)
bas_words_only = levels(worded(bas), "<v0> with <v1>", bas)
print(f"break-a-scene --export-full unet/ + text_encoder/: diffusers reproduces magictailor's image within "
      f"{diff_bas} levels (the words alone on the base: {bas_words_only} levels)")

# A `--method dreambooth` run on the tiny SDXL: its kohya file (SDXL's original-layout
# names) through diffusers' own kohya conversion, and its peft file.
from diffusers import StableDiffusionXLPipeline  # noqa: E402

xl = check_dir("sdxl-dreambooth-check")
xl_lat = load_file(os.path.join(FIX, "sdxl", "parity.safetensors"))["init_latents"]
xl_prompt = open(os.path.join(xl, "prompt.txt")).read()
for weights in ("lora_kohya.safetensors", "pytorch_lora_weights.safetensors"):
    xp = StableDiffusionXLPipeline.from_pretrained(os.path.join(FIX, "sdxl", "tiny-sdxl"))
    xp.set_progress_bar_config(disable=True)
    xp.load_lora_weights(xl, weight_name=weights)
    n_xl = sum(1 for n, _ in xp.unet.named_modules() if n.endswith("lora_A"))
    img = xp(xl_prompt, latents=xl_lat.clone(), num_inference_steps=10, guidance_scale=7.5, height=64,
             width=64).images[0]
    ours = np.asarray(Image.open(os.path.join(xl, "infer.png"))).astype(int)
    print(f"sdxl dreambooth {weights}: diffusers loaded {n_xl} LoRA modules; reproduces magictailor's image "
          f"within {np.abs(np.asarray(img).astype(int) - ours).max()} levels")

# A MagicTailor run on the tiny SDXL: its kohya file through diffusers' kohya conversion,
# each word's A1111 file split into its clip_l and clip_g rows, as diffusers' SDXL
# textual-inversion docs load them.
def sdxl_words_levels(folder, load):
    """The tiny SDXL pipeline with `load(pipe)` applied and each word's A1111 file split
    into its clip_l and clip_g rows (as diffusers' SDXL textual-inversion docs load them):
    how far its image is from magictailor's `infer.png`, in uint8 levels; and the pipe."""
    xp = StableDiffusionXLPipeline.from_pretrained(os.path.join(FIX, "sdxl", "tiny-sdxl"))
    xp.set_progress_bar_config(disable=True)
    load(xp)
    for word in ("v0", "v1"):
        e = load_file(os.path.join(folder, "embeddings", f"{word}.safetensors"))
        xp.load_textual_inversion(e["clip_l"], token=f"<{word}>", text_encoder=xp.text_encoder,
                                  tokenizer=xp.tokenizer)
        xp.load_textual_inversion(e["clip_g"], token=f"<{word}>", text_encoder=xp.text_encoder_2,
                                  tokenizer=xp.tokenizer_2)
    img = xp(open(os.path.join(folder, "prompt.txt")).read(), latents=xl_lat.clone(), num_inference_steps=10,
             guidance_scale=7.5, height=64, width=64).images[0]
    ours = np.asarray(Image.open(os.path.join(folder, "infer.png"))).astype(int)
    return np.abs(np.asarray(img).astype(int) - ours).max(), xp


diff_mt, xp = sdxl_words_levels(check_dir("sdxl-magictailor-check"),
                                lambda p: p.load_lora_weights(check_dir("sdxl-magictailor-check"),
                                                              weight_name="lora_kohya.safetensors"))
n_mt = sum(1 for n, _ in xp.unet.named_modules() if n.endswith("lora_A"))
print(f"sdxl magictailor kohya + A1111 words: diffusers loaded {n_mt} LoRA modules; reproduces magictailor's "
      f"image within {diff_mt} levels")
# Custom Diffusion and CLiC runs on the tiny SDXL: their matrices through the
# attention-processor loader, their words as above.
diff_xt = {}
for method in ("custom-diffusion", "clic"):
    folder = check_dir(f"sdxl-{method}-check")
    diff_xt[method], xp = sdxl_words_levels(folder, attn_procs(folder))
    n = sum(1 for p in xp.unet.attn_processors.values() if getattr(p, "train_kv", False))
    print(f"sdxl {method}: diffusers set {n} tuned cross-attention processors; reproduces magictailor's image "
          f"within {diff_xt[method]} levels")

# A Break-A-Scene run on the tiny SDXL: its --export-full U-Net and both text encoders
# swapped in, with its A1111 words; then the words alone on the base.
xbas = check_dir("sdxl-break-a-scene-check")
diff_xbas, _ = sdxl_words_levels(xbas, full_folders(xbas, "unet", "text_encoder", "text_encoder_2"))
xbas_words_only, _ = sdxl_words_levels(xbas, lambda pipe: None)
print(f"sdxl break-a-scene --export-full + A1111 words: diffusers reproduces magictailor's image within "
      f"{diff_xbas} levels (the words alone on the base: {xbas_words_only} levels)")

# An SD 1.x run (1x1-conv projections: 4-D adapters), through the peft and kohya files.
sd1 = check_dir("sd1-check")
lat1 = load_file(os.path.join(FIX, "sd1", "init_latents.safetensors"))["latents"]
diff_sd1 = {}
for f in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
    pipe = tiny_pipeline("sd1")
    pipe.load_lora_weights(sd1, weight_name=f)
    n = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("lora_A"))
    for tok, vec in load_file(os.path.join(sd1, "learned_embeds.safetensors")).items():
        pipe.load_textual_inversion(vec, token=tok)
    diff_sd1[f] = (n, levels(pipe, "<v0> with <v1>", sd1, lat1))
    print(f"sd1 folder, {f}: diffusers loaded {n} LoRA modules; reproduces magictailor's image within "
          f"{diff_sd1[f][1]} levels")
ok = all(n == 176 and d <= 2 for n, d in diff_sd1.values())
ok = ok and diff <= 2 and n_lora == 176 and diff_k <= 2 and n_kohya == 176 and diff_t <= 2 and diff_ti <= 2
ok = ok and diff_db <= 2 and n_db == 128 and diff_cd <= 2 and n_cd == 16 and words_only > 2
ok = ok and diff_cl <= 2 and n_cl == 16 and diff_full <= 2 and diff_bas <= 2 and diff_mt <= 2 and n_mt == 220 and max(diff_xt.values()) <= 2
ok = ok and diff_xbas <= 2 and xbas_words_only > 2
sys.exit(0 if ok else 1)
