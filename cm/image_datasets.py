"""Training data: image folders (via blobfile), .npz arrays, or the embedded scikit-learn digits.

`load_data` returns an endless, resumable iterator of (images in [-1, 1] NCHW float32, {"y": labels}).
Each epoch is a seeded permutation of the whole set, of which rank r takes every world_size-th
element, so ranks see disjoint data. Flips and crops are drawn from (seed, epoch, position), so the
stream depends only on the seed and its position: `state_dict()` / `load_state_dict()` resume it exactly.
"""

import math
import os
import sys

import blobfile as bf
import numpy as np
import torch
from PIL import Image

from . import dist_util

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif")
DIGITS = "digits"


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
    num_workers=None,
):
    """An endless iterator over (images, kwargs) batches of the local rank.

    :param data_dir: an image folder (searched recursively; class = file-name prefix before the first "_"),
        an .npz file (arr_0 NHWC uint8, optional arr_1 labels), or "digits" (scikit-learn's 8x8 digits).
    :param batch_size: images per batch on this rank.
    :param image_size: side of the square images returned (center-crop resize like the reference).
    :param class_cond: include labels as kwargs["y"].
    :param deterministic: keep the file order instead of shuffling each epoch.
    :param random_crop: random 80-100% crops instead of center crops (image folders).
    :param random_flip: random horizontal flips.
    :param seed: seed of the shuffle, flips and crops.
    :param on_bad_image: "skip" (warn with the file name and use the next image) or "error".
    :param num_workers: decoding processes for image folders (default: 0 on one core, else 2).
    """
    if on_bad_image not in ("skip", "error"):
        raise ValueError(f"unknown on_bad_image {on_bad_image!r}; allowed: skip, error")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not data_dir:
        raise ValueError("no data given: pass --data_dir (an image folder, an .npz file, or 'digits')")
    if data_dir == DIGITS:
        images, labels = digits_arrays(image_size)
        source = ArraySource(images, labels)
    elif str(data_dir).endswith(".npz"):
        source = ArraySource(*npz_arrays(data_dir, image_size))
    else:
        files = list_image_files(data_dir)
        classes = class_labels(files) if class_cond else None
        source = FileSource(files, classes, image_size, random_crop, on_bad_image)
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


