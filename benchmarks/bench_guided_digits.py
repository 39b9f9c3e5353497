"""Class-conditional digits at equal CPU time: CD, LCM and UFOGen distilled from one guided EDM teacher.

    python scripts/edm_train.py --config configs/digits_edm_cfg.yaml --log_dir logs/digits_edm_cfg
    OMP_NUM_THREADS=1 python benchmarks/bench_guided_digits.py --teacher logs/digits_edm_cfg/ema_0.99_001500.pt \
        --cpu_minutes 5 --out benchmarks/guided_digits

Each method (configs/digits_cd_cfg.yaml, digits_lcm.yaml, digits_ufogen.yaml) first runs a short pilot that
measures its CPU seconds per step (process time, so other programs on a shared CPU do not count), then trains from
the teacher for as many steps as --cpu_minutes of CPU time allow, with its learning-rate decay over exactly those
steps. Its EMA model then samples --num_samples images with labels 0..9 in turn, and the digits classifier
(cm.digits_eval) scores them: per-class accuracy (share of class-c samples classified as c), digits-FID and class
coverage. The teacher itself (Heun, 35 evaluations, w = 1 and w = 2) is the reference. Prints a Markdown table,
writes results.json and one PNG grid per row (a row of ten samples per class). Nothing here is asserted.
"""

import argparse
import copy
import json
import os
import platform
import re
import time

import numpy as np
import torch

from cm.digits_eval import digits_metrics, load_digits_classifier
from cm.image_util import image_grid, save_png, to_uint8
from cm.random_util import get_generator
from cm.sampling import karras_sample, lcm_ts
from cm.script_util import parse_args_with_config
from cm.train_cli import build_loop, create_argparser
from cm.training_modes import build_denoiser, get_training_mode

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PILOT_STEPS = 30
# method: (preset, [(row name, sampler, number of steps, guidance scale)], flags added to the preset's)
METHODS = {
    "CD": ("digits_cd_cfg.yaml", [("CD 1 step", "onestep", 1, 1.0), ("CD 2 steps", "multistep", 2, 1.0),
                                  ("CD 4 steps", "multistep", 4, 1.0)], []),
    "LCM": ("digits_lcm.yaml", [(f"LCM {k} step{'s' * (k > 1)}, w = {w:g}", "lcm", k, w)
                                for w in (1.0, 2.0) for k in (1, 2, 4)], []),
    "LCM_w1": ("digits_lcm.yaml", [(f"LCM (trained at w = 1) {k} step{'s' * (k > 1)}", "lcm", k, 1.0)
                                   for k in (1, 2, 4)], ["--w_min", "1", "--w_max", "1"]),
    "UFOGen": ("digits_ufogen.yaml", [("UFOGen 1 step", "onestep", 1, 1.0), ("UFOGen 2 steps", "lcm", 2, 1.0)], []),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="class-conditional EDM checkpoint of configs/digits_edm_cfg.yaml")
    p.add_argument("--cpu_minutes", type=float, default=5.0, help="CPU time of each method's training")
    p.add_argument("--methods", default="CD,LCM,LCM_w1,UFOGen", help="comma list of " + ", ".join(METHODS))
    p.add_argument("--num_samples", type=int, default=1000, help="samples per row (labels 0..9 in turn)")
    p.add_argument("--out", default="guided_digits_out", help="output folder (logs, grids, results.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_teacher", action="store_true", help="leave out the teacher's own rows")
    return p.parse_args(argv)


def training_args(preset, log_dir, teacher, steps, seed, extra=()):
    argv = ["--config", os.path.join(CONFIGS, preset), "--log_dir", log_dir, "--teacher_model_path", teacher,
            "--total_training_steps", str(steps), "--lr_anneal_steps", str(steps), "--save_interval", "-1",
            "--seed", str(seed), "--device", "cpu", *extra]
    return parse_args_with_config(create_argparser(None), argv)


def train_for_cpu_time(preset, teacher, cpu_seconds, out, seed, extra=()):
    """(loop, steps, CPU seconds spent): a pilot measures CPU seconds per step, then the run that fits cpu_seconds."""
    pilot = build_loop(training_args(preset, os.path.join(out, "pilot"), teacher, PILOT_STEPS, seed, extra))
    pilot.progress = False
    start = time.process_time()
    pilot.run_loop()
    per_step = (time.process_time() - start) / PILOT_STEPS
    steps = max(1, int(cpu_seconds / per_step))
    print(f"{preset}: {per_step:.3f} CPU s/step -> {steps} steps", flush=True)
    loop = build_loop(training_args(preset, os.path.join(out, "run"), teacher, steps, seed, extra))
    start = time.process_time()
    loop.run_loop()
    return loop, steps, time.process_time() - start


def ema_model(loop):
    model = copy.deepcopy(loop.model)
    model.load_state_dict(loop.mp_trainer.master_params_to_state_dict(loop.ema_params[0]))
    return model.eval().requires_grad_(False)


