"""Zero-shot image editing with a consistency model (CM paper Alg. 4): one process, any image size.

    python scripts/image_edit.py --task inpaint --input photo.png --mask box --model_path ema.pt [model flags]
    python scripts/image_edit.py --task colorize --input photo.png ...
    python scripts/image_edit.py --task superres --factor 4 --input photo.png ...   (full-size or 1/4-size input)
    python scripts/image_edit.py --task interpolate --num_samples 2 --num_frames 8 ...
    python scripts/image_edit.py --task stroke --input painting.png --sigma 5 ...
    python scripts/image_edit.py --task denoise --input photo.png --sigma 0.3 ...

--input is a comma list of image files or an .npz (arr_0 uint8 NHWC). Written to --log_dir: {task}.png, one
row per image (input, what the model is given, result; interpolation: the frames of one noise pair), and
{task}_{N}x{H}x{W}x3.npz with arr_0 the results and (except for interpolate) arr_1 what the model was
given, both uint8 NHWC.
"""

import os
import sys

if __package__ in (None, ""):  # run as a file: make the package importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from cm import dist_util, editing, logger  # noqa: E402
from cm.image_util import (  # noqa: E402
    DEVICES,
    from_uint8,
    image_grid,
    load_sampling_model,
    parse_ts,
    read_images,
    read_mask,
    save_npz,
    save_png,
    select_device,
    to_uint8,
)
from cm.random_util import GENERATORS, get_generator  # noqa: E402
from cm.script_util import (  # noqa: E402
    add_dict_to_argparser,
    args_to_json,
    model_and_diffusion_defaults,
    OneLineArgumentParser,
    run_script,
    TRAINING_MODES,
)

DEFAULT_SIGMA = {"stroke": 5.0, "denoise": 0.3}


def edit_defaults():
    """Flags of the editing script (the model flags come from model_and_diffusion_defaults)."""
    return dict(
        task="inpaint",
        input="",
        mask="box",
        factor=4,
        sigma=-1.0,
        add_noise=True,
        num_frames=8,
        num_samples=1,
        class_label=-1,
        training_mode="consistency_distillation",
        generator="determ-indiv",
        clip_denoised=True,
        batch_size=16,
        steps=40,
        ts="0,5,10,15,20,25,30,35,39",
        model_path="",
        seed=0,
        use_bf16=False,
        channels_last=True,
        log_dir="",
        device="auto",
        dry_run=False,
    )


EDIT_FLAG_HELP = dict(
    task="what to do: inpaint, colorize, superres, interpolate (noise to noise), stroke (SDEdit from a "
    "stroke painting), denoise",
    input="images to edit: comma list of files or an .npz (arr_0 uint8 NHWC); center-cropped to image_size",
    mask="inpaint: box (centre square), half (right half), strokes (random lines, from --seed) or a mask image "
    "of image_size, white (>= 128) = pixels to generate",
    factor="superres: scale factor f (divides image_size); the input may be full-size or image_size / f",
    sigma="stroke and denoise: starting noise level (-1: stroke 5.0, denoise 0.3)",
    add_noise="denoise: first add N(0, sigma^2) noise to the input (false: the input already carries it)",
    num_frames="interpolate: frames per noise pair, both ends included",
    num_samples="interpolate: noise pairs (rows)",
    class_label="class-conditional models: the label of every image (-1: drawn from the generator)",
    training_mode="how the checkpoint was trained; consistency_* selects the consistency-model scalings",
    generator="noise source: dummy (global RNG), determ, determ-indiv (image k's noise depends only on the seed and k)",
    clip_denoised="clamp every denoised estimate to [-1, 1]",
    batch_size="images per forward pass",
    steps="size of the Karras noise grid that --ts indexes",
    ts="increasing grid indices of the editing levels t_1 > t_2 > ... (the last index, sigma_min, only closes "
    "the grid)",
    model_path="consistency-model checkpoint (a state dict: ema_RATE_NNNNNN.pt, modelNNNNNN.pt or a released one)",
    seed="random seed (same seed and flags give the same images)",
    use_bf16="run the network body in bfloat16 (faster on CPUs with AVX512-BF16 or AMX, and on GPUs)",
    channels_last="channels_last memory format for the network",
    log_dir="output directory (default OPENAI_LOGDIR, else a new temp dir)",
    device="auto (a GPU if any), cpu or cuda",
    dry_run="print the resolved configuration as JSON and exit",
)
EDIT_FLAG_CHOICES = dict(task=editing.TASKS, training_mode=TRAINING_MODES, generator=GENERATORS, device=DEVICES)


def create_argparser():
    """Editing flags (help text, choices) plus every model flag of model_and_diffusion_defaults."""
    parser = OneLineArgumentParser(description="Zero-shot image editing with a consistency model.")
    add_dict_to_argparser(parser, edit_defaults(), EDIT_FLAG_HELP, EDIT_FLAG_CHOICES)
    add_dict_to_argparser(parser, model_and_diffusion_defaults())
    return parser


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
    pairs, n = args.num_samples, args.num_frames
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
    if args.task == "interpolate" and (args.num_frames < 2 or args.num_samples < 1):
        raise ValueError(
            f"interpolate needs num_frames >= 2 and num_samples >= 1, got {args.num_frames} and {args.num_samples}"
        )
    inputs = None if args.task == "interpolate" else read_inputs(args)
    if not args.model_path:
        raise ValueError("no checkpoint given: pass --model_path (a consistency-model state dict)")
    select_device(args.device)
    log_dir = logger.configure(dir=args.log_dir or None, format_strs=["stdout", "log"])
    torch.manual_seed(args.seed)  # the global RNG, used by --generator dummy
    device = dist_util.dev()
    model, diffusion = load_sampling_model(args, device)
    with open(os.path.join(log_dir, f"{args.task}_config.json"), "w") as f:
        f.write(args_to_json(args) + "\n")
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
    strip = image_grid(rows.reshape(-1, size, size, 3), ncols=rows.shape[1])
    png = save_png(strip, os.path.join(log_dir, f"{args.task}.png"))
    logger.log(f"saved {png} and {npz}")
    return {"npz": npz, "png": png, "results": after, "given": before}


def main(argv=None):
    """Parse flags (and --config); bad input stops with one 'error:' line (CM_DEBUG=1 shows tracebacks)."""
    return run_script(create_argparser(), run, argv)


if __name__ == "__main__":
    main()