def digits_arrays(image_size):
    """scikit-learn's 1,797 8x8 digits as uint8 NHWC RGB images of image_size (bilinear), and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).numpy(), digits.target.astype(np.int64)


def npz_arrays(path, image_size):
    """arr_0 (N, H, W, C) uint8 and optional arr_1 labels from an .npz, checked against image_size."""
    if not bf.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    with bf.BlobFile(path, "rb") as f:
        data = np.load(f)
        if "arr_0" not in data:
            raise ValueError(f"{path} has no arr_0 (expected N x H x W x C uint8 images)")
        images = data["arr_0"]
        labels = data["arr_1"].astype(np.int64) if "arr_1" in data else None
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must be N x H x W x C uint8 with C = 1 or 3, got {images.dtype} {images.shape}")
    if images.shape[1:3] != (image_size, image_size):
        raise ValueError(f"{path} holds {images.shape[1]}x{images.shape[2]} images but --image_size is {image_size}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images, labels


def list_image_files(data_dir):
    """Image files under data_dir, recursively, in sorted order; a clear error when there are none."""
    if not bf.exists(data_dir) or not bf.isdir(data_dir):
        raise FileNotFoundError(f"data directory {data_dir} does not exist")
    files = _list_recursively(data_dir)
    if not files:
        raise ValueError(f"data directory {data_dir} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def _list_recursively(data_dir):
    results = []
    for entry in sorted(bf.listdir(data_dir)):
        path = bf.join(data_dir, entry)
        ext = entry.rsplit(".", 1)[-1].lower() if "." in entry else ""
        if ext in IMAGE_EXTENSIONS:
            results.append(path)
        elif bf.isdir(path):
            results.extend(_list_recursively(path))
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


def random_crop_arr(pil_image, image_size, rng, min_crop_frac=0.8, max_crop_frac=1.0):
    """Resize the short side to a random size in [image_size / max_frac, image_size / min_frac], crop randomly."""
    smallest = math.ceil(image_size / max_crop_frac)
    largest = math.ceil(image_size / min_crop_frac)
    side = int(rng.integers(smallest, largest + 1))
    arr = _resize_short_side(pil_image, side)
    top = int(rng.integers(arr.shape[0] - image_size + 1))
    left = int(rng.integers(arr.shape[1] - image_size + 1))
    return arr[top : top + image_size, left : left + image_size]


class ArraySource:
    """Images already in memory as uint8 NHWC."""

    def __init__(self, images, labels):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = None if labels is None else torch.from_numpy(labels)

    def __len__(self):
        return len(self.images)

    def batch(self, indices, seeds):
        return self.images[indices].permute(0, 3, 1, 2)


class FileSource(torch.utils.data.Dataset):
    """Image files decoded on demand (optionally in DataLoader workers)."""

    def __init__(self, files, labels, image_size, random_crop, on_bad_image):
        self.files = files
        self.labels = None if labels is None else torch.from_numpy(labels)
        self.image_size = image_size
        self.random_crop = random_crop
        self.on_bad_image = on_bad_image

    def __len__(self):
        return len(self.files)

    def __getitem__(self, item):
        index, seed = item
        for attempt in range(len(self.files)):
            path = self.files[(index + attempt) % len(self.files)]
            try:
                with bf.BlobFile(path, "rb") as f:
                    image = Image.open(f)
                    image.load()
                image = image.convert("RGB")
                break
            except Exception as e:  # noqa: BLE001 - any decoding failure is reported the same way
                if self.on_bad_image == "error":
                    raise ValueError(f"cannot read image {path}: {e}") from None
                print(f"warning: skipping unreadable image {path}: {e}", file=sys.stderr)
        if self.random_crop:
            arr = random_crop_arr(image, self.image_size, np.random.default_rng(seed))
        else:
            arr = center_crop_arr(image, self.image_size)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)

    def batch(self, indices, seeds):
        return torch.stack([self[(int(i), int(s))] for i, s in zip(indices, seeds)])


class _BatchPlan(torch.utils.data.Dataset):
    """Batch k of an epoch as a dataset item, so DataLoader workers decode whole batches in order."""

    def __init__(self, source, plan):
        self.source, self.plan = source, plan

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, k):
        indices, seeds = self.plan[k]
        return self.source.batch(indices, seeds)


class DataStream:
    """Endless, resumable batches of one rank: iterate with next(); state_dict() records the position."""

    def __init__(self, source, batch_size, class_cond, shuffle, random_flip, seed, num_workers=None):
        self.source = source
        self.batch_size = batch_size
        self.class_cond = class_cond
        self.shuffle = shuffle
        self.random_flip = random_flip
        self.seed = seed
        self.rank = dist_util.get_rank()
        self.world_size = dist_util.get_world_size()
        if num_workers is None:
            num_workers = 0 if isinstance(source, ArraySource) or (os.cpu_count() or 1) < 2 else 2
        self.num_workers = num_workers
        self.per_epoch = len(source) // self.world_size // batch_size
        if self.per_epoch == 0:
            raise ValueError(
                f"{len(source)} images are too few for batch_size {batch_size} on {self.world_size} rank(s)"
            )
        self.epoch = 0
        self.position = 0
        self._iterator = None

    def _epoch_plan(self, epoch):
        """(indices, crop seeds) of each batch of this rank in `epoch`."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.source), generator=g) if self.shuffle else torch.arange(len(self.source))
        mine = order[self.rank :: self.world_size][: self.per_epoch * self.batch_size]
        seeds = torch.randint(0, 2**31 - 1, (len(order),), generator=g)[self.rank :: self.world_size]
        return [
            (mine[k * self.batch_size : (k + 1) * self.batch_size], seeds[k * self.batch_size : (k + 1) * self.batch_size])
            for k in range(self.per_epoch)
        ]

    def _batches(self):
        while True:
            plan = self._epoch_plan(self.epoch)
            if self.num_workers and isinstance(self.source, FileSource):
                batches = iter(
                    torch.utils.data.DataLoader(
                        _BatchPlan(self.source, plan[self.position :]),
                        batch_size=None,
                        num_workers=self.num_workers,
                        persistent_workers=False,
                    )
                )
            else:
                batches = (self.source.batch(*p) for p in plan[self.position :])
            for images in batches:
                position = self.position
                self.position += 1  # state_dict() taken after this batch resumes after it
                yield self._finish(images, plan[position][0], position)
            self.epoch += 1
            self.position = 0

    def _finish(self, images, indices, position):
        """uint8 NCHW -> float [-1, 1], seeded flips, labels."""
        x = (images.float() / 127.5 - 1).contiguous()  # NCHW; the trainer picks the memory format
        if self.random_flip:
            g = torch.Generator().manual_seed((self.seed * 7919 + self.epoch) * 100_003 + position)
            flip = torch.rand(len(x), generator=g) < 0.5
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
        """Position of the next batch (identical on every rank)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._iterator = None
