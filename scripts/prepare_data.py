"""Turn the paper's datasets into image folders that the training scripts' --data_dir reads.

    python scripts/prepare_data.py --kind cifar10 --source cifar-10-python.tar.gz --output_dir cifar10_train
    python scripts/prepare_data.py --kind lsun --source bedroom_train_lmdb --output_dir lsun_bedroom256
    python scripts/prepare_data.py --kind imagenet --source ILSVRC2012/train --output_dir imagenet64
    python scripts/prepare_data.py --kind folder --source photos/ --output_dir photos64 --image_size 64
    python scripts/prepare_data.py --kind latents --source ILSVRC2012/train --image_size 256 \
        --autoencoder_path sd-vae-ft-ema --flip_copies true --output_dir imagenet256_latents

* cifar10: the python tarball of https://www.cs.toronto.edu/~kriz/cifar.html, read as a stream;
  `--split train` (50,000 images) or `test` (10,000) becomes CLASS_NNNNN.png (airplane_00000.png, ...).
  The class names sort into CIFAR's own label order, so --class_cond labels equal CIFAR's. A tarball whose
  MD5 is not the official one is refused unless --allow_unverified; either way its pickled batches are read
  with an unpickler that builds only plain data and numpy arrays, so a hostile file cannot run code.
* lsun: an lmdb export of fyu/lsun (`download.py -c bedroom`): the short side BOX-resized to
  --image_size (default 256) and center-cropped, as the reference's datasets/lsun_bedroom.py does;
  files PREFIX_NNNNNNN.png (PREFIX: --prefix, default the lmdb folder's name before "_"). Needs lmdb.
* imagenet: the ILSVRC2012 train folder (one WNID folder per class) at --image_size (default 64) with
  ADM's downsampling (halve with a BOX filter while at least twice too large, BICUBIC to size, center
  crop; cm.image_datasets.center_crop_arr); files WNID/WNID_NNNN.png, so the class is the WNID.
* folder: any folder of images, resized like imagenet to --image_size; the folder layout is kept.
* latents: an image folder (class = file-name prefix, so an ImageNet train folder works as it is), an .npz of
  images or 'digits' / 'digits_train', center-cropped like imagenet to --image_size and encoded once by the local
  autoencoder --autoencoder_path (a diffusers AutoencoderKL folder such as sd-vae-ft-ema, or one written by
  scripts/train_autoencoder.py): the posterior mean times the scale factor (--latent_scale; 0 = the autoencoder's
  own, 0.18215 for Stable Diffusion's), optionally also of the mirrored image (--flip_copies). The result,
  OUTPUT_DIR/latents.npz, holds arr_0 (N x h x w x c float32 latents, memory-mapped by the trainer), arr_1
  (labels), latent_scale, and the per-channel latent_mean / latent_std; train on it with --data_dir
  OUTPUT_DIR/latents.npz --image_size h --in_channels c --random_flip false (no encoding during training) and sample
  with --autoencoder_path and the pixel --image_size. Rows are written into a memory-mapped work file, so a
  stopped run carries on where it stopped.

Output files are PNG (lossless), written under a temporary name and renamed, so a run that stops can be
started again with the same flags and carries on where it stopped (files already written are kept).
Unreadable images are skipped and counted; the summary names the first few.
"""

import functools
import io
import json
import os
import sys
import tarfile

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from cm.checkpoint_io import write_atomic, write_through_temporary
from cm.digits_data import digits_arrays
from cm.image_datasets import DIGITS, center_crop_arr, class_labels, list_image_files, npz_arrays, to_rgb
from cm.latent import load_autoencoder
from cm.safe_load import file_digest, numpy_array_globals, restricted_pickle_load
from cm.script_util import OneLineArgumentParser, add_dict_to_argparser, run_script

KINDS = ("cifar10", "lsun", "imagenet", "folder", "latents")
DEFAULT_SIZE = {"cifar10": 32, "lsun": 256, "imagenet": 64, "folder": 0, "latents": 0}
LATENTS_FILE = "latents.npz"
CIFAR_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR_BATCH_SIZE = 10000
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # cifar-10-python.tar.gz as published on the page above
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
READABLE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
LMDB_HINT = 'reading LSUN lmdb exports needs the lmdb package: pip install lmdb (or pip install -e ".[data]")'
SHOWN_SKIPS = 5


