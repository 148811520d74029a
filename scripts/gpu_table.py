"""One markdown table from the logs of scripts/gpu_session.sh: magictailor against PyTorch
fp16 + diffusers on the same random full-size SD 2.1-base at 512 px, same machine, same call.

    python3 scripts/gpu_table.py LOGS_DIR DTYPE
"""
import datetime
import re
import subprocess
import sys
from pathlib import Path

logs, dtype = Path(sys.argv[1]), sys.argv[2]


def text(name):
    try:
        return (logs / f"{name}.log").read_text()
    except OSError:
        return ""


def num(pattern, s):
    m = re.search(pattern, s)
    return float(m.group(1)) if m else float("nan")


def gib(name):
    """nvidia-smi's polled peak of a step, in GiB."""
    try:
        return int((logs / f"{name}.peak").read_text()) / 1024
    except (OSError, ValueError):
        return float("nan")


def line(log, what):
    return next((l for l in log.splitlines() if what in l), "")


train, composed, ddim, infer, torch = (text(n) for n in ("ours-train", "ours-train-composed", "ours-ddim", "ours-infer", "torch"))
t_train, t_infer, t_unet = line(torch, "MagicTailor step"), line(torch, "infer at"), line(torch, "U-Net fwd+bwd")
rows = [
    ("warm-up step, 3+3 pair, 512 px (s/step)", num(r"warm-up ([\d.]+)", train), num(r"warm-up ([\d.]+)", t_train)),
    ("DS-Bal step (s/step)", num(r"DS-Bal ([\d.]+)", train), num(r"DS-Bal ([\d.]+)", t_train)),
    ("DS-Bal step, candle's composed ops (s/step)", num(r"DS-Bal ([\d.]+)", composed), num(r"DS-Bal ([\d.]+)", t_train)),
    ("peak GPU memory, training, nvidia-smi (GiB)", gib("ours-train"), num(r"nvidia-smi ([\d.]+)", t_train)),
    ("peak allocated by PyTorch, training (GiB)", float("nan"), num(r"allocated ([\d.]+)", t_train)),
    ("U-Net fwd+bwd, LoRA r32, batch 6 (s)", num(r"batch 6: ([\d.]+)", ddim), num(r"batch 6: ([\d.]+)", t_unet)),
    ("DDIM step, CFG batch 2 (s)", num(r"CFG batch 2: ([\d.]+)", ddim), num(r"CFG batch 2: ([\d.]+)", t_unet)),
    ("50-step DDIM, CFG 7.5, + VAE decode, 512 px (s)", num(r"VAE decode: ([\d.]+)", infer), num(r"VAE decode: ([\d.]+)", t_infer)),
    ("peak GPU memory, sampling, nvidia-smi (GiB)", gib("ours-infer"), num(r"nvidia-smi ([\d.]+)", t_infer)),
]


def gpu():
    try:
        return subprocess.run(["nvidia-smi", "--id=0", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return "no nvidia-smi"


def f(v):
    return "n/a" if v != v else f"{v:.3g}" if v < 10 else f"{v:.1f}"


try:
    commit = " ".join((logs / "commit").read_text().split())
except OSError:
    commit = "unknown"
print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {gpu()}, commit {commit}, "
      f"idle memory.used {gib('idle'):.2f} GiB\n")
print(f"| full-size SD 2.1-base, random weights | magictailor --dtype {dtype} | PyTorch fp16 (autocast) + diffusers | ratio |")
print("|---|---|---|---|")
for n, a, b in rows:
    print(f"| {n} | {f(a)} | {f(b)} | {f(a / b) if a == a and b == b and b else 'n/a'} |")
