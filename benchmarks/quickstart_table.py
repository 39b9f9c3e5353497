"""Quickstart runs side by side: a markdown table of their metrics.json and one picture of their samples.

    python benchmarks/quickstart_table.py runs/ct_s0 runs/ct_s1 runs/ect_s0 ... --picture compare.png

Each argument is a scripts/quickstart.py --out folder. The table has one row per folder (mode, steps per stage,
one-step and two-step digits-FID / coverage / nearest=train); the picture has one row per folder: the first
`--per_row` one-step samples, a gap, the same number of two-step (searched) samples, all enlarged `--scale` times
and upsampled to 16 px when the run sampled smaller images. It asserts nothing.
"""

import argparse
import glob
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

SHOW = 16  # the side the picture shows every run at (the quickstart's digits size)


def stage_steps(out):
    """'EDM 865 + ECT 440': the steps of each stage folder of a quickstart run, from their config.json."""
    parts = []
    for config_path in sorted(glob.glob(os.path.join(out, "*", "config.json")), key=os.path.getmtime):
        with open(config_path) as f:
            config = json.load(f)
        parts.append(f"{os.path.basename(os.path.dirname(config_path))} {config['loop']['total_training_steps']}")
    return " + ".join(parts)


def table_row(out):
    """One markdown row of a quickstart run's metrics.json."""
    with open(os.path.join(out, "metrics.json")) as f:
        m = json.load(f)

    def cell(key):
        r = m[key]
        return f"{r['digits_fid']:.2f} / {r['coverage']:.3f} / {r['nearest_is_train']:.2f}"

    searched = m["two_step_ts_searched"]
    return (f"| {os.path.basename(out.rstrip('/'))} | {stage_steps(out)} | {cell('one-step')} | "
            f"{cell('two-step default')} | {cell('two-step searched')} ({', '.join(map(str, searched))}) |")


def samples(out, which, count):
    """The first `count` samples of a run's npz `which` ('onestep', 'twostep'), uint8 NHWC at SHOW px."""
    path = glob.glob(os.path.join(out, f"samples_{which}_*.npz"))[0]
    with np.load(path) as data:
        x = torch.from_numpy(data["arr_0"][:count]).permute(0, 3, 1, 2).float()
    if x.shape[-1] != SHOW:
        x = F.interpolate(x, size=SHOW, mode="bilinear", align_corners=False)
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def picture(outs, per_row, scale, gap=4, label_width=110):
    """Rows of one-step | two-step samples, one row per run named on its left, as a PIL image."""
    rows = []
    for out in outs:
        one, two = (np.concatenate(list(samples(out, w, per_row)), axis=1) for w in ("onestep", "twostep"))
        rows.append(np.concatenate([one, np.full((SHOW, gap, 3), 255, np.uint8), two], axis=1))
        rows.append(np.full((gap, rows[-1].shape[1], 3), 255, np.uint8))
    grid = np.concatenate(rows[:-1], axis=0)
    enlarged = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    image = Image.new("RGB", (label_width + enlarged.width, enlarged.height), "white")
    image.paste(enlarged, (label_width, 0))
    draw = ImageDraw.Draw(image)
    for k, out in enumerate(outs):
        draw.text((4, (k * (SHOW + gap) + SHOW // 2) * scale - 6), os.path.basename(out.rstrip("/")), fill="black")
    return image


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outs", nargs="+", help="quickstart --out folders")
    p.add_argument("--picture", default="", help="write the picture here (PNG)")
    p.add_argument("--per_row", type=int, default=12, help="samples of each kind per run")
    p.add_argument("--scale", type=int, default=2)
    args = p.parse_args()
    print("| run | steps | one step: digits-FID / coverage / nearest=train | two steps, default | two steps, searched |")
    print("| --- | --- | --- | --- | --- |")
    for out in args.outs:
        print(table_row(out))
    if args.picture:
        picture(args.outs, args.per_row, args.scale).save(args.picture)
        print(f"picture: {args.picture} (rows in the order given; one-step samples left, two-step right)")


if __name__ == "__main__":
    main()