def sampler_kwargs(sampler, num_steps, grid):
    """karras_sample arguments of `num_steps` steps on the training grid of `grid` points."""
    if sampler == "multistep":
        return dict(sampler="multistep", steps=grid, ts=lcm_ts(num_steps, grid) + (grid - 1,))
    if sampler == "lcm":
        return dict(sampler="lcm", steps=grid, ts=lcm_ts(num_steps, grid))
    return dict(sampler=sampler, steps=grid)


def draw(diffusion, model, num, seed, guidance, **kwargs):
    """num samples (uint8 NHWC) with labels 0..9 in turn, from a seeded generator, and the labels."""
    labels = torch.arange(num) % 10
    with torch.inference_mode():
        x = karras_sample(diffusion, model, (num, 3, 16, 16), model_kwargs={"y": labels}, guidance_scale=guidance,
                          generator=get_generator("determ", num, seed), sigma_min=diffusion.sigma_min,
                          sigma_max=diffusion.sigma_max, **kwargs)
    return to_uint8(x).numpy(), labels.numpy()


def score(images, labels, classifier):
    """Per-class accuracy under the digits classifier, its mean, digits-FID and coverage."""
    metrics = digits_metrics(images, classifier, labels)
    return {"per_class_accuracy": metrics["per_class_accuracy"], "accuracy": metrics["label_accuracy"],
            "digits_fid": metrics["digits_fid"], "coverage": metrics["coverage"]}


def save_class_grid(images, labels, path, scale=4):
    """Ten samples of each class, one class per row, upscaled for viewing."""
    rows = [images[labels == c][:10] for c in range(10)]
    grid = image_grid(np.concatenate(rows), ncols=10)
    save_png(np.kron(grid, np.ones((scale, scale, 1), np.uint8)), path)


def grid_name(row):
    """'LCM 2 steps, w = 2' -> 'LCM_2_steps_w_2.png'."""
    return re.sub(r"[^A-Za-z0-9]+", "_", row).strip("_") + ".png"


def evaluate(name, diffusion, model, grid, sampler, num_steps, guidance, opts, classifier, row):
    images, labels = draw(diffusion, model, opts.num_samples, opts.seed, guidance,
                          **sampler_kwargs(sampler, num_steps, grid))
    result = {"row": name, **score(images, labels, classifier), **row}
    save_class_grid(images, labels, os.path.join(opts.out, grid_name(name)))
    print(f"{name}: accuracy {result['accuracy']:.3f}, digits-FID {result['digits_fid']:.3f}", flush=True)
    return result


def teacher_rows(opts, classifier):
    """The teacher itself: Heun on its 18-point grid (35 evaluations), at w = 1 and with guidance w = 2."""
    args = training_args("digits_cd_cfg.yaml", os.path.join(opts.out, "teacher_eval"), opts.teacher, 1, opts.seed)
    loop = build_loop(args)
    teacher, diffusion = loop.teacher_model.eval(), loop.teacher_diffusion
    return [evaluate(f"teacher Heun 35 NFE, w = {w:g}", diffusion, teacher, 18, "heun", 18, w, opts, classifier,
                     {"train_steps": None, "cpu_minutes": None}) for w in (1.0, 2.0)]


def main(argv=None):
    opts = parse_args(argv)
    os.makedirs(opts.out, exist_ok=True)
    torch.set_num_threads(1)
    classifier = load_digits_classifier()
    results = [] if opts.no_teacher else teacher_rows(opts, classifier)
    for method in opts.methods.split(","):
        preset, rows, extra = METHODS[method]
        loop, steps, cpu = train_for_cpu_time(preset, opts.teacher, 60 * opts.cpu_minutes,
                                              os.path.join(opts.out, method), opts.seed, extra)
        mode = get_training_mode(loop.training_mode)
        diffusion, model = build_denoiser(mode, loop.run_config["denoiser"]), ema_model(loop)
        grid = loop.run_config["schedule"]["start_scales"]
        for name, sampler, num_steps, guidance in rows:
            results.append(evaluate(name, diffusion, model, grid, sampler, num_steps, guidance, opts, classifier,
                                    {"train_steps": steps, "cpu_minutes": cpu / 60}))
    with open(os.path.join(opts.out, "results.json"), "w") as f:
        json.dump({"cpu": platform.processor() or platform.machine(), "results": results}, f, indent=2)
    print("\n| samples | train steps (CPU min) | mean per-class accuracy | worst class | digits-FID | coverage |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        trained = "-" if r["train_steps"] is None else f"{r['train_steps']} ({r['cpu_minutes']:.1f})"
        worst = int(np.argmin(r["per_class_accuracy"]))
        print(f"| {r['row']} | {trained} | {r['accuracy']:.3f} | {worst}: {r['per_class_accuracy'][worst]:.2f} | "
              f"{r['digits_fid']:.3f} | {r['coverage']:.3f} |")


if __name__ == "__main__":
    main()
