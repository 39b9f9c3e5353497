"""Throughput of the evaluator's parts: Inception features (img/s), precision/recall, FID's matrix square root.

    python benchmarks/bench_evaluator.py [--threads 1] [--pr_size 10000] [--numpy]

Random Inception weights are used (the cost does not depend on the values). Prints numbers only;
nothing here is asserted. CUDA is timed too when available.
"""

import argparse

import numpy as np
import torch

from evaluations.inception import POOL_DIM, load_inception
from evaluations.metrics import FIDStatistics, ManifoldEstimator
from timing import time_call


def feature_throughput(device, batch_size, image_size, num_batches, channels_last):
    """Images per second of FIDInceptionV3 on uint8-range inputs of `image_size` px (resized to 299 inside).

    :param device: torch device.
    :param batch_size: images per forward pass.
    :param image_size: input height and width.
    :param num_batches: timed batches, after one warm-up batch.
    :param channels_last: use the channels-last memory format (the Evaluator's default).
    """
    model = load_inception(device=device, pretrained=False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (batch_size, 3, image_size, image_size), device=device).float()
    with torch.inference_mode():
        model(images)
        seconds = sum(time_call(lambda: model(images), device) for _ in range(num_batches))
    return batch_size * num_batches / seconds


def pool_like_features(num, dim, seed):
    """Non-negative features with the scale of Inception pool_3 activations (mean ~0.4)."""
    return np.random.default_rng(seed).gamma(2.0, 0.2, size=(num, dim)).astype(np.float32)


def precision_recall_seconds(device, num, dim, backend, fp16):
    """Seconds for evaluate_pr on num x num features (both manifolds' radii included).

    :param device: torch device of the distance blocks.
    :param num: features per set.
    :param dim: feature dimension.
    :param backend: "torch" or "numpy" distance blocks.
    :param fp16: reference float16-first distances, or float32 only.
    """
    real, fake = pool_like_features(num, dim, 0), pool_like_features(num, dim, 1)
    estimator = ManifoldEstimator(device=device, backend=backend, fp16=fp16)
    result = {}
    seconds = time_call(lambda: result.update(pr=estimator.evaluate_pr(real, None, fake, None)), device)
    return seconds, result["pr"]


def fid_seconds(dim, method):
    """Seconds for one Frechet distance between full-rank dim x dim covariances."""
    stats = [FIDStatistics.from_features(pool_like_features(2 * dim, dim, seed)) for seed in (2, 3)]
    return time_call(lambda: stats[0].frechet_distance(stats[1], method=method), "cpu")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--cpu_batch_size", type=int, default=16, help="images per forward pass on CPU")
    parser.add_argument("--cuda_batch_size", type=int, default=256, help="images per forward pass on CUDA")
    parser.add_argument("--num_batches", type=int, default=3, help="timed batches per feature measurement")
    parser.add_argument("--image_sizes", type=int, nargs="+", default=[32, 256], help="input sizes in px")
    parser.add_argument("--pr_size", type=int, default=10000, help="features per set for precision/recall")
    parser.add_argument("--numpy", action="store_true", help="also time the numpy reference distance blocks")
    parser.add_argument("--skip_fid", action="store_true", help="skip the 2048-d FID timings")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, devices: {', '.join(devices)}")

    for device in devices:
        batch_size = args.cuda_batch_size if device == "cuda" else args.cpu_batch_size
        for size in args.image_sizes:
            for channels_last in (True, False):
                rate = feature_throughput(device, batch_size, size, args.num_batches, channels_last)
                layout = "channels_last" if channels_last else "NCHW"
                print(f"features {device:4s} batch {batch_size:3d} {size:3d}px {layout:13s}: {rate:8.1f} img/s")

    runs = [(device, "torch", True) for device in devices] + [("cpu", "torch", False)]
    if args.numpy:
        runs.append(("cpu", "numpy", True))
    for device, backend, fp16 in runs:
        seconds, (precision, recall) = precision_recall_seconds(device, args.pr_size, POOL_DIM, backend, fp16)
        dtype = "fp16-first" if fp16 else "fp32"
        print(f"precision/recall {args.pr_size} x {args.pr_size} x {POOL_DIM} {device:4s} {backend:5s} {dtype:10s}: "
              f"{seconds:7.1f} s (precision {precision[0]:.4f}, recall {recall[0]:.4f})")

    if not args.skip_fid:
        for method in ("sqrtm", "eigh"):
            print(f"frechet distance {POOL_DIM}-d, {method:5s}: {fid_seconds(POOL_DIM, method):6.1f} s")


if __name__ == "__main__":
    main()
