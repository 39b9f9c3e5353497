"""Zero-shot image editing with a consistency model (CM paper Alg. 4): one process, any image size.

    python scripts/image_edit.py --task inpaint --input photo.png --mask box --model_path ema.pt [model flags]
    python scripts/image_edit.py --task colorize --input photo.png ...
    python scripts/image_edit.py --task superres --factor 4 --input photo.png ...   (full-size or 1/4-size input)
    python scripts/image_edit.py --task interpolate --num_samples 2 --num_frames 8 ...
    python scripts/image_edit.py --task stroke --input painting.png --sigma 5 ...
    python scripts/image_edit.py --task denoise --input photo.png --sigma 0.3 ...

--input is a comma list of image files or an .npz (arr_0 uint8 NHWC); --num_samples N edits the first N.
Written to --log_dir: {task}.png, one row per image for the first --grid_rows images (input, what the model
is given, result; interpolation: the frames of one noise pair), and {task}_{N}x{H}x{W}x3.npz with every
result: arr_0 the results and (except for interpolate) arr_1 what the model was given, both uint8 NHWC.
"""

import os


import numpy as np
import torch
from tqdm.auto import tqdm

from cm import dist_util, editing, logger
from cm.checkpoint_io import write_atomic
from cm.image_util import (
    from_uint8,
    image_grid,
    load_sampling_model,
    output_dir,
    parse_ts,
    read_images,
    read_mask,
    save_npz,
    save_png,
    written_line,
    select_device,
    to_uint8,
)
from cm.config import config_to_json, resolve_script_config
from cm.random_util import get_generator
from cm.script_util import create_parser, run_script

DEFAULT_SIGMA = {"stroke": 5.0, "denoise": 0.3}


def create_argparser():
    """The editing flags of cm.flags and every model flag."""
    return create_parser("edit", "Zero-shot image editing with a consistency model.")


def resolve_config(args):
    """The resolved configuration: the model's (network, denoiser) and this script's flags, grouped."""
    return resolve_script_config(args, ["sample", "edit"])


def task_sigma(args):
    """The starting noise level of stroke / denoise (checked), or None for the other tasks."""
    if args.task not in DEFAULT_SIGMA:
        return None
    sigma = DEFAULT_SIGMA[args.task] if args.sigma < 0 else args.sigma
    editing.check_sigma(sigma, args.sigma_min, args.sigma_max)
    return sigma


