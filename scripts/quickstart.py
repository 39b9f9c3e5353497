"""Train a consistency model on the embedded digits on a CPU in a few minutes, sample it and score it.

    python scripts/quickstart.py                  # consistency training (configs/digits_ct.yaml), ~5 minutes
    python scripts/quickstart.py --mode cd        # EDM teacher (digits_edm.yaml), then distillation (digits_cd.yaml)
    python scripts/quickstart.py --minutes 10 --out my_run --device cuda
    python scripts/quickstart.py --train_flags "--model_type adm --batch_size 16"   # the earlier default, a UNet

Everything goes to --out: one-step and two-step sample grids next to real digits, training curves, the
checkpoints, samples as npz and metrics.json. The run uses the library's own training loop
(cm.train_util.CMTrainLoop) with --time_budget_minutes, so it re-plans its step count and schedules to fit
the time budget. The generator trains on the training half of the digits (data_dir digits_train); quality is
measured with cm.digits_eval on the other half, which it never sees: a small digits classifier's Frechet
distance to the reference quarter ("digits-FID", lower is better; the floor quarter gives the real-data floor),
class coverage (1 = all ten digits equally) and a nearest-neighbour memorisation check (nearest=train: share
of samples whose nearest real digit is a training one, 0.5 for new digits, 1 for copies). Each score is the mean
over --num_draws (4) draws of --num_samples (600) digits with their own sampling seeds, printed beside the spread
between the draws and the first draw's digits-FID (the draw the grids show). Two-step sampling is
scored at the default intermediate time (DEFAULT_MID_FRACTION of the grid) and at the ternary-searched one; a
consistency model's second step re-noises with CTM's gamma-sampling (--ctm_gamma 0.9; 1 is the CM paper's fresh noise).
A class-conditional model (the default preset's) is sampled with the classes in turn, its grids are ten wide (one
digit per column), and each row also says how often a sample is the digit it was asked for ("as asked").
Every result names the CPU it ran on and whether that CPU computes bfloat16 natively.

A rerun into the same --out starts a fresh run there: the earlier results are moved into
--out/previous-<date>-<time>/ (one line says so), so nothing is lost and nothing is mixed. While a quickstart
runs it holds --out (cm.run_dir.lock_log_dir): a second one into the same folder stops with one line.
"""

import argparse
import copy
import csv
import math
import os
import platform
import shlex
import time
from datetime import datetime


import numpy as np
import torch
from PIL import Image

from cm import logger
from cm.checkpoint_io import write_json_atomic, write_through_temporary
from cm.digits_eval import (digits_metrics, digits_split, load_digits_classifier, memorisation_check, real_data_floor,
                            real_digits_spread)
