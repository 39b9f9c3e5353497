"""Train a consistency model on the embedded digits on a CPU in a few minutes, sample it and score it.

    python scripts/quickstart.py                  # consistency training (configs/digits_ct.yaml), ~5 minutes
    python scripts/quickstart.py --mode cd        # EDM teacher (digits_edm.yaml), then distillation (digits_cd.yaml)
    python scripts/quickstart.py --minutes 10 --out my_run --device cuda

Everything goes to --out: one-step and two-step sample grids next to real digits, training curves, the
checkpoints, samples as npz and metrics.json. The run uses the library's own training loop
(cm.train_util.CMTrainLoop); the number of steps is chosen so that training fits the time budget.
Quality is measured with cm.digits_eval: a small digits classifier's Frechet distance ("digits-FID",
lower is better; the held-out real digits give the floor) and class coverage (1 = all ten digits equally).
"""

import argparse
import copy
import csv
import json
import os
import sys
import time

if __package__ in (None, ""):  # run as a file from a checkout: make `cm` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from cm import logger  # noqa: E402
from cm.digits_eval import digits_metrics, digits_split, load_digits_classifier, real_data_floor  # noqa: E402
from cm.fp16_util import bf16_is_native  # noqa: E402
from cm.image_util import image_grid, save_npz, to_uint8  # noqa: E402
from cm.random_util import get_generator  # noqa: E402
from cm.sampling import karras_sample, ternary_search  # noqa: E402
from cm.script_util import parse_args_with_config  # noqa: E402
from cm.train_cli import build_loop, create_argparser, ema_and_scales_fn  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
EVAL_RESERVE_S = 15  # sampling, the two-step search and the metrics after training (about 8 s)
TIMING_STEPS = 100  # opening steps of each stage that are timed to plan the rest
FINAL_STRETCH = 300  # steps: below this many left, the plan is final
STEP_TIME_MARGIN = 1.03


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("ct", "cd"), default="ct", help="consistency training, or EDM + distillation")
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget of the whole run")
    p.add_argument("--out", default="quickstart_out", help="output directory")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bfloat16 autocast where the hardware computes it natively, else float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="training steps per stage (0: fill the time budget)")
    p.add_argument("--num_samples", type=int, default=600, help="samples per metric")
    return p.parse_args(argv)


def use_bf16(opts):
    """--precision resolved: auto picks bfloat16 on a CUDA GPU or CPU with native bf16 (about 1.3x faster here)."""
    if opts.precision != "auto":
        return opts.precision == "bf16"
    device = opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return bf16_is_native(device)


def training_args(config, mode, log_dir, opts, extra=()):
    """Flags of one training stage: the YAML config, then the quickstart's overrides."""
    argv = ["--config", os.path.join(CONFIGS, config), "--log_dir", log_dir, "--seed", str(opts.seed),
            "--device", opts.device, "--use_bf16", str(use_bf16(opts)).lower(), *extra]
    return parse_args_with_config(create_argparser(mode), argv)


def train_stage(args, budget_s, fixed_steps):
    """Run one stage with fixed_steps, or with as many steps as fit in budget_s; returns the loop.

    With a budget, the run is timed as it goes: after the first TIMING_STEPS steps, and then halfway through
    what is left, the step count (and with it the N(k) / mu(k) schedule and the learning-rate decay) is set
    again from the latest speed, so that the stage ends on time even when the machine's speed varies.
    """
    if fixed_steps:
        args.total_training_steps = args.lr_anneal_steps = fixed_steps
        args.max_minutes = 0.0
        loop = build_loop(args)
        loop.run_loop()
        return loop
    start = time.time()
    args.max_minutes = budget_s * 1.5 / 60  # a safety stop; the plan ends well before it
    loop = build_loop(args)  # provisional schedule: the config's step count
    loop.total_training_steps, loop.progress = TIMING_STEPS, False
    print(f"{args.training_mode}: timing the first {TIMING_STEPS} steps", flush=True)
    while True:
        timed_from, first = time.time(), loop.step
        loop.run_loop()
        if loop.step < loop.total_training_steps:  # Ctrl-C or the safety stop: sample what was trained
            return loop
        per_step = (time.time() - timed_from) / (loop.step - first) * STEP_TIME_MARGIN
        steps = loop.step + max(0, int((budget_s - (time.time() - start)) / per_step))
        print(f"{args.training_mode}: {per_step:.3f} s/step -> {steps} steps in {budget_s / 60:.1f} min", flush=True)
        set_total_steps(loop, args, steps)
        left = steps - loop.step
        loop.total_training_steps = steps if left <= FINAL_STRETCH else loop.step + left // 2
        loop.progress = True
        if left <= FINAL_STRETCH:
            loop.run_loop()
            return loop


