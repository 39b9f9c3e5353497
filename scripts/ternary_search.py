"""Ternary search of the intermediate grid index for few-step consistency sampling (the reference's script).

    python scripts/ternary_search.py --begin 0 --end 39 --steps 40 --model_path cd_imagenet64_lpips.pt \\
        --ref_batch imagenet64.npz --num_samples 50000 [model flags]       (2 steps: ts = 0, p, 39)
    python scripts/ternary_search.py --begin 0,17 --end 39 ...            (3 steps: the index after 17)
    python scripts/ternary_search.py --metric digits --model_path ema_0.999_004000.pt [digits model flags]

    python scripts/ternary_search.py --steps 20 --begin 0 --end 20 --training_mode meanflow --model_path ...
                                                             (a flow map, 2 jumps: t = 1, 1 - p / 20, 0)

Each probe p samples num_samples images with ts = begin + (p,) + end, all probes from the same seed (so they
differ only in p), and scores them: FID against --ref_batch (evaluations package; needs the Inception weights)
or, for models of the embedded digits, the digits-FID of cm.digits_eval (seconds on a CPU). Flow-map checkpoints
(--training_mode meanflow or ayf) are searched on the flow times 1 - i / steps, i = 0 .. steps, with the meanflow
sampler; their --end must finish at --steps (t = 0, where every jump sequence ends). Every probe is
printed, then the best ts; the probes are also written to ternary_search.json in the log dir.
Works under mpiexec / torchrun like image_sample.py (rank 0 scores).
"""

import json
import os
import time

import torch


from cm import dist_util, logger
from cm.checkpoint_io import write_json_atomic
from cm.image_util import (
    generate_samples,
    load_sampling_model,
    output_dir,
    parse_ts,
    select_device,
    written_line,
)
from cm.config import config_to_json, resolve_script_config
from cm.flowmap import flow_grid
from cm.random_util import get_generator
from cm.sampling import check_ctm_gamma, sigmas_from_ts, ternary_search
from cm.training_modes import FLAGS
from cm.script_util import create_parser, run_script

METRICS = FLAGS["metric"].choices


def search_range(begin, end, steps, sigma_min=0.002, sigma_max=80.0):
    """Candidates lo..hi for the index between begin[-1] and end[0]; begin + (p,) + end must be a valid multistep ts."""
    lo, hi = begin[-1] + 1, end[0] - 1
    if hi < lo:
        raise ValueError(f"no grid index lies strictly between begin {begin} and end {end}")
    sigmas_from_ts(begin + (lo,) + end, steps, sigma_min, sigma_max)  # the index checks of sampling
    return lo, hi


def flow_search_range(begin, end, steps):
    """Candidates lo..hi for a flow map's index on the flow grid 1 - i / steps (i = 0 .. steps, the last t = 0)."""
    if end[-1] != steps:
        raise ValueError(f"a flow map's search ends at t = 0, grid index --steps: pass --end {steps} (or end the "
                         f"comma list with it), got --end {','.join(map(str, end))}")
    lo, hi = begin[-1] + 1, end[0] - 1
    if hi < lo:
        raise ValueError(f"no grid index lies strictly between begin {begin} and end {end}")
    flow_grid(steps, begin + (lo,) + end[:-1])  # the index checks of the flow-map sampler
    return lo, hi


def probe_sampler(args, begin, end, p, flow_map):
    """karras_sample's settings of probe p: the multistep sampler at ts = begin + (p,) + end, or for a flow map the
    meanflow sampler jumping through the flow times of begin + (p,) + end (the final t = 0 implied)."""
    ts = begin + (p,) + end
    if flow_map:
        return dict(sampler="meanflow", ts=ts[:-1], steps=args.steps, sigma_max=args.sigma_max)
    return dict(sampler="multistep", ts=ts, steps=args.steps, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                clip_denoised=args.clip_denoised, ctm_gamma=args.ctm_gamma)


def create_argparser():
    """The search flags of cm.flags (the reference's, CPU-sized, plus metric and output) and every model flag."""
    return create_parser("search", "Ternary search of the intermediate index of few-step sampling.")


def resolve_config(args):
    """The resolved configuration: the model's (network, denoiser) and this script's flags, grouped."""
    return resolve_script_config(args, ["sample", "search"])


