"""How much of a digits-FID is sampling noise: real digits against real digits, and a model's sampling seeds.

    python benchmarks/digits_fid_noise.py                               # real digits only (a few seconds)
    python benchmarks/digits_fid_noise.py quickstart_out --seeds 8      # and a quickstart run, 8 sampling seeds

Real digits (cm.digits_eval.real_digits_spread): the 899 digits no generator or classifier sees (cm.digits_data's
reference and floor quarters) are split at random into halves of 449 and 450, `--splits` times, and each half is
scored against the other with the quickstart's digits-FID: the spread is what two sets of new real digits of about
the quickstart's size differ by. The fixed split the quickstart reports as its floor is printed beside it, with its
percentile.

A run (a scripts/quickstart.py --out folder with a consistency model): its last EMA checkpoint samples
`--num_samples` digits (the classes in turn, as the quickstart does) with sampling seeds 0 .. --seeds - 1, one step
and two steps at the default times (re-noised with --ctm_gamma, the quickstart's 0.9 unless given), and the
digits-FID of each seed is printed with their mean and standard deviation. It asserts nothing.
"""

import argparse
import glob
import json
import os
import sys

import numpy as np

from cm.digits_eval import digits_metrics, load_digits_classifier, real_data_floor, real_digits_spread
from cm.image_util import load_sampling_model
from cm.script_util import create_parser, parse_args_with_config

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def run_draws(quickstart, out, seeds, num_samples, ctm_gamma, classifier):
    """Per sampling seed: (one-step, two-step) digits-FID of the run's last EMA checkpoint."""
    paths = sorted(glob.glob(os.path.join(out, "*", "ema_*_*.pt")), key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"{out} holds no EMA checkpoint (ema_RATE_STEP.pt in a stage folder)")
    args = parse_args_with_config(create_parser("sample", ""), ["--model_path", paths[-1]])
    model, diffusion = load_sampling_model(args, "cpu")
    with open(os.path.join(out, "metrics.json")) as f:
        n = json.load(f)["two_step_ts_default"][-1] + 1  # the grid the run's two steps index
    size, rows = args.image_size, []
    for seed in range(seeds):
        one = quickstart.draw(diffusion, model, num_samples, size, seed, sampler="onestep", steps=n)
        two = quickstart.draw(diffusion, model, num_samples, size, seed, sampler="multistep", steps=n,
                              ts=quickstart.default_two_step_ts(n), ctm_gamma=ctm_gamma)
        rows.append((digits_metrics(one.cpu(), classifier)["digits_fid"],
                     digits_metrics(two.cpu(), classifier)["digits_fid"]))
    return paths[-1], n, np.array(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", help="scripts/quickstart.py --out folders")
    p.add_argument("--splits", type=int, default=200)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--num_samples", type=int, default=600)
    p.add_argument("--ctm_gamma", type=float, default=None)
    p.add_argument("--image_size", type=int, default=16)
    args = p.parse_args()
    classifier = load_digits_classifier()
    spread = real_digits_spread(args.image_size, classifier, args.splits)
    print(f"real digits, random halves of the unseen digits ({args.splits} splits, {args.image_size} px): mean "
          f"{spread['mean']:.3f}, sd {spread['sd']:.3f}, median {spread['median']:.3f}, 10-90% {spread['p10']:.3f}-"
          f"{spread['p90']:.3f}")
    floor = real_data_floor(args.image_size, classifier)["digits_fid"]
    print(f"the quickstart's floor (its fixed split): {floor:.3f}, percentile {spread['floor_percentile']:.0f}")
    if not args.runs:
        return
    sys.path.insert(0, SCRIPTS)
    import quickstart  # its sampling of the classes in turn, its two-step times and gamma

    gamma = quickstart.TWO_STEP_CTM_GAMMA if args.ctm_gamma is None else args.ctm_gamma
    for out in args.runs:
        path, n, rows = run_draws(quickstart, out, args.seeds, args.num_samples, gamma, classifier)
        print(f"{path} ({args.num_samples} samples, {n}-point grid, two steps at "
              f"{quickstart.default_two_step_ts(n)}, ctm_gamma {gamma}):")
        for seed, (one, two) in enumerate(rows):
            print(f"  sampling seed {seed}: one step {one:.3f}, two steps {two:.3f}")
        mean, sd = rows.mean(axis=0), rows.std(axis=0)
        print(f"  mean (sd): one step {mean[0]:.3f} ({sd[0]:.3f}), two steps {mean[1]:.3f} ({sd[1]:.3f})")


if __name__ == "__main__":
    main()
