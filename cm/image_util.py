"""Shared pieces of the sampling, editing and search scripts: images in and out, flags, models, the sample loop.

* images: [-1, 1] NCHW tensors <-> uint8 NHWC arrays (the reference's conversion), PNG grids, reading
  image files / .npz batches / masks.
* command line: `parse_ts`, `select_device` (flags: cm.script_util.add_dict_to_argparser).
* `load_sampling_model` builds a network from the model flags and loads a checkpoint into it;
  `generate_samples` splits num_samples over the ranks and gathers them on rank 0.
"""

import math
import os
import re
import time

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from . import dist_util, logger
from .checkpoint_io import write_through_temporary
from .image_datasets import center_crop_arr
from .sampling import karras_sample
from .config import resolve_model_config
from .flags import DEVICES
from .run_config import find_run_config, mismatch_hint
from .script_util import create_model, load_model_checkpoint
from .training_modes import build_denoiser, get_training_mode
GRID_IMAGES = 64


# ----- images ------------------------------------------------------------------------------------


def to_uint8(images, round_values=False):
    """[-1, 1] NCHW float -> uint8 NHWC, truncating like the reference's image_sample.py (or rounding).

    :param images: float tensor [N, C, H, W].
    :param round_values: round to the nearest level, so from_uint8 followed by to_uint8 is the identity.
    """
    values = (images + 1) * 127.5
    values = values.round() if round_values else values
    return values.clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def from_uint8(images, device="cpu"):
    """uint8 NHWC (array or tensor) -> float32 NCHW in [-1, 1] on `device`."""
    images = torch.as_tensor(np.asarray(images)).to(device)
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def image_grid(images, ncols=None, pad=1):
    """uint8 images [N, H, W, C] tiled row by row into one uint8 [H', W', C] array, `pad` white pixels apart.

    :param images: uint8 array [N, H, W, C].
    :param ncols: images per row (default: ceil(sqrt(N))).
    :param pad: white border between and around the images, in pixels.
    """
    images = np.asarray(images)
    n, h, w, c = images.shape
    ncols = ncols or max(1, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for k in range(n):
        top, left = pad + (k // ncols) * (h + pad), pad + (k % ncols) * (w + pad)
        grid[top : top + h, left : left + w] = images[k]
    return grid


def save_image(image, path):
    """Write a PIL image atomically (cm.checkpoint_io.write_through_temporary) in the format of path's extension."""
    kind = Image.registered_extensions().get(os.path.splitext(str(path))[1].lower(), "PNG")
    write_through_temporary(path, lambda f: image.save(f, format=kind))
    return path


def save_png(array, path):
    """Write a uint8 [H, W, 3] (or [H, W, 1]) array as a PNG file, atomically."""
    array = np.asarray(array)
    return save_image(Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array), path)


def save_npz(path, *arrays, **named):
    """np.savez written atomically (cm.checkpoint_io.write_through_temporary): readers never see half a file."""
    write_through_temporary(path, lambda f: np.savez(f, *arrays, **named))
    return path


def grid_path(flag, log_dir, default_name):
    """Where to write a PNG grid: None for 'none', `default_name` in log_dir for '', else the path given."""
    if flag == "none":
        return None
    return os.path.join(log_dir, default_name) if flag == "" else flag


def _fit(image, size):
    """A uint8 HWC image center-cropped and resized to size x size (unchanged when it already is)."""
    if image.shape[0] == image.shape[1] == size:
        return image
    return center_crop_arr(Image.fromarray(image), size)


def read_images(spec, size=None, keep_sizes=()):
    """Images named by `spec` as uint8 [N, H, W, 3].

    :param spec: "batch.npz" (arr_0: NHWC uint8, or float in [-1, 1]) or a comma list of image files.

    :param size: side to center-crop and resize each image to (None: keep; all must then agree).
    :param keep_sizes: sides that are kept as they are (e.g. the low resolution of a super-resolution input).
    """
    if not spec:
        raise ValueError("no input images: pass --input (image files, comma separated, or an .npz)")
    if spec.endswith(".npz"):
        if not os.path.exists(spec):
            raise FileNotFoundError(f"input {spec} does not exist")
        with np.load(spec) as data:
            if "arr_0" not in data:
                raise ValueError(f"{spec} has no arr_0 (images N x H x W x C)")
            arr = data["arr_0"]
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise ValueError(f"{spec}: arr_0 must be images N x H x W x C with C = 1 or 3, got shape {arr.shape}")
        if arr.dtype != np.uint8:
            arr = ((np.asarray(arr, np.float32) + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        images = list(np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr)
    else:
        images = []
        for path in [p for p in spec.split(",") if p]:
            if not os.path.exists(path):
                raise FileNotFoundError(f"input image {path} does not exist")
            try:
                images.append(np.array(Image.open(path).convert("RGB")))
            except (UnidentifiedImageError, OSError) as e:
                raise ValueError(f"input {path} is not a readable image: {e}") from None
    if not images:
        raise ValueError(f"--input {spec} names no images")
    if size is not None:
        images = [im if im.shape[0] == im.shape[1] and im.shape[0] in keep_sizes else _fit(im, size) for im in images]
    if len({im.shape for im in images}) > 1:
        raise ValueError(f"input images differ in size: {sorted({im.shape[:2] for im in images})}")
    return np.stack(images)


def read_mask(path, image_size):
    """A mask image file -> float32 [1, 1, S, S]: 1 where the pixel is to be generated (white, >= 128), 0 where kept."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"mask {path} does not exist")
    try:
        mask = np.array(Image.open(path).convert("L"))
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"mask {path} is not a readable image: {e}") from None
    if mask.shape != (image_size, image_size):
        raise ValueError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} pixels, expected {image_size}x{image_size}")
    return torch.from_numpy((mask >= 128).astype(np.float32))[None, None]


# ----- command line ------------------------------------------------------------------------------


def parse_ts(text):
    """'0,22,39' -> (0, 22, 39); '' -> None."""
    if not text:
        return None
    try:
        return tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise ValueError(f"ts must be a comma list of grid indices such as 0,22,39, got {text!r}") from None


def select_device(name):
    """Make `name` (auto | cpu | cuda) the device of this process (via CM_DEVICE, read by dist_util.dev)."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; allowed: {', '.join(DEVICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    if name != "auto":
        os.environ["CM_DEVICE"] = name


def output_dir(log_dir, kind):
    """Where a script writes: --log_dir, else OPENAI_LOGDIR, else ./{kind}/YYYYMMDD-HHMMSS in the current directory
    (rank 0's choice on every rank)."""
    chosen = log_dir or os.environ.get("OPENAI_LOGDIR") or os.path.join(os.getcwd(), kind, time.strftime("%Y%m%d-%H%M%S"))
    return dist_util.broadcast_object(chosen)


def written_line(paths):
    """The last line of a script's output: every file it wrote."""
    return "wrote " + " ".join(p for p in paths if p)


# ----- models ------------------------------------------------------------------------------------


def load_sampling_model(args, device):
    """(network, denoiser) from the model flags in `args`, with args.model_path loaded, ready for inference.

    The denoiser is the one the checkpoint's training mode names (cm.training_modes): KarrasDenoiser with the
    boundary-condition scalings for consistency modes, TrigFlowDenoiser for sCM. The network is
    moved to `device`, optionally to channels_last, and its body to float16 (use_fp16, as the reference) or
    bfloat16.
    """
    if not args.model_path:
        raise ValueError("no checkpoint given: pass --model_path (e.g. ema_0.9999_NNNNNN.pt from a training log dir)")
    if getattr(args, "use_fp16", False) and getattr(args, "use_bf16", False):
        raise ValueError("choose one of --use_fp16 and --use_bf16")
    _, where = (None, None) if getattr(args, "config", "") else find_run_config(args.model_path)
    if where:
        logger.log(f"model flags from {where} (flags on the command line win)")
    config = resolve_model_config(args)
    mode = get_training_mode(config["training_mode"])
    model = create_model(**config["network"])
    diffusion = build_denoiser(mode, config["denoiser"])
    load_run_checkpoint(model, args)
    model = _for_inference(model, args, device)
    if mode.companion_network:  # a frozen network saved beside the checkpoint (TCM's stage 1)
        path = companion_path(args.model_path, mode.companion_network)
        if not os.path.exists(path):
            raise ValueError(f"training_mode {mode.name} samples with the {mode.companion_network} network saved "
                             f"beside each checkpoint, but {path} does not exist; keep the pair of files together")
        companion = create_model(**config["network"])
        load_model_checkpoint(companion, path)
        diffusion = mode.attach_companion(diffusion, _for_inference(companion, args, device))
    return model, diffusion


def _for_inference(model, args, device):
    """The network on `device`, optionally channels_last, in the flags' precision, in eval mode without gradients."""
    model.to(device)
    if getattr(args, "channels_last", False):
        model.to(memory_format=torch.channels_last)
    if args.use_fp16:
        model.convert_to_fp16()
    elif getattr(args, "use_bf16", False):
        model.convert_to_bf16()
    return model.eval().requires_grad_(False)


def companion_path(model_path, prefix):
    """The file of a companion network beside a checkpoint, at its step and in its format:
    ema_0.9999_050000.pt or model050000.pt -> PREFIX050000.pt in the same directory."""
    match = re.search(r"(\d+)\.(pt|safetensors)$", os.path.basename(model_path))
    if not match:
        raise ValueError(f"cannot tell the step of {model_path}: the companion network's file is found by the "
                         "checkpoint's name, e.g. ema_0.9999_050000.pt")
    return os.path.join(os.path.dirname(model_path), f"{prefix}{match.group(1)}.{match.group(2)}")


def load_run_checkpoint(model, args):
    """Load args.model_path into model; a file that does not fit the flags says the likely cause in the same line."""
    try:
        return load_model_checkpoint(model, args.model_path)
    except ValueError as e:
        if "does not fit the model flags" not in str(e):
            raise
        state_dict = dist_util.load_state_dict(args.model_path, map_location="cpu")
        hint = mismatch_hint(state_dict, vars(args), getattr(model, "in_channels", 3))
        raise ValueError(f"{e}; {hint}") from None


# ----- sampling over ranks -----------------------------------------------------------------------


def rank_batches(num_samples, batch_size, world_size):
    """(done, per-rank batch) pairs covering num_samples: each step makes world_size * batch samples, the last fewer."""
    done = 0
    while done < num_samples:
        batch = min(batch_size, math.ceil((num_samples - done) / world_size))
        yield done, batch
        done += world_size * batch


def generate_samples(
    diffusion, model, num_samples, batch_size, image_size, generator, sample_kwargs=None, num_classes=None,
    progress=True, autoencoder=None, latent_shape=None,
):
    """num_samples images from karras_sample over all ranks; rank 0 gets (uint8 [N, H, W, 3], labels [N] or None).

    Rank r makes the global samples done + r, done + r + K, ... of each step (K ranks), the indices the
    cm.random_util generators use; `set_done_samples` is called before each batch, so with determ or
    determ-indiv sample k depends only on the seed and k. Class labels come from the same generator.
    Other ranks get (None, None).

    :param diffusion: the KarrasDenoiser.
    :param model: the network (on the device to sample on).
    :param num_samples: total images N.
    :param batch_size: images per forward pass on each rank.
    :param image_size: side of the images.
    :param generator: a cm.random_util generator made for num_samples.
    :param sample_kwargs: further karras_sample arguments (sampler, steps, ts, sigma_min, ...).
    :param num_classes: draw labels y in [0, num_classes) for a class-conditional model (None: unconditional).
    :param progress: tqdm bar on rank 0.
    :param autoencoder: sample latents of latent_shape (C, H, W) and decode them with autoencoder.decode (cm.latent).
    """
    if num_samples <= 0 or batch_size <= 0:
        raise ValueError(f"num_samples and batch_size must be positive, got {num_samples} and {batch_size}")
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    device = next(model.parameters()).device
    images = np.zeros((num_samples, image_size, image_size, 3), np.uint8) if rank == 0 else None
    labels = np.zeros(num_samples, np.int64) if rank == 0 and num_classes else None
    batches, kept = list(rank_batches(num_samples, batch_size, world)), []
    bar = tqdm(total=num_samples, disable=not progress or rank != 0, unit="img", desc="sampling")
    for done, batch in batches:
        generator.set_done_samples(done)
        model_kwargs = {}
        if num_classes:
            model_kwargs["y"] = generator.randint(0, num_classes, (batch,), device=device)
        with torch.inference_mode():
            shape = (batch, *latent_shape) if autoencoder is not None else (batch, 3, image_size, image_size)
            x = karras_sample(
                diffusion, model, shape, model_kwargs=model_kwargs, device=device, generator=generator,
                **(sample_kwargs or {}), **({"clamp": False} if autoencoder is not None else {}),
            )
            if autoencoder is not None:
                x = autoencoder.decode(x.float()).clamp(-1, 1)
            piece = (to_uint8(x).cpu().numpy(), model_kwargs["y"].cpu().numpy() if num_classes else None)
        if rank == 0:
            _place(images, labels, done, 0, world, piece)
        else:
            kept.append(piece)
        bar.update(min(world * batch, num_samples - done))
    bar.close()
    # one gather at the end, so the ranks never wait for each other between batches
    gathered = dist_util.gather_object(kept)
    if rank != 0:
        return None, None
    for r, pieces in enumerate(gathered[1:], start=1):
        for (done, _), piece in zip(batches, pieces):
            _place(images, labels, done, r, world, piece)
    return images, labels


def _place(images, labels, done, rank, world, piece):
    """Write rank `rank`'s batch after `done` samples (uint8 images, labels or None) at its global indices."""
    imgs, ys = piece
    index = done + rank + world * np.arange(len(imgs))
    keep = index < len(images)
    images[index[keep]] = imgs[keep]
    if labels is not None:
        labels[index[keep]] = ys[keep]