def resolve_metric(metric, ref_batch):
    """fid or digits from the --metric flag (auto: fid when a reference batch is given)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    if metric == "auto":
        return "fid" if ref_batch else "digits"
    if metric == "fid" and not ref_batch:
        raise ValueError("--metric fid needs --ref_batch (an .npz of reference images or statistics)")
    return metric


def digits_scorer():
    """uint8 samples -> digits-FID (cm.digits_eval), with the classifier loaded once."""
    from cm.digits_eval import digits_metrics, load_digits_classifier

    classifier = load_digits_classifier()
    return lambda images: digits_metrics(images, classifier)["digits_fid"]


def fid_scorer(ref_batch, weights, device):
    """uint8 samples -> FID against ref_batch (pool_3 statistics of the file, or of its images)."""
    from evaluations.evaluator import Evaluator, read_reference_statistics
    from evaluations.inception import load_inception
    from evaluations.metrics import FIDStatistics

    evaluator = Evaluator(load_inception(weights or None, device), device=device, progress=False)
    stats = read_reference_statistics(ref_batch)
    ref = stats[0] if stats is not None else evaluator.compute_statistics(evaluator.read_activations(ref_batch)[0])

    def score(images):
        batches = (images[i : i + evaluator.batch_size] for i in range(0, len(images), evaluator.batch_size))
        pool, _ = evaluator.compute_activations(batches)
        return ref.frechet_distance(FIDStatistics.from_features(pool))

    return score


def run(args):
    """Search p in (begin[-1], end[0]) minimising the metric; returns {"best_ts", "metric", "probes"}."""
    begin, end = parse_ts(args.begin), parse_ts(args.end)
    if begin is None or end is None:
        raise ValueError("--begin and --end must each hold at least one grid index")
    metric = resolve_metric(args.metric, args.ref_batch)
    if metric == "fid" and not os.path.exists(args.ref_batch):
        raise FileNotFoundError(f"reference batch {args.ref_batch} does not exist")
    if not args.model_path:
        raise ValueError("no checkpoint given: pass --model_path (a consistency-model state dict)")
    check_ctm_gamma("multistep", args.ctm_gamma)
    select_device(args.device)
    dist_util.setup_dist()
    log_dir = logger.configure(dir=output_dir(args.log_dir, "search"), format_strs=["stdout", "log"])
    rank = dist_util.get_rank()
    device = dist_util.dev()
    model, diffusion = load_sampling_model(args, device)
    flow_map = hasattr(diffusion, "flow_map")
    if flow_map:
        check_ctm_gamma("meanflow", args.ctm_gamma)
        lo, hi = flow_search_range(begin, end, args.steps)
    else:
        lo, hi = search_range(begin, end, args.steps, args.sigma_min, args.sigma_max)
    rank_seed = args.seed + rank  # the global RNG (--generator dummy) differs between ranks
    score = None
    if rank == 0:
        score = fid_scorer(args.ref_batch, args.inception_weights, device) if metric == "fid" else digits_scorer()
    name = "fid" if metric == "fid" else "digits_fid"
    logger.log(
        f"searching ts = {begin} + (p,) + {end} for p in [{lo}, {hi}] by {name}, {args.num_samples} samples per probe"
        + (f" (a flow map: index i is flow time 1 - i / {args.steps})" if flow_map else "")
    )

    def objective(p):
        ts = begin + (p,) + end
        start = time.perf_counter()
        torch.manual_seed(rank_seed)
        images, _ = generate_samples(
            diffusion, model, args.num_samples, args.batch_size, args.image_size,
            get_generator(args.generator, args.num_samples, args.seed),
            probe_sampler(args, begin, end, p, flow_map),
            num_classes=args.num_classes if args.class_cond else None, progress=False,
        )
        value = dist_util.broadcast_object(float(score(images)) if rank == 0 else None)
        logger.log(f"ts={','.join(map(str, ts))}: {name} {value:.4f} ({time.perf_counter() - start:.1f} s)")
        return value

    best, values = ternary_search(objective, lo, hi)
    best_ts = begin + (best,) + end
    logger.log(f"best ts: {','.join(map(str, best_ts))} ({name} {values[best]:.4f}, {len(values)} probes)")
    result = {"best_ts": list(best_ts), "metric": name, "probes": {str(p): v for p, v in values.items()}}
    if rank == 0:
        result_path = os.path.join(log_dir, "ternary_search.json")
        write_json_atomic({**result, "config": json.loads(config_to_json(resolve_config(args)))}, result_path)
        logger.log(written_line([result_path, os.path.join(log_dir, "log.txt")]))
    dist_util.barrier()
    return result


def main(argv=None):
    """Parse flags (and --config); bad input stops with one 'error:' line (CM_DEBUG=1 shows tracebacks)."""
    return run_script(create_argparser(), run, argv, resolve=resolve_config)


if __name__ == "__main__":
    main()