from cm.fp16_util import bf16_is_native
from cm.image_util import image_grid, save_image, save_npz, to_uint8
from cm.random_util import get_generator
from cm.sampling import check_ctm_gamma, karras_sample, ternary_search
from cm.run_dir import LOCK_FILE, lock_log_dir
from cm.script_util import parse_args_with_config, run_or_exit
from cm.train_cli import build_loop, create_argparser
from cm.training_modes import get_training_mode, quickstart_plans
from cm.trigflow import T_MID

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
EVAL_RESERVE_S = 15  # sampling, the two-step search and the metrics over four draws after training (about 5 s, 2-core Xeon)
# default two-step times: the intermediate grid index as a fraction of the grid, from the reference's ImageNet-64
# two-step command (--ts 0,22,39 on a 40-point grid)
DEFAULT_MID_FRACTION = 22 / 39
# two-step consistency sampling re-noises with CTM's gamma-sampling (cm.sampling.renoise_direction): 0.9 keeps
# sqrt(1 - 0.9^2) = 0.44 of the first step's own noise, the gamma whose two-step samples spread within each class as
# the training digits do (five-minute models' are narrower); on eight such models two-step digits-FID 0.07-0.11 lower
# than with the CM paper's fresh noise (gamma 1) at the default times (README, "Two steps and CTM's gamma")
TWO_STEP_CTM_GAMMA = 0.9
# every score is the mean over --num_draws draws of --num_samples: draw k samples with seed + DRAW_SEED_STRIDE * k, clear
# of the seed + 1 the two-step search samples with; one draw of 600 moves by sd 0.07-0.11 between sampling seeds (README,
# "How much of a digits-FID is noise"), four halve that and keep the expectation
DRAW_SEED_STRIDE = 1000
T_MIDS = tuple(round(0.3 + 0.1 * i, 1) for i in range(13))  # sCM two-step: intermediate times searched, 0.3 .. 1.5
TCM_MIDS = (0.2, 0.3, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0, 5.0)  # TCM two-step: noise levels searched (TCM's default: t')
FLOW_GRID = 20  # flow-map two-step: the intermediate time searched among 1 - i / 20 (MeanFlow's default: 0.5)
# --mode: the plans the training modes declare (cm.training_modes): the stages of the run as (name, preset in
# configs/, training mode); each stage's EMA model is the teacher of the next
PLANS = quickstart_plans()

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=tuple(PLANS), default="ct", help="the method: ct consistency training, cd an EDM "
                   "teacher then consistency distillation from it, ect, sct, scd, meanflow, ayf (EDM, then AYF flow-map "
                   "distillation), cmt (EDM, mid-training, "
                   "ECT), tcm (EDM, ECT, truncated stage 2); the stages of a plan share the time equally; the modes "
                   "that declare a digits plan (LCM, LCF and UFOGen need class labels and a guided teacher, so they "
                   "have none)")
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget of the whole run")
    p.add_argument("--out", default="quickstart_out", help="output directory")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto: bfloat16 autocast where the hardware computes it natively, else float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=0, help="training steps per stage (0: fill the time budget)")
    p.add_argument("--num_samples", type=int, default=600, help="samples per draw")
    p.add_argument("--num_draws", type=int, default=4,
                   help=f"draws behind each score: its digits-FID, coverage and memorisation shares are the means over "
                   f"--num_draws draws of --num_samples (sampling seeds seed, seed + {DRAW_SEED_STRIDE}, ...); the grids "
                   f"and npz files are the first draw's")
    p.add_argument("--ctm_gamma", type=float, default=None,
                   help=f"two-step consistency sampling (the modes that sample multistep): CTM's gamma, the share of "
                   f"fresh noise in the re-noising (default {TWO_STEP_CTM_GAMMA}; 1: the CM paper's Alg. 1)")
    p.add_argument("--search_samples", type=int, default=300,
                   help="samples behind each digits-FID score of the two-step search")
    p.add_argument("--train_flags", default="", help="training flags over every stage's preset, as on the training "
                   "command line, e.g. \"--model_type adm --batch_size 16\" (the earlier default network)")
    return p.parse_args(argv)


def run_device(opts):
    """--device resolved: auto picks CUDA when available."""
    return opts.device if opts.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def use_bf16(opts):
    """--precision resolved: auto picks bfloat16 on a CUDA GPU or CPU with native bf16 (about 1.3x faster here)."""
    if opts.precision != "auto":
        return opts.precision == "bf16"
    return bf16_is_native(run_device(opts))


def cpu_name():
    """The CPU's model name: /proc/cpuinfo's "model name" on Linux, else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware(device):
    """What a run's numbers were measured on: the CPU, its cores for this process, native bfloat16, the GPU."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = {"cpu": cpu_name(), "cpu_cores": cores, "torch_threads": torch.get_num_threads(),
            "cpu_bf16_native": bf16_is_native("cpu")}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), gpu_bf16_native=bf16_is_native("cuda"))
    return info


def describe_hardware(info):
    """One line naming the CPU (and GPU) and whether it computes bfloat16 natively."""
    native = "yes" if info["cpu_bf16_native"] else "no"
    line = f"{info['cpu']}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads), native bfloat16: {native}"
    if "gpu" in info:
        line += f"; GPU {info['gpu']}, native bfloat16: {'yes' if info['gpu_bf16_native'] else 'no'}"
    return line


def training_args(config, mode, log_dir, opts, extra=()):
    """Flags of one training stage: the YAML config, then the quickstart's overrides."""
    argv = ["--config", os.path.join(CONFIGS, config), "--log_dir", log_dir, "--seed", str(opts.seed),
            "--device", opts.device, "--use_bf16", str(use_bf16(opts)).lower(), *extra,
            *shlex.split(opts.train_flags)]
    return parse_args_with_config(create_argparser(mode), argv)


