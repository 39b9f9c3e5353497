"""Turn the paper's datasets into image folders that the training scripts' --data_dir reads.

    python scripts/prepare_data.py --kind cifar10 --source cifar-10-python.tar.gz --output_dir cifar10_train
    python scripts/prepare_data.py --kind lsun --source bedroom_train_lmdb --output_dir lsun_bedroom256
    python scripts/prepare_data.py --kind imagenet --source ILSVRC2012/train --output_dir imagenet64
    python scripts/prepare_data.py --kind folder --source photos/ --output_dir photos64 --image_size 64

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

Output files are PNG (lossless), written under a temporary name and renamed, so a run that stops can be
started again with the same flags and carries on where it stopped (files already written are kept).
Unreadable images are skipped and counted; the summary names the first few.
"""

import io
import os
import sys
import tarfile

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from cm.image_datasets import center_crop_arr, to_rgb
from cm.safe_load import file_digest, numpy_array_globals, restricted_pickle_load
from cm.script_util import OneLineArgumentParser, add_dict_to_argparser, run_script

KINDS = ("cifar10", "lsun", "imagenet", "folder")
DEFAULT_SIZE = {"cifar10": 32, "lsun": 256, "imagenet": 64, "folder": 0}
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
                allow_unverified=False, dry_run=False)


PREPARE_FLAG_HELP = dict(
    kind="what --source is: cifar10 (python tarball), lsun (lmdb folder), imagenet (train folder), folder (any)",
    source="the dataset to read: tarball, lmdb folder or image folder",
    output_dir="folder to write PNG files to (created; a rerun skips files already there)",
    image_size="output side in pixels (0: 32 for cifar10, 256 for lsun, 64 for imagenet; required for folder)",
    split="cifar10 only: train (50,000 images) or test (10,000)",
    prefix="lsun only: class name in the file names (default: the lmdb folder's name before '_')",
    max_images="stop after this many source images (-1: all); for trying the flags on a few",
    allow_unverified="cifar10 only: convert a tarball whose MD5 is not the official one (with a warning)",
    dry_run="print the resolved configuration as JSON and exit",
)
PREPARE_FLAG_CHOICES = dict(kind=KINDS, split=tuple(CIFAR_SPLITS))


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
    tmp = f"{path}.tmp{os.getpid()}"
    Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")
    os.replace(tmp, path)


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


def run(args):
    """Prepare the dataset; returns the counts."""
    if not args.kind or not args.source or not args.output_dir:
        raise ValueError(f"pass --kind ({', '.join(KINDS)}), --source and --output_dir")
    size = args.image_size or DEFAULT_SIZE[args.kind]
    if size <= 0:
        raise ValueError("--kind folder needs --image_size (the side of the square output images)")
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