def prepare_defaults():
    """Flags of prepare_data.py."""
    return dict(kind="", source="", output_dir="", image_size=0, split="train", prefix="", max_images=-1,
                allow_unverified=False, autoencoder_path="", latent_scale=0.0, flip_copies=False, batch_size=32,
                device="cpu", dry_run=False)


PREPARE_FLAG_HELP = dict(
    kind="what --source is: cifar10 (python tarball), lsun (lmdb folder), imagenet (train folder), folder (any); "
    "latents: encode an image folder, .npz or digits once with --autoencoder_path",
    source="the dataset to read: tarball, lmdb folder or image folder",
    output_dir="folder to write PNG files to (created; a rerun skips files already there)",
    image_size="output side in pixels (0: 32 for cifar10, 256 for lsun, 64 for imagenet; required for folder)",
    split="cifar10 only: train (50,000 images) or test (10,000)",
    prefix="lsun only: class name in the file names (default: the lmdb folder's name before '_')",
    max_images="stop after this many source images (-1: all); for trying the flags on a few",
    allow_unverified="cifar10 only: convert a tarball whose MD5 is not the official one (with a warning)",
    autoencoder_path="latents only: local autoencoder folder (diffusers AutoencoderKL, or scripts/train_autoencoder.py's)",
    latent_scale="latents only: factor the stored latents carry (0: the autoencoder's scaling factor, e.g. 0.18215; "
    "sampling decodes with the autoencoder's, so another value needs an autoencoder folder saying so)",
    flip_copies="latents only: also store the latents of each mirrored image (2 rows per image, as DiT's flips)",
    batch_size="latents only: images encoded at a time",
    device="latents only: cpu or cuda (the device of the autoencoder)",
    dry_run="print the resolved configuration as JSON and exit",
)
PREPARE_FLAG_CHOICES = dict(kind=KINDS, split=tuple(CIFAR_SPLITS), device=("cpu", "cuda"))


def create_argparser():
    """The flags, with help text and choices."""
    parser = OneLineArgumentParser(description="Prepare a dataset as an image folder for --data_dir.")
    add_dict_to_argparser(parser, prepare_defaults(), PREPARE_FLAG_HELP, PREPARE_FLAG_CHOICES)
    return parser


# ----- image operations (pure) --------------------------------------------------------------------


def box_resize_center_crop(image, size):
    """Scale the short side to `size` with one BOX resize, then center-crop (reference datasets/lsun_bedroom.py)."""
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize((int(round(scale * width)), int(round(scale * height))), resample=Image.BOX)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def cifar_images(batch):
    """uint8 images [N, 32, 32, 3] of one CIFAR-10 python batch (rows of R, G, B planes)."""
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def check_cifar_batch(batch, name):
    """ValueError unless `batch` is a CIFAR-10 python batch: {b"data": uint8 [N, 3072], b"labels": N ints 0-9}."""
    data = batch.get(b"data") if isinstance(batch, dict) else None
    labels = batch.get(b"labels") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{name} is not a CIFAR-10 batch: it lacks b'data' as uint8 rows of 3072 values")
    if not isinstance(labels, list) or len(labels) != len(data) or not all(
        isinstance(v, int) and 0 <= v < len(CIFAR10_CLASSES) for v in labels
    ):
        raise ValueError(f"{name} is not a CIFAR-10 batch: b'labels' is not {len(data)} class numbers 0-9")
    return batch


def read_cifar_batch(file, name):
    """One pickled CIFAR-10 batch, built by an unpickler that allows only dicts, lists, bytes and numpy arrays."""
    return check_cifar_batch(restricted_pickle_load(file, numpy_array_globals(), name), name)


def check_cifar_tarball(tar_path, allow_unverified):
    """Refuse (or with allow_unverified, warn about) a tarball that is not the official cifar-10-python.tar.gz."""
    md5 = file_digest(tar_path, "md5")
    if md5 == CIFAR10_MD5:
        return True
    what = f"{tar_path} is not the official cifar-10-python.tar.gz (MD5 {md5}, expected {CIFAR10_MD5})"
    if not allow_unverified:
        raise ValueError(f"{what}; pass --allow_unverified true to convert it anyway")
    print(f"warning: {what}; converting it as --allow_unverified asks", file=sys.stderr)
    return False