def train_stage(args, budget_s, fixed_steps):
    """Run one stage with fixed_steps, or with as many steps as fit in budget_s; returns the loop.

    With a budget the stage trains with --time_budget_minutes: the loop times itself and re-plans its step count,
    N(k) / mu(k) schedule and learning-rate decay from the measured speed (cm.time_budget), so that it ends on
    time even when the machine's speed varies. Ctrl-C ends it early; what was trained is sampled.
    """
    if fixed_steps:
        args.total_training_steps = args.lr_anneal_steps = fixed_steps
    else:
        args.time_budget_minutes = budget_s / 60
    loop = build_loop(args)
    loop.run_loop()
    return loop


def ema_model(loop):
    """The network with the stage's EMA weights, for sampling."""
    model = copy.deepcopy(loop.model)
    model.load_state_dict(loop.mp_trainer.master_params_to_state_dict(loop.ema_params[0]))
    return model.eval()


def sampling_denoiser(loop):
    """The denoiser the stage's samplers run: the loop's, with the frozen companion network of modes that sample
    with one (TCM: stage 1 below t', the stage's teacher)."""
    if loop.mode.companion_network:
        return loop.mode.attach_companion(loop.diffusion, loop.teacher_model)
    return loop.diffusion


def sample_labels(model, num):
    """The labels a class-conditional model is sampled with: the classes in turn (sample k asks for class
    k mod num_classes, so every class gets its share and a grid ten wide has one class per column); None for an
    unconditional model."""
    num_classes = getattr(model, "num_classes", None)
    return None if num_classes is None else torch.arange(num) % num_classes


def draw(diffusion, model, num, image_size, seed, **sampler):
    """num samples with a seeded generator (sample k depends only on the seed and k), class-conditional models
    asked for sample_labels."""
    g = get_generator("determ", num, seed)
    device = next(model.parameters()).device
    labels = sample_labels(model, num)
    if labels is not None:
        sampler = dict(sampler, model_kwargs={"y": labels.to(device)})
    with torch.inference_mode():
        return karras_sample(diffusion, model, (num, 3, image_size, image_size), generator=g, device=device,
                             **sampler)


def default_two_step_ts(n):
    """Two-step times (0, mid, n - 1) with mid at DEFAULT_MID_FRACTION of an n-point grid (n = 41: (0, 23, 40))."""
    mid = min(max(round(DEFAULT_MID_FRACTION * (n - 1)), 1), n - 2)
    return (0, mid, n - 1)


def best_two_step_ts(diffusion, model, n, image_size, seed, classifier, num=300, ctm_gamma=1.0):
    """The paper's ternary search of the intermediate grid index, scored by digits-FID on `num` samples."""
    def score(mid):
        x = draw(diffusion, model, num, image_size, seed, sampler="multistep", steps=n, ts=(0, mid, n - 1),
                 ctm_gamma=ctm_gamma)
        return digits_metrics(x.cpu(), classifier)["digits_fid"]

    mid, _ = ternary_search(score, 1, n - 2)
    return (0, mid, n - 1)


def best_t_mid(diffusion, model, image_size, seed, classifier, num=300, sampler="trigflow_twostep", mids=T_MIDS):
    """Two-step samplers with an intermediate time (sCM's TrigFlow t_mid, TCM's noise level): the one among `mids` by
    the same search, scored the same way."""
    def score(i):
        x = draw(diffusion, model, num, image_size, seed, sampler=sampler, steps=2, t_mid=mids[i])
        return digits_metrics(x.cpu(), classifier)["digits_fid"]

    best, _ = ternary_search(score, 0, len(mids) - 1)
    return mids[best]


def best_flow_mid(diffusion, model, image_size, seed, classifier, num=300):
    """Flow-map two-step sampling: the grid index i of the intermediate time 1 - i / FLOW_GRID, by the same search."""
    def score(mid):
        x = draw(diffusion, model, num, image_size, seed, sampler="meanflow", steps=FLOW_GRID, ts=(0, mid))
        return digits_metrics(x.cpu(), classifier)["digits_fid"]

    mid, _ = ternary_search(score, 1, FLOW_GRID - 1)
    return mid