def set_total_steps(loop, args, steps):
    """Re-plan a run to end at `steps`: learning-rate decay and the N(k) / mu(k) schedule follow."""
    args.total_training_steps = args.lr_anneal_steps = loop.lr_anneal_steps = steps
    if hasattr(loop, "ema_scale_fn"):
        loop.ema_scale_fn = ema_and_scales_fn(args, steps)


def ema_model(loop):
    """The network with the stage's EMA weights, for sampling."""
    model = copy.deepcopy(loop.model)
    model.load_state_dict(loop.mp_trainer.master_params_to_state_dict(loop.ema_params[0]))
    return model.eval()


def draw(diffusion, model, num, image_size, seed, **sampler):
    """num samples with a seeded generator (sample k depends only on the seed and k)."""
    g = get_generator("determ", num, seed)
    with torch.inference_mode():
        return karras_sample(diffusion, model, (num, 3, image_size, image_size), generator=g,
                             device=next(model.parameters()).device, **sampler)


def best_two_step_ts(diffusion, model, n, image_size, seed, classifier):
    """The paper's ternary search of the intermediate grid index, scored by digits-FID on 300 samples."""
    def score(mid):
        x = draw(diffusion, model, 300, image_size, seed, sampler="multistep", steps=n, ts=(0, mid, n - 1))
        return digits_metrics(x.cpu(), classifier)["digits_fid"]

    mid, _ = ternary_search(score, 1, n - 2)
    return (0, mid, n - 1)


def save_grid(images, path, scale=4):
    """An 8 x 8 grid of [-1, 1] images, enlarged `scale` times for viewing."""
    grid = image_grid(to_uint8(images[:64].cpu()), ncols=8)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def plot_curves(csv_paths, path, width=640, height=300):
    """Training loss against step for each stage, on a log scale, drawn with PIL."""
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    left, top, right, bottom = 60, 30, width - 20, height - 40
    d.rectangle([left, top, right, bottom], outline="black")
    curves = []
    for name, p in csv_paths:
        with open(p, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("loss")]
        if rows:
            curves.append((name, np.array([float(r["step"]) for r in rows]), np.array([float(r["loss"]) for r in rows])))
    if not curves:
        img.save(path)
        return
    logs = np.log10(np.concatenate([c[2] for c in curves]).clip(1e-12))
    lo, hi = logs.min(), logs.max() + 1e-9
    colours = ["#1f77b4", "#d62728"]
    for i, (name, steps, loss) in enumerate(curves):
        x = left + (steps / steps.max()) * (right - left)
        y = bottom - (np.log10(loss.clip(1e-12)) - lo) / (hi - lo) * (bottom - top)
        d.line(list(zip(x.tolist(), y.tolist())), fill=colours[i % 2], width=2)
        d.text((left + 10, top + 8 + 14 * i), f"{name} loss", fill=colours[i % 2])
    d.text((left, bottom + 8), "0", fill="black")
    d.text((right - 60, bottom + 8), "last step", fill="black")
    d.text((5, top), f"{10 ** hi:.2g}", fill="black")
    d.text((5, bottom - 10), f"{10 ** lo:.2g}", fill="black")
    d.text((left + 150, 8), "training loss (log scale) against step", fill="black")
    img.save(path)