def read_inputs(args):
    """(images shown in the strip [N, 3, S, S], images given to the task, mask or None), all float in [-1, 1]."""
    size = args.image_size
    if args.task == "superres":
        editing.check_factor(args.factor, size)
        images = from_uint8(read_images(args.input, size, keep_sizes=(size // args.factor,)))
        if images.shape[-1] == size:
            return images, editing.downsample(images, args.factor), None
        return editing.upsample(images, args.factor), images, None
    images = from_uint8(read_images(args.input, size))
    mask = None
    if args.task == "inpaint":
        if args.mask in editing.MASKS or not os.path.exists(args.mask):
            mask = editing.make_mask(args.mask, size, args.seed)
        else:
            mask = read_mask(args.mask, size)
    return images, images, mask


def first_inputs(inputs, num_samples):
    """The first num_samples inputs of read_inputs' (shown, given, mask) (-1: all of them)."""
    shown, given, mask = inputs
    if num_samples < 0:
        return inputs
    return shown[:num_samples], given[:num_samples], mask


def draw_labels(args, generator, count, device):
    """model kwargs with class labels for a class-conditional model: --class_label, or drawn from the generator."""
    if not args.class_cond:
        return {}
    if args.class_label >= 0:
        if args.class_label >= args.num_classes:
            raise ValueError(f"class_label must be below num_classes {args.num_classes}, got {args.class_label}")
        return {"y": torch.full((count,), args.class_label, dtype=torch.long, device=device)}
    return {"y": generator.randint(0, args.num_classes, (count,), device=device)}


def edit_batch(args, denoiser, images, mask, sigmas, sigma, generator):
    """(what the model is given, result) for one batch of the task."""
    common = dict(sigma_min=args.sigma_min)
    if args.task == "inpaint":
        after, before = editing.inpaint(denoiser, images, mask, sigmas, generator, **common)
    elif args.task == "colorize":
        after, before = editing.colorize(denoiser, images, sigmas, generator, **common)
    elif args.task == "superres":
        after, before = editing.superres(denoiser, images, args.factor, sigmas, generator, **common)
    elif args.task == "stroke":
        before = images
        after = editing.stroke_guided(denoiser, images, sigma, sigmas, generator, sigma_max=args.sigma_max, **common)
    else:
        before = images + generator.randn_like(images) * sigma if args.add_noise else images
        after = editing.denoise(denoiser, before, sigma, sigmas, generator, sigma_max=args.sigma_max, **common)
    return before, after


def run_edits(args, inputs, model, diffusion, sigmas, sigma, device):
    """Edit the inputs of read_inputs in batches; returns (rows of the strip [N, columns, S, S, 3], results, givens)."""
    shown, given, mask = inputs
    generator = get_generator(args.generator, len(given), args.seed)
    befores, afters = [], []
    for start in tqdm(range(0, len(given), args.batch_size), desc=args.task, unit="batch"):
        generator.set_done_samples(start)
        images = given[start : start + args.batch_size].to(device)
        kwargs = draw_labels(args, generator, len(images), device)
        denoiser = editing.make_denoiser(diffusion, model, args.clip_denoised, kwargs)
        with torch.inference_mode():
            before, after = edit_batch(args, denoiser, images, mask, sigmas, sigma, generator)
            befores.append(to_uint8(before, round_values=True).cpu().numpy())
            afters.append(to_uint8(after, round_values=True).cpu().numpy())
    before, after = np.concatenate(befores), np.concatenate(afters)
    first = to_uint8(shown, round_values=True).numpy()
    columns = [first, after] if np.array_equal(first, before) else [first, before, after]
    return np.stack(columns, axis=1), after, before


def run_interpolation(args, model, diffusion, device):
    """num_samples rows of num_frames one-step decodings between two noises; returns (rows, frames, None)."""
    pairs, n = max(1, args.num_samples), args.num_frames
    size = args.image_size
    generator = get_generator(args.generator, 2 * pairs, args.seed)
    per_batch = max(1, args.batch_size // n)
    frames = []
    for start in range(0, pairs, per_batch):
        count = min(per_batch, pairs - start)
        generator.set_done_samples(2 * start)
        kwargs = draw_labels(args, generator, 2 * count, device)
        kwargs = {"y": kwargs["y"][0::2].repeat_interleave(n)} if kwargs else {}
        z = generator.randn(2 * count, 3, size, size, device=device)
        denoiser = editing.make_denoiser(diffusion, model, args.clip_denoised, kwargs)
        with torch.inference_mode():
            out = editing.interpolate(denoiser, z[0::2], z[1::2], n, args.sigma_max)
            frames.append(to_uint8(out.flatten(0, 1), round_values=True).cpu().numpy())
    frames = np.concatenate(frames)
    return frames.reshape(pairs, n, size, size, 3), frames, None


def run(args):
    """Check the inputs, load the model, run the task, write {task}.png and the npz; returns paths and results."""
    editing.check_task(args.task)
    ts = parse_ts(args.ts)
    if ts is None:
        raise ValueError("--ts is required: increasing indices of the editing levels, e.g. 0,5,10,15,20,25,30,35,39")
    sigmas = editing.editing_sigmas(ts, args.steps, args.sigma_min, args.sigma_max)
    sigma = task_sigma(args)
    if args.task == "interpolate" and (args.num_frames < 2 or args.num_samples == 0):
        raise ValueError(
            f"interpolate needs num_frames >= 2 and num_samples >= 1, got {args.num_frames} and {args.num_samples}"
        )
    if args.grid_rows < 1:
        raise ValueError(f"grid_rows must be at least 1, got {args.grid_rows}")
    inputs = None if args.task == "interpolate" else first_inputs(read_inputs(args), args.num_samples)
    if not args.model_path:
        raise ValueError("no checkpoint given: pass --model_path (a consistency-model state dict)")
    select_device(args.device)
    log_dir = logger.configure(dir=output_dir(args.log_dir, "edits"), format_strs=["stdout", "log"])
    torch.manual_seed(args.seed)  # the global RNG, used by --generator dummy
    device = dist_util.dev()
    model, diffusion = load_sampling_model(args, device)
    config_path = os.path.join(log_dir, f"{args.task}_config.json")
    write_atomic(config_to_json(resolve_config(args)) + "\n", config_path)
    if args.task == "interpolate":
        logger.log(f"interpolate with {args.model_path} on {device}; one step at sigma {args.sigma_max}")
        rows, after, before = run_interpolation(args, model, diffusion, device)
    else:
        levels = editing.levels_from(sigma, sigmas, args.sigma_min) if sigma else sigmas
        listed = ", ".join(f"{s:.4g}" for s in levels.tolist())
        logger.log(f"{args.task} with {args.model_path} on {device}; noise levels {listed}")
        rows, after, before = run_edits(args, inputs, model, diffusion, sigmas, sigma, device)
    size = args.image_size
    npz = os.path.join(log_dir, f"{args.task}_{len(after)}x{size}x{size}x3.npz")
    save_npz(npz, *([after] if before is None else [after, before]))
    shown = rows[: args.grid_rows]
    strip = image_grid(shown.reshape(-1, size, size, 3), ncols=rows.shape[1])
    png = save_png(strip, os.path.join(log_dir, f"{args.task}.png"))
    logger.log(f"saved {png} ({len(shown)} of {len(rows)} rows) and {npz} (all {len(after)} results)")
    logger.log(written_line([png, npz, config_path, os.path.join(log_dir, "log.txt")]))
    return {"npz": npz, "png": png, "results": after, "given": before}


def main(argv=None):
    """Parse flags (and --config); bad input stops with one 'error:' line (CM_DEBUG=1 shows tracebacks)."""
    return run_script(create_argparser(), run, argv, resolve=resolve_config)


if __name__ == "__main__":
    main()