def two_step_ctm_gamma(opts, plan):
    """--ctm_gamma resolved for a plan: TWO_STEP_CTM_GAMMA when its last stage samples two steps with the multistep
    sampler (None otherwise); one given for a plan that samples otherwise stops with one line."""
    two_step = get_training_mode(plan[-1][2]).samplers[1]
    if opts.ctm_gamma is None:
        return TWO_STEP_CTM_GAMMA if two_step == "multistep" else None
    check_ctm_gamma(two_step, opts.ctm_gamma)
    return opts.ctm_gamma


def few_step_samplers(loop, model, diffusion, size, opts, classifier, ctm_gamma=None):
    """({"one-step", "two-step default", "two-step searched": draw's sampler arguments}, {"default", "searched": the
    two-step times}) with the samplers of the stage's training mode: consistency models at Karras-grid indices (the
    reference's fraction, and the index found by search) re-noised with ctm_gamma (None: fresh noise, the CM
    paper's), sCM models at TrigFlow times (T, t_mid) (the paper's t_mid, and the one found by search), flow maps at
    flow times (1, t_mid) (0.5, and the one found by search), TCM pairs at noise levels (80, t_mid, 0) (t', and the
    one found by search). The searches sample with seed + 1, apart from the scored draws."""
    one_step, two_step = loop.mode.samplers
    if two_step == "multistep":
        n = loop.schedule_fn(loop.step - 1)["num_scales"]
        gamma = 1.0 if ctm_gamma is None else ctm_gamma
        ts = {"default": default_two_step_ts(n),
              "searched": best_two_step_ts(diffusion, model, n, size, opts.seed + 1, classifier, opts.search_samples,
                                           gamma)}
        kwargs = {which: dict(steps=n, ts=t, ctm_gamma=gamma) for which, t in ts.items()}
    elif two_step == "tcm_twostep":
        t_mid = best_t_mid(diffusion, model, size, opts.seed + 1, classifier, opts.search_samples, two_step, TCM_MIDS)
        ts = {"default": (80.0, diffusion.transition_t, 0.0), "searched": (80.0, t_mid, 0.0)}
        kwargs = {which: dict(steps=2, t_mid=t[1]) for which, t in ts.items()}
    elif two_step == "meanflow":
        mid = best_flow_mid(diffusion, model, size, opts.seed + 1, classifier, opts.search_samples)
        ts = {"default": (1.0, 0.5), "searched": (1.0, 1 - mid / FLOW_GRID)}
        kwargs = {"default": dict(steps=2), "searched": dict(steps=FLOW_GRID, ts=(0, mid))}
    else:
        start = round(math.atan(80.0 / diffusion.sigma_data), 4)  # karras_sample starts at sigma_max 80
        t_mid = best_t_mid(diffusion, model, size, opts.seed + 1, classifier, opts.search_samples)
        ts = {"default": (start, T_MID), "searched": (start, t_mid)}
        kwargs = {which: dict(steps=2, t_mid=t[1]) for which, t in ts.items()}
    samplers = {"one-step": dict(sampler=one_step, steps=kwargs["default"]["steps"])}
    samplers.update({f"two-step {which}": dict(sampler=two_step, **kw) for which, kw in kwargs.items()})
    return samplers, ts


def draw_seeds(seed, num_draws):
    """The sampling seeds of the scored draws: seed, seed + DRAW_SEED_STRIDE, ..."""
    return [seed + DRAW_SEED_STRIDE * k for k in range(num_draws)]


def mean_over_draws(per_draw):
    """One row of scores from each draw's: every number and per-class list averaged over the draws, with
    digits_fid_draws (each draw's digits-FID, in draw order) and digits_fid_sd (their standard deviation)."""
    row = {}
    for key, first in per_draw[0].items():
        mean = np.mean(np.array([d[key] for d in per_draw], dtype=float), axis=0)
        row[key] = mean.tolist() if isinstance(first, list) else float(mean)
    fids = [d["digits_fid"] for d in per_draw]
    row.update(digits_fid_draws=fids, digits_fid_sd=float(np.std(fids)))
    return row