def decode(data):
    """RGB PIL image from encoded bytes, or ValueError when Pillow cannot read them."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image ({type(e).__name__})") from None
    return to_rgb(image)


def lsun_prefix(lmdb_path):
    """The class prefix of an LSUN lmdb folder: 'bedroom' for bedroom_train_lmdb."""
    return os.path.basename(os.path.normpath(lmdb_path)).split("_")[0] or "lsun"


def imagenet_name(relative_path):
    """Output path WNID/WNID_REST.png for a train-folder file WNID/NAME (the class is the name's prefix)."""
    folder, name = os.path.split(relative_path)
    stem = os.path.splitext(name)[0]
    wnid = os.path.basename(folder) if folder else stem.split("_")[0]
    if not stem.startswith(f"{wnid}_"):
        stem = f"{wnid}_{stem}"
    return os.path.join(wnid, f"{stem}.png")


def folder_name(relative_path):
    """Output path of a folder image: the same relative path with the extension .png."""
    return os.path.splitext(relative_path)[0] + ".png"


def list_source_images(folder):
    """Image files under `folder` as sorted relative paths; FileNotFoundError when there are none."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"source folder {folder} does not exist")
    paths = sorted(
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(READABLE_EXTENSIONS)
    )
    if not paths:
        raise FileNotFoundError(f"no image files ({', '.join(READABLE_EXTENSIONS)}) under {folder}")
    return paths


# ----- sources: (output name, function giving the uint8 array) in a fixed order -------------------


def cifar_items(tar_path, split, allow_unverified=False):
    """(name, loader) for every image of a CIFAR-10 python tarball split, one batch in memory at a time.

    The tarball is read as a stream, its batches in archive order; a batch's file names follow from its
    number (data_batch_k holds images 10000 (k - 1) ...), so the output does not depend on that order.
    A tarball other than the official one is refused unless allow_unverified (check_cifar_tarball).
    """
    if not os.path.isfile(tar_path):
        raise FileNotFoundError(f"CIFAR-10 tarball {tar_path} does not exist")
    try:
        archive = tarfile.open(tar_path, "r|*")  # a stream: members in file order, each read once
    except tarfile.TarError as e:
        raise ValueError(f"{tar_path} is not a readable tarball ({e})") from None
    try:
        check_cifar_tarball(tar_path, allow_unverified)
    except ValueError:
        archive.close()
        raise
    return _cifar_stream(archive, tar_path, CIFAR_SPLITS[split])


def _cifar_stream(archive, tar_path, wanted):
    seen = set()
    with archive:
        for member in archive:
            base = os.path.basename(member.name)
            if not member.isfile() or base not in wanted:
                continue
            batch = read_cifar_batch(archive.extractfile(member), f"{tar_path}: {member.name}")
            seen.add(base)
            offset = CIFAR_BATCH_SIZE * wanted.index(base)
            for i, (image, label) in enumerate(zip(cifar_images(batch), batch[b"labels"])):
                yield f"{CIFAR10_CLASSES[label]}_{offset + i:05d}.png", (lambda image=image: image)
    missing = [b for b in wanted if b not in seen]
    if missing:
        raise ValueError(f"{tar_path} is not the CIFAR-10 python tarball: it lacks {', '.join(missing)}")


def lmdb_items(lmdb_path, size, prefix):
    """The record count, then (name, loader) for every record of an LSUN lmdb export, in key order."""
    try:
        import lmdb
    except ImportError:
        raise RuntimeError(LMDB_HINT) from None
    if not os.path.exists(lmdb_path):
        raise FileNotFoundError(f"lmdb export {lmdb_path} does not exist")
    env = lmdb.open(lmdb_path, readonly=True, lock=False, readahead=False, max_readers=1, subdir=os.path.isdir(lmdb_path))
    try:
        yield env.stat()["entries"]
        with env.begin(write=False) as txn:
            for index, (_, value) in enumerate(txn.cursor()):
                yield f"{prefix}_{index:07d}.png", (lambda value=value: box_resize_center_crop(decode(value), size))
    finally:
        env.close()


def folder_items(folder, files, size, naming):
    """(name, loader) for the image files (relative paths) under `folder`, resized with ADM's center_crop_arr."""
    def load(path):
        with open(path, "rb") as f:
            return center_crop_arr(decode(f.read()), size)

    for relative in files:
        yield naming(relative), (lambda path=os.path.join(folder, relative): load(path))


# ----- writing -------------------------------------------------------------------------------------


def write_png(array, path):
    """Write a uint8 HxWx3 array as PNG through a temporary name and a rename."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_through_temporary(path, lambda f: Image.fromarray(np.ascontiguousarray(array)).save(f, format="PNG"))


def prepare(items, output_dir, total=None, max_images=-1, progress=True):
    """Write every (name, loader) item as output_dir/name, skipping names already there; returns counts.

    :return: dict written, existing (from an earlier run), skipped (unreadable), skipped_examples.
    """
    counts = {"written": 0, "existing": 0, "skipped": 0, "skipped_examples": []}
    if max_images >= 0:
        total = max_images if total is None else min(total, max_images)
    with tqdm(total=total, disable=not progress, unit="img", desc="prepare") as bar:
        for position, (name, load) in enumerate(items):
            if 0 <= max_images <= position:
                break
            path = os.path.join(output_dir, name)
            if os.path.exists(path):
                counts["existing"] += 1
            else:
                try:
                    write_png(load(), path)
                    counts["written"] += 1
                except ValueError as e:
                    counts["skipped"] += 1
                    if len(counts["skipped_examples"]) < SHOWN_SKIPS:
                        counts["skipped_examples"].append(f"{name}: {e}")
            bar.update(1)
            bar.set_postfix(skipped=counts["skipped"], refresh=False)
    return counts


def source_items(args, size):
    """(items, total or None) of the source named by --kind."""
    if args.kind == "cifar10":
        if size != 32:
            raise ValueError(f"CIFAR-10 images are 32x32; --image_size {size} is not supported for cifar10")
        return cifar_items(args.source, args.split, args.allow_unverified), len(CIFAR_SPLITS[args.split]) * CIFAR_BATCH_SIZE
    if args.kind == "lsun":
        items = lmdb_items(args.source, size, args.prefix or lsun_prefix(args.source))
        return items, next(items)
    naming = imagenet_name if args.kind == "imagenet" else folder_name
    files = list_source_images(args.source)
    return folder_items(args.source, files, size, naming), len(files)


def summary(counts, output_dir):
    """One line of counts, plus the first skipped files."""
    line = (f"{output_dir}: wrote {counts['written']}, kept {counts['existing']} already there, "
            f"skipped {counts['skipped']} unreadable")
    return "\n".join([line] + [f"  skipped {example}" for example in counts["skipped_examples"]])


# ----- latents: encoded once into a memory-mapped array --------------------------------------------


def latent_source(source, size):
    """(items of (name, loader of a uint8 or [-1, 1] float HxWxC image), labels or None) of an image folder, an .npz
    of images, or the embedded digits, at size x size (folders center-cropped as ADM / DiT)."""
    if source in DIGITS:
        images, labels = digits_arrays(size, DIGITS[source])
        return array_items(images), labels
    if source.endswith(".npz"):
        images, labels = npz_arrays(source, size)
        return array_items(images), labels
    files = list_image_files(source)
    labels = class_labels(files)
    return folder_items(source, [os.path.relpath(f, source) for f in files], size, folder_name), labels


def array_items(images):
    """(name, loader) for every row of an image array (a name only for the skip report)."""
    for index in range(len(images)):
        yield f"image {index}", (lambda index=index: np.asarray(images[index]))


def to_model_input(array):
    """A uint8 (0..255) or float ([-1, 1]) HxWxC image, C = 1 or 3 -> float32 CxHxW RGB in [-1, 1]."""
    image = array.astype(np.float32) / 127.5 - 1 if array.dtype == np.uint8 else array.astype(np.float32)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image.transpose(2, 0, 1)


def encode_rows(autoencoder, images, device, flip_copies, rescale=1.0):
    """Latents N x h x w x c (float32 numpy) of images [N, 3, H, W] in [-1, 1]; with flip_copies the latents of each
    mirrored image follow its own (2N rows)."""
    with torch.no_grad():
        x = torch.from_numpy(images).to(device)
        if flip_copies:
            x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)
        latents = autoencoder.encode(x).float() * rescale
    return latents.permute(0, 2, 3, 1).cpu().numpy()


def channel_statistics(latents, chunk=4096):
    """Per-channel mean and standard deviation of N x h x w x c latents, read in chunks (float64 sums)."""
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(latents), chunk):
        rows = np.asarray(latents[start : start + chunk], dtype=np.float64).reshape(-1, latents.shape[-1])
        total, total_sq, count = total + rows.sum(0), total_sq + (rows**2).sum(0), count + len(rows)
    mean = total / count
    return mean.astype(np.float32), np.sqrt(np.maximum(total_sq / count - mean**2, 0)).astype(np.float32)


def latent_settings(args, size, count):
    """What the latents depend on; a rerun with other settings must not continue the same work files."""
    return dict(source=os.path.abspath(args.source) if args.source not in DIGITS else args.source, image_size=size,
                autoencoder_path=os.path.abspath(args.autoencoder_path), latent_scale=args.latent_scale,
                flip_copies=args.flip_copies, images=count)


def image_batches(items, labels, start, count, batch_size):
    """(images [n, 3, H, W] in [-1, 1], their labels, source images read, skip reports) of items start..count-1, in
    batches of up to batch_size readable images; an unreadable image is skipped and reported."""
    images, kept, read, skips = [], [], 0, []
    for position, (name, load) in enumerate(items):
        if position >= count:
            break
        if position < start:
            continue
        read += 1
        try:
            images.append(to_model_input(load()))
            kept.append(labels[position])
        except ValueError as e:
            skips.append(f"{name}: {e}")
        if len(images) == batch_size:
            yield np.stack(images), np.asarray(kept), read, skips
            images, kept, read, skips = [], [], 0, []
    if read:
        yield (np.stack(images) if images else None), np.asarray(kept, dtype=np.int64), read, skips


class LatentWork:
    """The work files of a latents preparation in output_dir: memory-mapped rows and labels, and progress.json
    (settings, images read, rows written, skips), saved after every batch, so a stopped run carries on."""

    def __init__(self, output_dir, settings, shape):
        self.paths = [os.path.join(output_dir, name) for name in ("latents.partial.npy", "labels.partial.npy",
                                                                  "progress.json")]
        rows_path, labels_path, state_path = self.paths
        if all(os.path.exists(path) for path in self.paths):
            with open(state_path) as f:
                self.state = json.load(f)
            if self.state["settings"] != settings:
                raise ValueError(f"{output_dir} holds latents prepared with other settings ({self.state['settings']}); "
                                 "pass another --output_dir or delete its *.partial.npy and progress.json")
            self.rows = np.lib.format.open_memmap(rows_path, mode="r+")
            self.labels = np.lib.format.open_memmap(labels_path, mode="r+")
        else:
            self.state = {"settings": settings, "images": 0, "rows": 0, "skipped": 0, "skipped_examples": []}
            self.rows = np.lib.format.open_memmap(rows_path, mode="w+", dtype=np.float32, shape=shape)
            self.labels = np.lib.format.open_memmap(labels_path, mode="w+", dtype=np.int64, shape=shape[:1])

    def append(self, rows, labels, read, skips):
        """Store a batch's rows and labels after those written, count the images read, save the progress."""
        done = self.state["rows"]
        self.rows[done : done + len(rows)] = rows
        self.labels[done : done + len(rows)] = labels
        self.rows.flush(), self.labels.flush()
        self.state["rows"] += len(rows)
        self.state["images"] += read
        self.state["skipped"] += len(skips)
        self.state["skipped_examples"] = (self.state["skipped_examples"] + skips)[:SHOWN_SKIPS]
        write_atomic(json.dumps(self.state), self.paths[2])

    def finish(self, final, scale):
        """Write the rows written, their labels, the scale and per-channel statistics into the .npz `final`
        (uncompressed, so the trainer memory-maps it) and remove the work files; returns (mean, std)."""
        rows, labels = self.rows[: self.state["rows"]], self.labels[: self.state["rows"]]
        mean, std = channel_statistics(rows)
        write_npz = functools.partial(np.savez, arr_0=rows, arr_1=labels, latent_scale=np.float32(scale),
                                      latent_mean=mean, latent_std=std)
        write_through_temporary(final, write_npz)
        del self.rows, self.labels, rows, labels, write_npz  # unmapped before the files go
        for path in self.paths:
            os.remove(path)
        return mean, std


def prepare_latents(args, size, progress=True):
    """Encode the source into OUTPUT_DIR/latents.npz (see the module docstring); returns the counts (as prepare's,
    plus rows and the file)."""
    if not args.autoencoder_path:
        raise ValueError("--kind latents needs --autoencoder_path: a local diffusers AutoencoderKL folder (e.g. "
                         "stabilityai/sd-vae-ft-ema saved with save_pretrained) or one written by "
                         "scripts/train_autoencoder.py")
    if args.batch_size <= 0:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
    final = os.path.join(args.output_dir, LATENTS_FILE)
    counts = {"written": 0, "existing": 0, "skipped": 0, "skipped_examples": [], "file": final}
    if os.path.exists(final):  # done by an earlier run
        with np.load(final) as done:
            counts["rows"] = len(done["arr_1"])
        counts["existing"] = counts["rows"] // (2 if args.flip_copies else 1)  # the images encoded
        return counts
    autoencoder = load_autoencoder(args.autoencoder_path, args.device)
    rescale = args.latent_scale / autoencoder.scaling_factor if args.latent_scale > 0 else 1.0
    items, labels = latent_source(args.source, size)
    count = len(labels) if args.max_images < 0 else min(len(labels), args.max_images)
    copies = 2 if args.flip_copies else 1
    probe = encode_rows(autoencoder, np.zeros((1, 3, size, size), np.float32), args.device, False)
    shape = (count * copies,) + probe.shape[1:]
    work = LatentWork(args.output_dir, latent_settings(args, size, count), shape)
    counts["existing"] = start = work.state["images"]
    with tqdm(total=count, initial=start, disable=not progress, unit="img", desc="encode") as bar:
        for images, kept, read, skips in image_batches(items, labels, start, count, args.batch_size):
            rows = encode_rows(autoencoder, images, args.device, args.flip_copies, rescale) if images is not None \
                else np.zeros((0,) + shape[1:], np.float32)
            work.append(rows, np.repeat(kept, copies), read, skips)
            counts["written"] += len(kept)
            bar.update(read)
    scale = args.latent_scale if args.latent_scale > 0 else autoencoder.scaling_factor
    state = work.state
    mean, std = work.finish(final, scale)
    counts.update(rows=state["rows"], skipped=state["skipped"], skipped_examples=state["skipped_examples"])
    print(f"{final}: {state['rows']} latents {' x '.join(map(str, shape[1:]))} (h x w x c), scale {scale:.5g}, "
          f"per-channel mean {np.round(mean, 3).tolist()}, std {np.round(std, 3).tolist()}")
    return counts


def run(args):
    """Prepare the dataset; returns the counts."""
    if not args.kind or not args.source or not args.output_dir:
        raise ValueError(f"pass --kind ({', '.join(KINDS)}), --source and --output_dir")
    size = args.image_size or DEFAULT_SIZE[args.kind]
    if size <= 0:
        raise ValueError(f"--kind {args.kind} needs --image_size (the side of the square output images)")
    if args.kind == "latents":
        os.makedirs(args.output_dir, exist_ok=True)
        counts = prepare_latents(args, size)
        print(summary(counts, args.output_dir))
        return counts
    if os.path.abspath(args.source) == os.path.abspath(args.output_dir):
        raise ValueError("--output_dir must differ from --source")
    items, total = source_items(args, size)
    os.makedirs(args.output_dir, exist_ok=True)
    counts = prepare(items, args.output_dir, total, args.max_images)
    print(summary(counts, args.output_dir))
    return counts


def main(argv=None):
    """Parse flags (and --config); bad input stops with one 'error:' line (CM_DEBUG=1 shows tracebacks)."""
    return run_script(create_argparser(), run, argv)


if __name__ == "__main__":
    main()
