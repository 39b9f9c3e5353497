"""Generate images from a model into samples_{N}x{H}x{W}x{C}.npz (the reference's format) and a PNG grid.

    python scripts/image_sample.py --training_mode consistency_distillation --sampler onestep \\
        --model_path ema_0.9999_050000.pt [model flags, or --config FILE.yaml]
    mpiexec -n 8 python scripts/image_sample.py ...   (or torchrun): each rank makes its share,
                                                      rank 0 writes one npz of exactly num_samples images

The npz holds arr_0 (uint8 [N, H, W, 3]) and, for class-conditional models, arr_1 (int64 labels [N]).
"""

import os
import time

import torch


from cm import dist_util, logger
from cm.compile import compile_blocks
from cm.checkpoint_io import write_atomic
from cm.image_util import (
    GRID_IMAGES,
    generate_samples,
    grid_path,
    image_grid,
    load_sampling_model,
    output_dir,
    parse_ts,
    save_npz,
    save_png,
    written_line,
    select_device,
)
from cm.config import config_to_json, resolve_script_config
from cm.latent import DenormalizingDecoder, channel_normalizer, load_autoencoder, resolve_latent_norm
from cm.random_util import get_generator
from cm.sampling import SAMPLERS, check_ctm_gamma
from cm.script_util import create_parser, run_script


def create_argparser():
    """The sampling flags of cm.flags (the reference's image_sample.py flags, plus device, precision and
    output) and every model flag."""
    return create_parser("sample", "Generate samples from a model into an npz file.")


def resolve_config(args):
    """The resolved configuration: the model's (network, denoiser) and this script's flags, grouped."""
    return resolve_script_config(args, ["sample"])


def sample_kwargs(args):
    """karras_sample arguments from the flags; ts is checked against the grid before any model is built."""
    entry = SAMPLERS[args.sampler]
    ts = parse_ts(args.ts) if entry.example_ts else None
    if entry.example_ts and ts is None:
        example = ",".join(str(i) for i in entry.example_ts(args.steps))
        raise ValueError(
            f"--sampler {args.sampler} needs --ts, increasing indices into the {args.steps}-point grid, "
            f"e.g. --ts {example}"
        )
    if ts is not None:  # the grid's own checks, before any model is built
        entry.grid(args.steps, ts, args.sigma_min, args.sigma_max, 7.0, "cpu")
    check_ctm_gamma(args.sampler, args.ctm_gamma)
    return dict(
        guidance_scale=args.guidance_scale,
        steps=args.steps,
        clip_denoised=args.clip_denoised,
        sampler=args.sampler,
        sigma_min=args.sigma_min,
        sigma_max=args.sigma_max,
        s_churn=args.s_churn,
        s_tmin=args.s_tmin,
        s_tmax=args.s_tmax,
        s_noise=args.s_noise,
        ts=ts,
        ctm_gamma=args.ctm_gamma,
    )


def npz_name(num_samples, image_size):
    """The reference's file name, samples_{N}x{H}x{W}x{C}.npz."""
    return f"samples_{num_samples}x{image_size}x{image_size}x3.npz"


def latent_sampling(args, device, kwargs):
    """generate_samples' autoencoder and latent_shape for --autoencoder_path (cm.latent), else {}; latents are
    not clamped to [-1, 1] (clip_denoised applies to pixels)."""
    if not args.autoencoder_path:
        return {}
    config = resolve_config(args)
    network = config["network"]
    if kwargs["clip_denoised"]:
        logger.log("note: --clip_denoised acts on pixels; latents are not clamped (the decoded images are)")
        kwargs["clip_denoised"] = False
    shape = (network["in_channels"], network["image_size"], network["image_size"])
    autoencoder = load_autoencoder(args.autoencoder_path, device)
    normalizer = channel_normalizer(resolve_latent_norm(config["latent"]))
    if normalizer is not None:  # --latent_norm channel: undo the run's normalisation before decoding
        autoencoder = DenormalizingDecoder(autoencoder, *normalizer)
    return {"autoencoder": autoencoder, "latent_shape": shape}


def run(args):
    """Load the model, sample over all ranks, write the npz (and grid) on rank 0; returns the npz path there."""
    kwargs = sample_kwargs(args)
    if not args.model_path:
        raise ValueError("no checkpoint given: pass --model_path (e.g. ema_0.9999_NNNNNN.pt from a training log dir)")
    select_device(args.device)
    dist_util.setup_dist()
    log_dir = logger.configure(dir=output_dir(args.log_dir, "samples"), format_strs=["stdout", "log"])
    rank = dist_util.get_rank()
    if args.ts and kwargs["ts"] is None:
        logger.log(f"note: --ts selects grid indices for samplers that take them; ignored for {args.sampler}")
    torch.manual_seed(args.seed + rank)  # the global RNG (--generator dummy): seeded, different on every rank
    device = dist_util.dev()
    model, diffusion = load_sampling_model(args, device)
    if args.compile:
        compile_blocks(model)  # each block compiled once; the first batch pays the compile time
    if args.use_fp16 and device.type == "cpu":
        logger.log("note: float16 convolutions are slow on CPU; --use_bf16 is the fast reduced precision there")
    config_path = os.path.join(log_dir, "sample_config.json")
    if rank == 0:
        write_atomic(config_to_json(resolve_config(args)) + "\n", config_path)
    logger.log(
        f"sampling {args.num_samples} images ({args.sampler}"
        f"{', ts ' + ','.join(map(str, kwargs['ts'])) if kwargs['ts'] else ''}) from {args.model_path} on {device}, "
        f"{dist_util.get_world_size()} rank(s), batch {args.batch_size} per rank"
    )
    latent = latent_sampling(args, device, kwargs)
    generator = get_generator(args.generator, args.num_samples, args.seed)
    start = time.perf_counter()
    images, labels = generate_samples(
        diffusion, model, args.num_samples, args.batch_size, args.image_size, generator, kwargs,
        num_classes=args.num_classes if args.class_cond else None, **latent,
    )
    seconds = time.perf_counter() - start
    path = None
    if rank == 0:
        path = os.path.join(log_dir, npz_name(args.num_samples, args.image_size))
        if labels is not None:
            save_npz(path, images, labels)
        else:
            save_npz(path, images)
        grid = grid_path(args.grid, log_dir, "samples_grid.png")
        if grid:
            save_png(image_grid(images[:GRID_IMAGES]), grid)
        rate = args.num_samples / seconds
        logger.log(f"saved {path}{' and ' + grid if grid else ''}")
        logger.log(f"sampled {args.num_samples} images in {seconds:.2f} s: {rate:.2f} img/s")
        logger.log(written_line([path, grid, config_path, os.path.join(log_dir, "log.txt")]))
    dist_util.barrier()
    return path


def main(argv=None):
    """Parse flags (and --config); bad input stops with one 'error:' line (CM_DEBUG=1 shows tracebacks)."""
    return run_script(create_argparser(), run, argv, resolve=resolve_config)


if __name__ == "__main__":
    main()
