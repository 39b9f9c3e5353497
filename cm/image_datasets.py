"""Training data: image folders (via blobfile), .npz arrays, or the embedded scikit-learn digits.

`load_data` returns an endless, resumable iterator of (images in [-1, 1] NCHW float32, {"y": labels}).
Each epoch is a seeded permutation of the whole set, cut into global batches of G = batch_size * world_size
images; rank r takes rows [r * batch_size, (r + 1) * batch_size) of each, so ranks see disjoint data and the
global batches do not depend on the number of ranks. Crops are seeded by the image's place in the epoch's order,
flips are drawn for the whole global batch from (seed, epoch, batch), so the stream depends only on the seed and
its position, counted in global samples: `state_dict()` / `load_state_dict()` resume it exactly, also on another
number of ranks with the same G (and at the same sample with another G).
"""

import math
import os
import random
import signal
import struct
import sys
import threading
import zipfile

import blobfile as bf
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from . import dist_util, logger
from .digits_data import digits_arrays

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")
DIGITS = {"digits": None, "digits_train": "train"}  # --data_dir name -> split of cm.digits_data (None: all)


def load_data(
    *,
    data_dir,
    batch_size,
    image_size,
    class_cond=False,
    deterministic=False,
    random_crop=False,
    random_flip=True,
    seed=0,
    on_bad_image="skip",
    max_bad_images=0.01,
    num_workers=None,
):
    """An endless iterator over (images, kwargs) batches of the local rank.

    :param data_dir: an image folder (searched recursively; class = file-name prefix before the first "_"),
        an .npz file (arr_0 NHWC, uint8 or float in [-1, 1], C = 1 or 3; optional arr_1 labels; memory-mapped
        when saved uncompressed with np.savez; with a latent_scale member, float latents of any channels and range
        from scripts/prepare_data.py --kind latents), "digits" (scikit-learn's 8x8 digits, all 1,797) or "digits_train"
        (their training half, cm.digits_data.SPLITS: what the digits presets train on).
    :param batch_size: images per batch on this rank.
    :param image_size: side of the square images returned (center-crop resize like the reference).
    :param class_cond: include labels as kwargs["y"].
    :param deterministic: keep the file order instead of shuffling each epoch.
    :param random_crop: random 80-100% crops instead of center crops (image folders).
    :param random_flip: random horizontal flips.
    :param seed: seed of the shuffle, flips and crops.
    :param on_bad_image: "skip" (warn with the file name, count it, use the next image) or "error".
    :param max_bad_images: with "skip", stop once more distinct images than this could not be read, counted over
        all ranks: a count when >= 1, a fraction of the image files (rounded up) when below 1; -1: no limit.
    :param num_workers: decoding processes for image folders (default: 0 on one core, else 2).
    """
    if on_bad_image not in ("skip", "error"):
        raise ValueError(f"unknown on_bad_image {on_bad_image!r}; allowed: skip, error")
    if max_bad_images != -1 and not max_bad_images >= 0:
        raise ValueError(f"max_bad_images must be -1 (no limit), a count >= 1 or a fraction in [0, 1), got {max_bad_images}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not data_dir:
        raise ValueError("no data given: pass --data_dir (an image folder, an .npz file, or 'digits')")
    if data_dir in DIGITS:
        images, labels = digits_arrays(image_size, DIGITS[data_dir])
        source = ArraySource(images, labels)
    elif str(data_dir).endswith(".npz"):
        source = ArraySource(*npz_arrays(data_dir, image_size), name=str(data_dir))
    else:
        files = list_image_files(data_dir)
        classes = class_labels(files) if class_cond else None
        limit = bad_image_limit(max_bad_images, len(files)) if on_bad_image == "skip" else 0
        source = FileSource(files, classes, image_size, random_crop, on_bad_image, limit, root=str(data_dir))
    if class_cond and source.labels is None:
        raise ValueError(f"class_cond needs labels, but {data_dir} has none")
    return DataStream(
        source,
        batch_size,
        class_cond=class_cond,
        shuffle=not deterministic,
        random_flip=random_flip,
        seed=seed,
        num_workers=num_workers,
    )


# ----- sources ---------------------------------------------------------------------------------


class DataError(ValueError):
    """Training data that cannot be used; the message names the file."""


def npz_arrays(path, image_size):
    """Validated arr_0 images (N, H, W, C) and optional arr_1 labels of an .npz; arr_0 memory-mapped when possible.

    An uncompressed local file (np.savez) is mapped, so each rank reads only the rows it uses; a compressed
    (np.savez_compressed) or remote file is read whole into memory on every rank.
    """
    if not bf.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    try:
        with bf.BlobFile(path, "rb") as f:
            data = np.load(f)  # an NpzFile: members are read only when accessed
            if "arr_0" not in data.files:
                raise DataError(f"{path} has no arr_0 (expected N x H x W x C images)")
            mapped = npz_member_memmap(path, "arr_0")
            images = data["arr_0"] if mapped is None else mapped
            labels = data["arr_1"] if "arr_1" in data.files else None
            latents = LATENT_MARK in data.files
    except DataError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        raise DataError(f"cannot read {path} as an .npz file ({type(e).__name__}: {e})") from None
    if mapped is None:
        logger.log(f"note: every rank reads all of {path} into memory (save it with np.savez, not "
                   "savez_compressed, on a local disk to memory-map it)")
    labels = None if labels is None else checked_labels(labels, len(images), path)
    if latents:
        return LatentArray(check_latent_array(images, path, image_size)), labels
    check_image_array(images, path, image_size)
    check_float_range(images[:256], path)  # an early look; every batch is checked as it is read
    return images, labels


LATENT_MARK = "latent_scale"  # the member that makes an .npz pre-encoded latents (scripts/prepare_data.py)


class LatentArray:
    """N x h x w x c float latents (any c, any range) of a prepared latents .npz: read as they are, not as images."""

    def __init__(self, array):
        self.array = array
        self.shape, self.dtype = array.shape, array.dtype

    def __len__(self):
        return len(self.array)

    def __getitem__(self, index):
        return self.array[index]


def check_latent_array(latents, path, image_size):
    """Stop with one line unless latents is N x image_size x image_size x c floats."""
    if latents.ndim != 4 or not np.issubdtype(latents.dtype, np.floating) or not len(latents):
        raise DataError(f"{path}: arr_0 must hold N x h x w x c float latents, got {latents.dtype} {latents.shape}")
    if latents.shape[1:3] != (image_size, image_size):
        raise DataError(f"{path} holds {latents.shape[1]}x{latents.shape[2]} latents but --image_size is {image_size} "
                        "(for pre-encoded latents, pass the latent side and --in_channels)")
    return latents


def npz_member_memmap(path, name):
    """Member `name`.npy of a local, uncompressed .npz as a read-only np.memmap; None when it cannot be mapped."""
    if "://" in str(path):
        return None
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name_length + extra_length)  # the .npy file starts here
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            return None
        shape, fortran_order, dtype = readers[version](f)
        offset = f.tell()
    if dtype.hasobject or math.prod(shape) == 0:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran_order else "C")


