"""Cost of the sample-indexed random draws (cm.sample_rng, --sample_indexed_rng) on a digits CT training step.

    python benchmarks/bench_sample_rng.py                  # configs/digits_ct.yaml, CPU
    python benchmarks/bench_sample_rng.py --microbatch 32  # the same global batch (128) in 4 micro-batches

Builds the preset's loop twice in one process (per-rank streams, sample-indexed draws) and times their steps in
turn on the same batches, so machine load hits both alike. Prints the median and best milliseconds per step, their
ratios, and how many operations the mode saw in one step. It asserts nothing.
"""

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cm import logger, sample_rng  # noqa: E402
from cm.sample_rng import SampleIndexedDraws  # noqa: E402
from cm.script_util import parse_args_with_config  # noqa: E402
from cm.train_cli import build_loop, create_argparser  # noqa: E402
from timing import time_call  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(indexed, args):
    """The digits CT loop of the preset with or without sample-indexed draws."""
    argv = ["--config", os.path.join(ROOT, "configs", "digits_ct.yaml"), "--log_dir", tempfile.mkdtemp(),
            "--sample_indexed_rng", str(indexed).lower(), "--microbatch", str(args.microbatch),
            "--device", args.device]
    loop = build_loop(parse_args_with_config(create_argparser("consistency_training"), argv))
    logger.configure(dir=tempfile.mkdtemp(), format_strs=[])
    return loop


def summary(seconds):
    """(median, minimum) of a list of step times."""
    ordered = sorted(seconds)
    return ordered[len(ordered) // 2], ordered[0]


class CountingDraws(SampleIndexedDraws):
    """SampleIndexedDraws that counts the operations it sees."""

    seen = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        CountingDraws.seen += 1
        return super().__torch_function__(func, types, args, kwargs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--microbatch", type=int, default=-1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    loops = {"per-rank streams": build(False, args), "sample-indexed": build(True, args)}
    batches = [next(loops["per-rank streams"].data) for _ in range(4)]
    times = {name: [] for name in loops}
    for r in range(-2, args.repeats):  # two untimed rounds, then the two loops in turn
        for name, loop in loops.items():
            seconds = time_call(lambda: loop.run_step(*batches[r % len(batches)]), args.device)
            if r >= 0:
                times[name].append(seconds)
    (base_median, base_min), (median, best) = (summary(times[name]) for name in loops)
    loop = loops["sample-indexed"]
    sample_rng.SampleIndexedDraws = CountingDraws  # what SampleRNG.micro_batch enters
    loop.run_step(*batches[0])
    sample_rng.SampleIndexedDraws = SampleIndexedDraws
    print(f"digits CT step, batch {loop.batch_size}, microbatch {loop.microbatch}, {args.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"per-rank streams {base_median * 1e3:.1f} ms/step (best {base_min * 1e3:.1f}), sample-indexed "
          f"{median * 1e3:.1f} ms/step (best {best * 1e3:.1f}); ratio of medians {median / base_median:.3f}, of bests "
          f"{best / base_min:.3f}; the mode saw {CountingDraws.seen} operations per step")


if __name__ == "__main__":
    main()