def scored_draws(diffusion, model, samplers, size, opts, score):
    """({sampler name: its first draw}, {sampler name: mean_over_draws of score(draw)}) over draw_seeds."""
    first, rows = {}, {}
    for name, sampler in samplers.items():
        draws = [draw(diffusion, model, opts.num_samples, size, seed, **sampler).cpu()
                 for seed in draw_seeds(opts.seed, opts.num_draws)]
        first[name], rows[name] = draws[0], mean_over_draws([score(x) for x in draws])
    return first, rows


def save_grid(images, path, scale=4, ncols=8):
    """An ncols x ncols grid of [-1, 1] images, enlarged `scale` times for viewing (ten wide for a class-conditional
    model's samples: one class per column)."""
    grid = image_grid(to_uint8(images[:ncols * ncols].cpu()), ncols=ncols)
    save_image(Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST), path)


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
    write_through_temporary(path, lambda f: fig.savefig(f, format="png"))


PREVIOUS_PREFIX = "previous-"


def set_aside_previous_run(out):
    """Move what an earlier run left in `out` into out/previous-<date>-<time>/ (earlier previous-* folders and
    the lock stay); returns that folder, or None when there was nothing to move."""
    leftovers = sorted(n for n in os.listdir(out) if not n.startswith(PREVIOUS_PREFIX) and n != LOCK_FILE)
    if not leftovers:
        return None
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    target, k = os.path.join(out, PREVIOUS_PREFIX + stamp), 1
    while os.path.exists(target):
        k += 1
        target = os.path.join(out, f"{PREVIOUS_PREFIX}{stamp}-{k}")
    os.makedirs(target)
    for name in leftovers:
        os.replace(os.path.join(out, name), os.path.join(target, name))
    return target


def main(argv=None):
    """Run the quickstart; any failure ends in one 'error:' line (cm.script_util.run_or_exit). Returns the metrics."""
    return run_or_exit(quickstart, parse_args(argv))