def check_image_array(images, path, image_size):
    """Stop with one line unless images is N x image_size x image_size x C (C = 1 or 3), uint8 or float."""
    shape = tuple(images.shape)
    if images.ndim != 4 or shape[-1] not in (1, 3):
        nchw = images.ndim == 4 and shape[1] in (1, 3)
        hint = "; it looks like N x C x H x W, store it as N x H x W x C" if nchw else ""
        raise DataError(f"{path}: arr_0 must be N x H x W x C images with C = 1 or 3, got shape {shape}{hint}")
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{path}: arr_0 has dtype {images.dtype}; expected uint8 (0..255) or float in [-1, 1]")
    if shape[0] == 0:
        raise DataError(f"{path}: arr_0 holds no images")
    if shape[1:3] != (image_size, image_size):
        raise DataError(f"{path} holds {shape[1]}x{shape[2]} images but --image_size is {image_size}")


def check_float_range(rows, path):
    """Stop with one line when float images hold values outside [-1, 1] (or NaN); uint8 always passes."""
    if rows.dtype == np.uint8 or rows.size == 0:
        return
    low, high = float(rows.min()), float(rows.max())
    if not (-1.0 <= low and high <= 1.0):  # also catches NaN
        raise DataError(
            f"{path}: arr_0 holds values outside [-1, 1] (min {low:.4g}, max {high:.4g}); "
            "float images must lie in [-1, 1] (or store uint8 0..255)"
        )