def main(argv=None):
    opts = parse_args(argv)
    start = time.time()
    os.makedirs(opts.out, exist_ok=True)
    budget = max(30.0, opts.minutes * 60 - EVAL_RESERVE_S)
    classifier = load_digits_classifier()  # trained and cached on first use (a few seconds)
    stages = []
    if opts.mode == "ct":
        args = training_args("digits_ct.yaml", "consistency_training", os.path.join(opts.out, "ct"), opts)
        loop = train_stage(args, budget - (time.time() - start), opts.steps)
        stages.append(("CT", os.path.join(args.log_dir, "progress.csv")))
    else:
        edm_args = training_args("digits_edm.yaml", "edm", os.path.join(opts.out, "edm"), opts)
        edm = train_stage(edm_args, (budget - (time.time() - start)) / 2, opts.steps)
        teacher_path = os.path.join(edm_args.log_dir, f"ema_{edm.ema_rate[0]}_{edm.step:06d}.pt")
        args = training_args("digits_cd.yaml", "consistency_distillation", os.path.join(opts.out, "cd"), opts,
                             ["--teacher_model_path", teacher_path])
        loop = train_stage(args, budget - (time.time() - start), opts.steps)
        stages += [("EDM", os.path.join(edm_args.log_dir, "progress.csv")), ("CD", os.path.join(args.log_dir, "progress.csv"))]
    train_s = time.time() - start
    logger.configure(dir=opts.out, format_strs=[])

    model, diffusion = ema_model(loop), loop.diffusion
    size, n = args.image_size, loop.ema_scale_fn(loop.step - 1)[1]
    ts = best_two_step_ts(diffusion, model, n, size, opts.seed + 1, classifier)
    one = draw(diffusion, model, opts.num_samples, size, opts.seed, sampler="onestep", steps=n).cpu()
    two = draw(diffusion, model, opts.num_samples, size, opts.seed, sampler="multistep", steps=n, ts=ts).cpu()
    (_, _), (real, _) = digits_split(size)

    save_grid(one, os.path.join(opts.out, "onestep_grid.png"))
    save_grid(two, os.path.join(opts.out, "twostep_grid.png"))
    save_grid(real, os.path.join(opts.out, "real_grid.png"))
    plot_curves(stages, os.path.join(opts.out, "training_curves.png"))
    save_npz(os.path.join(opts.out, f"samples_onestep_{opts.num_samples}x{size}x{size}x3.npz"), to_uint8(one).numpy())
    save_npz(os.path.join(opts.out, f"samples_twostep_{opts.num_samples}x{size}x{size}x3.npz"), to_uint8(two).numpy())

    rows = {
        "one-step": digits_metrics(one, classifier),
        f"two-step {ts}": digits_metrics(two, classifier),
        "real digits (floor)": real_data_floor(size, classifier),
    }
    metrics = {
        "mode": opts.mode,
        "precision": "bf16" if args.use_bf16 else "fp32",
        "steps": loop.step,
        "train_minutes": round(train_s / 60, 2),
        "total_minutes": round((time.time() - start) / 60, 2),
        "two_step_ts": list(ts),
        **rows,
    }
    with open(os.path.join(opts.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)

    print(f"\n{opts.mode.upper()} on digits: {loop.step} steps ({metrics['precision']}), {metrics['total_minutes']} min in all")
    print(f"{'samples':<22}{'digits-FID':>12}{'coverage':>10}")
    for name, r in rows.items():
        print(f"{name:<22}{r['digits_fid']:>12.3f}{r['coverage']:>10.3f}")
    print(f"\ngrids, curves, checkpoints and metrics.json in {os.path.abspath(opts.out)}")
    return metrics


if __name__ == "__main__":
    main()
