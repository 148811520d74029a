"""Reads magictailor's TensorBoard event files with TensorBoard's own reader.

Run by hand (needs `pip install tensorboard`), on a run trained with --tensorboard:

    magictailor train --instance-dir PAIR --output-dir RUN --tensorboard ...
    python scripts/check_tensorboard.py RUN

It checks that every step's loss scalars match train_log.jsonl, that the sample grids are
images TensorBoard decodes, and prints what `tensorboard --logdir RUN/tb` will show.
"""
import json
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(run: Path) -> None:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    print("scalar tags:", sorted(tags["scalars"]))
    print("image tags:", sorted(tags["images"]))
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    for tag, key in [("loss/total", "loss"), ("loss/l_diff", "l_diff"), ("loss/l_attn", "l_attn")]:
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        want = [(line["step"], line[key]) for line in log]
        assert len(got) == len(want), (tag, len(got), len(want))
        for (gs, gv), (ws, wv) in zip(got, want):
            assert gs == ws and abs(gv - wv) <= 1e-6 * max(1.0, abs(wv)), (tag, gs, gv, wv)
    images = acc.Images("samples")
    for im in images:
        assert im.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    steps = [im.step for im in images]
    print(f"OK: {len(log)} steps of scalars match train_log.jsonl; sample grids at steps {steps}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