def checked_labels(labels, count, path):
    """arr_1 as int64, after checking it holds one integer label per image."""
    labels = np.asarray(labels)
    if labels.shape != (count,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: arr_1 must hold {count} integer labels, got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def list_image_files(data_dir):
    """Image files under data_dir, recursively, in sorted order; a clear error when there are none.

    Symbolic links to folders are followed, but each real folder is listed once: a link back up the tree
    (data/loop -> .) or a second link to a folder already listed adds nothing.
    """
    if not bf.exists(data_dir) or not bf.isdir(data_dir):
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    files = _list_recursively(data_dir, set())
    if not files:
        raise ValueError(f"data directory {data_dir} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _real_folder(path):
    """The identity of a folder for loop detection: its resolved path (local), or the URL itself (blob storage)."""
    return path if "://" in str(path) else os.path.realpath(path)


def _list_recursively(data_dir, listed):
    """Image files under data_dir, skipping folders whose real path is in `listed` (which it extends)."""
    real = _real_folder(data_dir)
    if real in listed:
        return []
    listed.add(real)
    try:
        entries = sorted(bf.listdir(data_dir))
    except OSError as e:
        raise DataError(f"cannot list data directory {data_dir}: {e.strerror or e}") from None
    results = []
    for entry in entries:
        path = bf.join(data_dir, entry)
        ext = entry.rsplit(".", 1)[-1].lower() if "." in entry else ""
        if ext in IMAGE_EXTENSIONS:
            results.append(path)
        elif bf.isdir(path):
            results.extend(_list_recursively(path, listed))
    return results


def class_labels(files):
    """Class index of each file from its name's prefix before the first "_" (sorted prefixes -> 0, 1, ...)."""
    names = [bf.basename(p).split("_")[0] for p in files]
    index = {name: i for i, name in enumerate(sorted(set(names)))}
    return np.array([index[n] for n in names], dtype=np.int64)


def _resize_short_side(pil_image, side):
    """Halve with BOX filtering while at least 2x too large, then BICUBIC-resize the short side to `side`; an array."""
    while min(*pil_image.size) >= 2 * side:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = side / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    return np.array(pil_image)


def center_crop_arr(pil_image, image_size):
    """Halve with BOX filtering while at least 2x too large, BICUBIC-resize the short side, center-crop."""
    arr = _resize_short_side(pil_image, image_size)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def random_crop_arr(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0, rng=None):
    """Resize the short side to a random size in [image_size / max_frac, image_size / min_frac], crop randomly.

    :param rng: a numpy Generator; None draws from Python's global `random`, as the reference does.
    """
    draw = random.randrange if rng is None else (lambda lo, hi: int(rng.integers(lo, hi)))
    smallest = math.ceil(image_size / max_crop_frac)
    largest = math.ceil(image_size / min_crop_frac)
    side = draw(smallest, largest + 1)
    arr = _resize_short_side(pil_image, side)
    top = draw(0, arr.shape[0] - image_size + 1)
    left = draw(0, arr.shape[1] - image_size + 1)
    return arr[top : top + image_size, left : left + image_size]


class ImageDataset(torch.utils.data.Dataset):
    """The reference's dataset of image files: item k is (CHW float32 image in [-1, 1], {"y": label} or {}).

    Rank `shard` of `num_shards` takes every num_shards-th path; crops and flips draw from Python's global
    `random` as in the reference. (load_data uses its own resumable, seeded stream instead.)
    """

    def __init__(self, resolution, image_paths, classes=None, shard=0, num_shards=1, random_crop=False, random_flip=True):
        super().__init__()
        self.resolution = resolution
        self.local_images = image_paths[shard:][::num_shards]
        self.local_classes = None if classes is None else classes[shard:][::num_shards]
        self.random_crop = random_crop
        self.random_flip = random_flip

    def __len__(self):
        return len(self.local_images)

    def __getitem__(self, idx):
        image = read_image(self.local_images[idx])
        crop = random_crop_arr if self.random_crop else center_crop_arr
        arr = crop(image, self.resolution)
        if self.random_flip and random.random() < 0.5:
            arr = arr[:, ::-1]
        arr = np.transpose(arr.astype(np.float32) / 127.5 - 1, [2, 0, 1])
        out = {} if self.local_classes is None else {"y": np.array(self.local_classes[idx], dtype=np.int64)}
        return arr, out


def bad_image_limit(max_bad_images, file_count):
    """Distinct unreadable images tolerated: max_bad_images as a count (>= 1) or a fraction of file_count (< 1);
    None for -1 (no limit)."""
    if max_bad_images == -1:
        return None
    return int(max_bad_images) if max_bad_images >= 1 else math.ceil(max_bad_images * file_count)


def too_many_bad_images(count, limit, root, example):
    """The one-line error when more than `limit` images could not be read."""
    return (
        f"{count} images under {root} could not be read, more than max_bad_images allows ({limit}), "
        f"e.g. {example}; fix or remove them, or raise the limit"
    )


def to_rgb(image):
    """A PIL image of any mode as 8-bit RGB: 16/32-bit grey is scaled (not clipped) to 0..255, and transparent
    pixels (alpha channel or palette / tRNS transparency) are composited over white."""
    if image.mode.startswith("I"):  # 16-bit PNGs open as I;16 (or I): values 0..65535
        grey = np.asarray(image).astype(np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
    if "transparency" in image.info or image.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("RGB")


def read_image(path):
    """The image file at path, decoded, as a PIL RGB image (see to_rgb)."""
    with bf.BlobFile(path, "rb") as f:
        try:
            image = Image.open(f)
        except UnidentifiedImageError:
            raise ValueError("not an image file Pillow can decode") from None
        image.load()
    return to_rgb(image)


class ArraySource:
    """NHWC images in memory or memory-mapped (uint8, or float in [-1, 1]); a batch reads only its rows."""

    def __init__(self, images, labels, name="arrays"):
        self.images = images
        self.labels = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))
        self.name = name

    def __len__(self):
        return len(self.images)

    def batch(self, indices, seeds):
        """(NCHW uint8 or float32 images, []): array sources never skip images."""
        if isinstance(self.images, LatentArray):  # pre-encoded latents: as stored
            rows = np.asarray(self.images.array[np.asarray(indices, dtype=np.int64)], dtype=np.float32)
            return torch.from_numpy(np.ascontiguousarray(rows)).permute(0, 3, 1, 2), []
        rows = np.asarray(self.images[np.asarray(indices, dtype=np.int64)])
        if rows.shape[-1] == 1:
            rows = np.repeat(rows, 3, axis=-1)
        if rows.dtype != np.uint8:
            check_float_range(rows, self.name)
            rows = rows.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(rows)).permute(0, 3, 1, 2), []