def quickstart(opts):
    """Train the plan of --mode into --out, sample, score and write the results; returns the metrics."""
    start = time.time()
    plan = PLANS[opts.mode]
    gamma = two_step_ctm_gamma(opts, plan)  # a wrong --ctm_gamma stops here, before --out is touched
    if opts.num_draws < 1 or opts.num_samples < 2:
        raise ValueError(f"--num_draws must be at least 1 and --num_samples at least 2 (a digits-FID needs two samples), "
                         f"got {opts.num_draws} and {opts.num_samples}")
    os.makedirs(opts.out, exist_ok=True)
    lock_log_dir(opts.out)
    previous = set_aside_previous_run(opts.out)
    if previous:
        print(f"{opts.out} held an earlier run: moved it to {previous}; this run starts fresh")
    budget = max(30.0, opts.minutes * 60 - EVAL_RESERVE_S)
    classifier = load_digits_classifier()  # trained and cached on first use (a few seconds)
    stages, teacher_path = [], None
    for k, (name, config, mode) in enumerate(plan):
        extra = ["--teacher_model_path", teacher_path] if teacher_path else []
        args = training_args(config, mode, os.path.join(opts.out, name.lower()), opts, extra)
        stage_budget = (budget - (time.time() - start)) / (len(plan) - k)  # the time left, shared by what is left
        loop = train_stage(args, stage_budget, opts.steps)
        stages.append((name, os.path.join(args.log_dir, "progress.csv")))
        teacher_path = os.path.join(args.log_dir, f"ema_{loop.ema_rate[0]}_{loop.step:06d}.pt")
    train_s = time.time() - start
    logger.configure(dir=opts.out, format_strs=[])

    model, diffusion = ema_model(loop), sampling_denoiser(loop)
    size = args.image_size
    samplers, ts = few_step_samplers(loop, model, diffusion, size, opts, classifier, gamma)
    labels = sample_labels(model, opts.num_samples)

    def scores(images):
        return {**digits_metrics(images, classifier, labels), **memorisation_check(images)}

    first, rows = scored_draws(diffusion, model, samplers, size, opts, scores)
    rows["real digits (floor)"] = real_data_floor(size, classifier)
    real, _ = digits_split("floor", size)
    ncols = 8 if labels is None else model.num_classes
    save_grid(first["one-step"], os.path.join(opts.out, "onestep_grid.png"), ncols=ncols)
    save_grid(first["two-step searched"], os.path.join(opts.out, "twostep_grid.png"), ncols=ncols)
    save_grid(first["two-step default"], os.path.join(opts.out, "twostep_default_grid.png"), ncols=ncols)
    save_grid(real, os.path.join(opts.out, "real_grid.png"))
    plot_curves(stages, os.path.join(opts.out, "training_curves.png"))
    shape = f"{opts.num_samples}x{size}x{size}x3"
    save_npz(os.path.join(opts.out, f"samples_onestep_{shape}.npz"), to_uint8(first["one-step"]).numpy())
    save_npz(os.path.join(opts.out, f"samples_twostep_{shape}.npz"), to_uint8(first["two-step searched"]).numpy())
    save_npz(os.path.join(opts.out, f"samples_twostep_default_{shape}.npz"),
             to_uint8(first["two-step default"]).numpy())

    row_names = {"two-step default": f"two-step {ts['default']} default",
                 "two-step searched": f"two-step {ts['searched']} searched"}
    metrics = {
        "mode": opts.mode,
        "precision": "bf16" if args.use_bf16 else "fp32",
        "hardware": hardware(run_device(opts)),
        "steps": loop.step,
        "train_minutes": round(train_s / 60, 2),
        "total_minutes": round((time.time() - start) / 60, 2),
        "two_step_ts_default": list(ts["default"]),
        "two_step_ts_searched": list(ts["searched"]),
        "two_step_ctm_gamma": gamma,
        **rows,
        "real digits (random halves)": real_digits_spread(size, classifier),
    }
    write_json_atomic(metrics, os.path.join(opts.out, "metrics.json"))

    print(f"\n{opts.mode.upper()} on digits: {loop.step} steps ({metrics['precision']}), {metrics['total_minutes']} min in all")
    print(f"hardware: {describe_hardware(metrics['hardware'])}")
    asked = labels is not None  # class-conditional: how often a sample is the digit it was asked for
    print(f"{'samples':<31}{'digits-FID':>11}{'sd':>6}{'first':>7}{'coverage':>10}{'nearest=train':>15}{'copies':>8}"
          + (f"{'as asked':>10}" if asked else ""))
    for key, r in rows.items():
        drawn = "digits_fid_draws" in r  # the model's rows; the floor is one fixed split
        spread_cols = f"{r['digits_fid_sd']:>6.3f}{r['digits_fid_draws'][0]:>7.3f}" if drawn else f"{'-':>6}{'-':>7}"
        print(f"{row_names.get(key, key):<31}{r['digits_fid']:>11.3f}{spread_cols}{r['coverage']:>10.3f}"
              f"{r['nearest_is_train']:>15.3f}{r['copy_fraction']:>8.3f}"
              + (f"{r['label_accuracy']:>10.3f}" if asked else ""))
    seeds = ", ".join(map(str, draw_seeds(opts.seed, opts.num_draws)))
    print(f"sample rows: means over {opts.num_draws} draws of {opts.num_samples} (sampling seeds {seeds}); sd: between "
          f"the draws' digits-FIDs;\nfirst: the first draw's digits-FID (the draw in the grids and npz files)"
          "\nnearest=train: share of samples whose nearest real digit is a training one (0.5: new digits, 1: copies);"
          "\ncopies: share nearer a training digit than 95% of held-out digits are (about 0.05 for new digits)"
          + ("\nas asked: share of the samples of each class the digits classifier reads as that class (their mean over "
             "the classes;\nthe floor row: the classifier on real held-out digits)" if asked else ""))
    spread = metrics["real digits (random halves)"]
    print(f"real digits against real digits (random halves of the unseen digits): digits-FID median "
          f"{spread['median']:.2f}, 10-90% {spread['p10']:.2f}-{spread['p90']:.2f}; the floor row's fixed split is at "
          f"percentile {spread['floor_percentile']:.0f}")
    print(f"\ngrids, curves, checkpoints and metrics.json in {os.path.abspath(opts.out)}")
    return metrics


if __name__ == "__main__":
    main()
