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
import time


import numpy as np
import torch
from PIL import Image

from cm import logger
from cm.digits_eval import digits_metrics, digits_split, load_digits_classifier, real_data_floor
from cm.fp16_util import bf16_is_native
from cm.image_util import image_grid, save_npz, to_uint8
from cm.random_util import get_generator
from cm.sampling import karras_sample, ternary_search
from cm.script_util import parse_args_with_config
from cm.train_cli import build_loop, create_argparser, ema_and_scales_fn

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
EVAL_RESERVE_S = 15  # sampling, the two-step search and the metrics after training (about 8 s)
TIMING_STEPS = 100  # opening steps of each stage that are timed to plan the rest
FINAL_STRETCH = 300  # steps: below this many left, the plan is final
STEP_TIME_MARGIN = 1.03
# --mode: the stages of the run as (name, preset in configs/, training mode); each stage's EMA model is the
# teacher of the next
PLANS = {
    "ct": [("CT", "digits_ct.yaml", "consistency_training")],
    "cd": [("EDM", "digits_edm.yaml", "edm"), ("CD", "digits_cd.yaml", "consistency_distillation")],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=tuple(PLANS), default="ct", help="ct: consistency training; cd: an EDM teacher, "
                   "then consistency distillation from it (each stage gets half the time)")
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
        loop.ema_scale_fn = ema_and_scales_fn(loop.run_config, steps)


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
    """Training loss against step, one panel per stage (log scale): all noise levels and each quartile of
    log sigma (progress.csv's loss_q0..loss_q3), plus the digits-FID when the log has it. Drawn with
    matplotlib's Agg backend, `width` x `height` pixels per panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def columns(csv_path):
        with open(csv_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("loss") and r.get("step")]
        names = rows[0].keys() if rows else ()
        values = {k: np.array([float(r[k]) if r.get(k) else np.nan for r in rows]) for k in names}
        return {k: np.where(v > 0, v, np.nan) if k.startswith("loss") else v for k, v in values.items()}

    quartiles = ("lowest", "second", "third", "highest")
    stages = [(name, columns(p)) for name, p in csv_paths]
    stages = [(name, data) for name, data in stages if data] or [("no losses logged", {})]
    fig = Figure(figsize=(width / 100 * len(stages), height / 100), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (name, data) in zip(fig.subplots(1, len(stages), squeeze=False)[0], stages):
        ax.set_title(f"{name}: training loss" if data else name)
        ax.set_xlabel("training step")
        ax.set_ylabel("loss (log scale)")
        if not data:
            continue
        marker = "o" if len(data["step"]) <= 30 else None

        def line(axes, key, **style):  # logged points only, joined across rows that lack the key
            keep = np.isfinite(data[key])
            axes.plot(data["step"][keep], data[key][keep], marker=marker, ms=3, **style)

        for q, label in enumerate(quartiles):
            if f"loss_q{q}" in data:
                line(ax, f"loss_q{q}", lw=1, label=f"{label} quarter of log σ")
        line(ax, "loss", color="black", lw=2, label="all noise levels")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
        if "digits_fid" in data:
            twin = ax.twinx()
            line(twin, "digits_fid", color="tab:purple", ls="--")
            twin.set_ylabel("digits-FID (dashed)", color="tab:purple")
    fig.savefig(path)


def main(argv=None):
    opts = parse_args(argv)
    start = time.time()
    os.makedirs(opts.out, exist_ok=True)
    budget = max(30.0, opts.minutes * 60 - EVAL_RESERVE_S)
    classifier = load_digits_classifier()  # trained and cached on first use (a few seconds)
    stages, teacher_path = [], None
    plan = PLANS[opts.mode]
    for k, (name, config, mode) in enumerate(plan):
        extra = ["--teacher_model_path", teacher_path] if teacher_path else []
        args = training_args(config, mode, os.path.join(opts.out, name.lower()), opts, extra)
        stage_budget = (budget - (time.time() - start)) / (len(plan) - k)  # the time left, shared by what is left
        loop = train_stage(args, stage_budget, opts.steps)
        stages.append((name, os.path.join(args.log_dir, "progress.csv")))
        teacher_path = os.path.join(args.log_dir, f"ema_{loop.ema_rate[0]}_{loop.step:06d}.pt")
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