class FileSource(torch.utils.data.Dataset):
    """Image files decoded on demand (optionally in DataLoader workers).

    An unreadable file is replaced by the next readable one and reported back with the batch (on_bad_image
    "skip"), or stops the run ("error"). `max_bad` bounds how many files one image may try (None: all).
    """

    def __init__(self, files, labels, image_size, random_crop, on_bad_image, max_bad=None, root=""):
        self.files = files
        self.labels = None if labels is None else torch.from_numpy(labels)
        self.image_size = image_size
        self.random_crop = random_crop
        self.on_bad_image = on_bad_image
        self.max_bad = max_bad
        self.root = root or "the data directory"

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        """(CHW uint8 image, [(path, reason) of each unreadable file skipped on the way])."""
        index, seed = item
        skipped = []
        tries = len(self.files) if self.max_bad is None else min(len(self.files), self.max_bad + 1)
        for attempt in range(tries):
            path = self.files[(index + attempt) % len(self.files)]
            try:
                return self._crop(read_image(path), seed), skipped
            except Exception as e:  # noqa: BLE001 - any decoding failure is reported the same way
                if self.on_bad_image == "error":
                    raise DataError(f"cannot read image {path}: {e}") from None
                skipped.append((path, f"{e}"))
        example = f"{skipped[-1][0]}: {skipped[-1][1]}"
        if tries == len(self.files):
            raise DataError(f"none of the {tries} images under {self.root} can be read, e.g. {example}")
        raise DataError(too_many_bad_images(tries, self.max_bad, self.root, example))

    def _crop(self, image, seed):
        if self.random_crop:
            arr = random_crop_arr(image, self.image_size, rng=np.random.default_rng(seed))
        else:
            arr = center_crop_arr(image, self.image_size)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)

    def batch(self, indices, seeds):
        """(NCHW uint8 images, [(path, reason) of the unreadable files skipped])."""
        items = [self[(int(i), int(s))] for i, s in zip(indices, seeds)]
        return torch.stack([image for image, _ in items]), [bad for _, skipped in items for bad in skipped]


class _Failed:
    """A DataError raised in a DataLoader worker, carried to the main process to be raised there in one line."""

    def __init__(self, message):
        self.message = message


class _BatchPlan(torch.utils.data.Dataset):
    """Batch k of an epoch as a dataset item, so DataLoader workers decode whole batches in order."""

    def __init__(self, source, plan):
        self.source, self.plan = source, plan

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, k):
        indices, seeds = self.plan[k]
        try:
            return self.source.batch(indices, seeds)
        except DataError as e:  # a worker's exception would reach the main process with its traceback
            return _Failed(str(e))


def _worker_batches(loader, plan, files):
    """The batches of a DataLoader; a worker that dies becomes one line naming the batch it was decoding.

    The DataLoader's SIGCHLD handler would raise a worker's death wherever the main thread happens to be
    (inside a training step or a checkpoint write); without it the loader notices when the next batch is
    awaited (within 5 s), which is where this reports it.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGCHLD) if main_thread else None
    batches = iter(loader)
    if main_thread:
        signal.signal(signal.SIGCHLD, previous)
    for indices, _ in plan:
        try:
            item = next(batches)
        except (RuntimeError, OSError, EOFError) as e:  # OSError, EOFError: its pipe closed mid-transfer
            if isinstance(e, RuntimeError) and "DataLoader worker" not in str(e):
                raise
            raise DataError(
                f"a data-loading worker died ({str(e).strip()}) while decoding the batch that starts with "
                f"{files[int(indices[0])]} or one after it; check that file, or free memory"
            ) from None
        if isinstance(item, _Failed):
            raise DataError(item.message)
        yield item


class DataStream:
    """Endless, resumable batches of one rank: iterate with next(); state_dict() records the position.

    Unreadable images skipped by an image-folder source are counted over all ranks (per epoch, in all,
    distinct files; every rank holds the union), logged at the end of each epoch that had any and by
    log_summary(); more distinct ones than the source's max_bad stop every rank with one line. With several
    ranks that count is one all-reduce per batch, so every rank must draw its batches in step (as training does).
    """

    def __init__(self, source, batch_size, class_cond, shuffle, random_flip, seed, num_workers=None, rank=None,
                 world_size=None):
        """rank, world_size: this stream's place among the ranks (default: the process group's)."""
        self.source = source
        self.batch_size = batch_size
        self.class_cond = class_cond
        self.shuffle = shuffle
        self.random_flip = random_flip
        self.seed = seed
        self.rank = dist_util.get_rank() if rank is None else rank
        self.world_size = dist_util.get_world_size() if world_size is None else world_size
        self.global_batch = batch_size * self.world_size
        if num_workers is None:
            num_workers = 0 if isinstance(source, ArraySource) or (os.cpu_count() or 1) < 2 else 2
        self.num_workers = num_workers
        self.per_epoch = len(source) // self.global_batch  # global batches of an epoch (the rest is dropped)
        if self.per_epoch == 0:
            raise ValueError(
                f"{len(source)} images are too few for batch_size {batch_size} on {self.world_size} rank(s)"
            )
        self.epoch = 0
        self.sample = 0  # global samples of this epoch served before the next batch
        self.skipped_in_epoch = 0
        self.skipped_total = 0
        self.bad_files = set()  # distinct unreadable files met by any rank
        self._iterator = None

    @property
    def position(self):
        """Global batches of this epoch served so far."""
        return self.sample // self.global_batch

    def _epoch_order(self, epoch):
        """(order of the images, crop seed of each place in that order) of `epoch`."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.source), generator=g) if self.shuffle else torch.arange(len(self.source))
        seeds = torch.randint(0, 2**31 - 1, (len(order),), generator=g)
        return order, seeds

    def _epoch_plan(self, epoch, start=0):
        """(global start, (this rank's indices, crop seeds)) of each global batch of `epoch` from sample `start`:
        global batch [p, p + G) of the order, of which this rank takes rows [rank * B, (rank + 1) * B)."""
        order, seeds = self._epoch_order(epoch)
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return [(p, (order[p : p + self.global_batch][rows], seeds[p : p + self.global_batch][rows]))
                for p in range(start, len(order) - self.global_batch + 1, self.global_batch)]

    def _batches(self):
        while True:
            plan = self._epoch_plan(self.epoch, self.sample)
            starts, rest = [p for p, _ in plan], [batch for _, batch in plan]
            if self.num_workers and isinstance(self.source, FileSource):
                loader = torch.utils.data.DataLoader(
                    _BatchPlan(self.source, rest), batch_size=None, num_workers=self.num_workers, persistent_workers=False
                )
                batches = _worker_batches(loader, rest, self.source.files)
            else:
                batches = (self.source.batch(*p) for p in rest)
            for (images, skipped), start, (indices, _) in zip(batches, starts, rest):
                self._count_skipped(skipped)
                self.sample = start + self.global_batch  # state_dict() taken after this batch resumes after it
                yield self._finish(images, indices, start)
            self._end_epoch()

    def _count_skipped(self, skipped):
        """Count the unreadable files a batch skipped on every rank, warn once per file (on the rank that met
        it), stop every rank once more distinct files than the source's limit are unreadable."""
        new = [(path, reason) for path, reason in dict(skipped).items() if path not in self.bad_files]
        for path, reason in new:
            print(f"warning: skipping unreadable image {path}: {reason}", file=sys.stderr)
        new, count = self._over_ranks(new, len(skipped))
        self.bad_files.update(path for path, _ in new)
        self.skipped_in_epoch += count
        self.skipped_total += count
        limit = getattr(self.source, "max_bad", None)
        if new and limit is not None and len(self.bad_files) > limit:
            path, reason = new[-1]
            raise DataError(too_many_bad_images(len(self.bad_files), limit, self.source.root, f"{path}: {reason}"))

    def _over_ranks(self, new, count):
        """(new unreadable files of all ranks, skips of all ranks) from this rank's; a no-op with one rank or a
        source that never skips. One all-reduce per batch; the file names travel only when there are some."""
        if self.world_size == 1 or getattr(self.source, "on_bad_image", "error") != "skip":
            return new, count
        new_total, count = dist_util.all_reduce_sum([len(new), count])
        if new_total:
            new = [item for part in dist_util.all_gather_object(new) for item in part]
        return new, count

    def _end_epoch(self):
        if self.skipped_in_epoch:
            logger.log(
                f"data: skipped {self.skipped_in_epoch} unreadable images in epoch {self.epoch} "
                f"({len(self.bad_files)} distinct files so far)"
            )
        self.epoch += 1
        self.sample = 0
        self.skipped_in_epoch = 0

    def log_summary(self):
        """Log how many unreadable images were skipped in all (image folders only)."""
        if isinstance(self.source, FileSource):
            logger.log(f"data: skipped {self.skipped_total} unreadable images in all ({len(self.bad_files)} distinct files)")

    def _finish(self, images, indices, start):
        """uint8 NCHW (or float in [-1, 1]) -> float32 [-1, 1], flips drawn for the global batch at `start`, labels."""
        x = images.float() / 127.5 - 1 if images.dtype == torch.uint8 else images.float()
        x = x.contiguous()  # NCHW; the trainer picks the memory format
        if self.random_flip:
            batch = start // self.global_batch
            g = torch.Generator().manual_seed((self.seed * 7919 + self.epoch) * 100_003 + batch)
            flip = torch.rand(self.global_batch, generator=g)[self.rank * len(x) : (self.rank + 1) * len(x)] < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        cond = {}
        if self.class_cond:
            cond["y"] = self.source.labels[indices]
        return x, cond

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._batches()
        return next(self._iterator)

    def state_dict(self):
        """Position of the next batch (in global samples, and in global batches of this G) and the unreadable-image
        counts of all ranks (identical on every rank)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "sample": self.sample,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "skipped_in_epoch": self.skipped_in_epoch,
            "skipped_total": self.skipped_total,
            "bad_files": sorted(self.bad_files),
        }

    def load_state_dict(self, state):
        """Continue at the saved sample, whatever the number of ranks and global batch that saved it (a state
        without "sample", from before it was recorded, counts in batches of this stream's G)."""
        self.epoch = int(state["epoch"])
        self.sample = int(state["sample"]) if "sample" in state else int(state["position"]) * self.global_batch
        self.skipped_in_epoch = int(state.get("skipped_in_epoch", 0))
        self.skipped_total = int(state.get("skipped_total", 0))
        self.bad_files = set(state.get("bad_files", ()))
        self._iterator = None
