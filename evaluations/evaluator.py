"""FID, sFID, Inception Score, precision and recall of a sample batch against a reference batch.

    python evaluations/evaluator.py REF_BATCH.npz SAMPLE_BATCH.npz [--json]
    python evaluations/evaluator.py cifar10_train/ samples/            (folders of image files)
    python evaluations/evaluator.py fid_stats.npz SAMPLE_BATCH.npz      (a file of mu and sigma only)
    python evaluations/evaluator.py --save_stats cifar10_train/ fid_stats.npz

An .npz input holds `arr_0`, uint8 images [N, H, W, 3] of any size, read in batches, never whole; a folder
input holds image files (PNG, JPEG, ...; all one size), decoded a batch at a time; an unreadable file stops the
run with one line naming it (not skipped: the numbers describe every file given). An .npz that also holds
`mu`, `sigma`, `mu_s`, `sigma_s` (as the released reference batches do) has its FID/sFID statistics taken
from those arrays, for the samples too (as the reference's read_statistics). A file of only `mu` and `sigma`
(pytorch-fid --save-stats, EDM fid.py ref) gives FID; sFID, precision and recall need more and print n/a.
--save_stats refuses to replace an existing file unless --overwrite is given.
The numbers follow the reference evaluator (TensorFlow Inception graph of 2015-12-05), here run in PyTorch
on CPU or CUDA; README.md says which other tools' numbers compare with them.
"""

import argparse
import json
import os
import sys
import zipfile
from abc import ABC, abstractmethod
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from cm.checkpoint_io import write_through_temporary
from cm.script_util import run_or_exit
from evaluations.inception import INCEPTION_WEIGHTS_ENV, load_inception
from evaluations.metrics import (  # noqa: F401  (re-exported under the reference's module path)
    ALL_METRICS_STAGES,
    FID_METHODS,
    DistanceBlock,
    FIDStatistics,
    InvalidFIDException,
    ManifoldEstimator,
    batch_pairwise_distances,
    batch_pairwise_distances_torch,
    compute_all_metrics,
    compute_inception_score,
    compute_prec_recall,
    compute_statistics,
    frechet_distance,
)

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
FID_STATS_KEYS = ("mu", "sigma")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class NpzArrayReader(ABC):
    """Rows of an image array handed out in batches (the reference's reader interface).

    Subclasses set `shape` and `dtype` and implement read_batch and remaining.
    """

    @abstractmethod
    def read_batch(self, batch_size):
        """The next `batch_size` rows (fewer at the end), or None when all were read."""

    @abstractmethod
    def remaining(self):
        """Rows not read yet."""

    def read_batches(self, batch_size):
        """An iterable over the remaining rows in batches, with len() for progress bars."""

        def gen_fn():
            while (batch := self.read_batch(batch_size)) is not None:
                yield batch

        return BatchIterator(gen_fn, -(-self.remaining() // batch_size))


class BatchIterator:
    """An iterable of `length` batches produced by calling gen_fn().

    :param gen_fn: function returning a fresh generator of batches.
    :param length: number of batches it yields.
    """

    def __init__(self, gen_fn, length):
        self.gen_fn, self.length = gen_fn, length

    def __len__(self):
        return self.length

    def __iter__(self):
        return self.gen_fn()


class StreamingNpzArrayReader(NpzArrayReader):
    """Rows of one array of an .npz, read from its zip member as they are asked for (never the whole array).

    :param arr_f: binary file object positioned at the array data.
    :param shape: array shape.
    :param dtype: array dtype.
    """

    def __init__(self, arr_f, shape, dtype):
        self.arr_f, self.shape, self.dtype = arr_f, tuple(shape), np.dtype(dtype)
        self.idx = 0

    def read_batch(self, batch_size):
        count = min(batch_size, self.remaining())
        if count <= 0:
            return None
        self.idx += count
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        data = _read_bytes(self.arr_f, count * row_bytes, "array data")
        return np.frombuffer(data, dtype=self.dtype).reshape(count, *self.shape[1:])

    def remaining(self):
        return max(0, self.shape[0] - self.idx)


class MemoryNpzArrayReader(NpzArrayReader):
    """Rows of an array held in memory (Fortran-order or object arrays, which cannot be streamed).

    :param arr: the array.
    """

    def __init__(self, arr):
        self.arr, self.shape, self.dtype = arr, arr.shape, arr.dtype
        self.idx = 0

    @classmethod
    def load(cls, path, arr_name):
        """A reader over array `arr_name` of the .npz file `path`, loaded whole."""
        with np.load(path) as data:
            return cls(np.atleast_1d(data[arr_name]))

    def read_batch(self, batch_size):
        if self.idx >= self.arr.shape[0]:
            return None
        batch = self.arr[self.idx : self.idx + batch_size]
        self.idx += len(batch)
        return batch

    def remaining(self):
        return max(0, self.arr.shape[0] - self.idx)


UNREADABLE_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def read_rgb(path):
    """uint8 RGB array [H, W, 3] of an image file; an unreadable one (empty, truncated, not an image) is a
    ValueError naming it. Metrics describe exactly the files given, so it is not skipped."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except UNREADABLE_IMAGE_ERRORS as e:
        raise ValueError(
            f"cannot read image {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'empty'}); "
            "replace or remove it: the metrics cover every file of the folder"
        ) from None


class ImageFolderReader(NpzArrayReader):
    """uint8 RGB images [n, H, W, 3] from image files, decoded one batch at a time; all must share one size.
    An unreadable file stops the reading with one line naming it (read_rgb).

    :param paths: image files in the order to read them.
    """

    def __init__(self, paths):
        if not paths:
            raise ValueError("no image files to read")
        self.paths = list(paths)
        height, width = read_rgb(self.paths[0]).shape[:2]
        self.shape, self.dtype = (len(self.paths), height, width, 3), np.dtype(np.uint8)
        self.idx = 0

    def _load(self, path):
        array = read_rgb(path)
        if array.shape != self.shape[1:]:
            raise ValueError(
                f"{path} is {array.shape[1]}x{array.shape[0]} but {self.paths[0]} is {self.shape[2]}x{self.shape[1]}; "
                "the images of one folder must share a size (scripts/prepare_data.py resizes a folder)"
            )
        return array

    def read_batch(self, batch_size):
        count = min(batch_size, self.remaining())
        if count <= 0:
            return None
        batch = np.stack([self._load(p) for p in self.paths[self.idx : self.idx + count]])
        self.idx += count
        return batch

    def remaining(self):
        return max(0, len(self.paths) - self.idx)


def _read_bytes(fp, size, error_template="ran out of data"):
    """Exactly `size` bytes from a file object, or ValueError when it ends first."""
    chunks, left = [], size
    while left > 0:
        chunk = fp.read(left)
        if not chunk:
            raise ValueError(f"npz {error_template} is truncated: expected {size} bytes, got {size - left}")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def npz_keys(path):
    """Names of the arrays in an .npz file, read from its zip directory only.

    :param path: the .npz file.
    :return: list of array names.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such npz file: {path}")
    try:
        with zipfile.ZipFile(path) as archive:
            return [name[: -len(".npy")] for name in archive.namelist() if name.endswith(".npy")]
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an .npz file") from None


@contextmanager
def _open_npy_file(path, arr_name):
    """The open zip member `arr_name`.npy of an .npz file (ValueError when it has no such array)."""
    keys = npz_keys(path)
    if arr_name not in keys:
        raise ValueError(f"{path} has no array {arr_name!r} (it has {keys})")
    with zipfile.ZipFile(path) as archive, archive.open(f"{arr_name}.npy") as arr_f:
        yield arr_f


@contextmanager
def open_npz_array(path, arr_name="arr_0"):
    """Context manager giving a reader over one array of an .npz file without loading it whole.

    :param path: the .npz file.
    :param arr_name: array name inside it.
    :return: an NpzArrayReader with shape, dtype, read_batch, read_batches.
    """
    with _open_npy_file(path, arr_name) as arr_f:
        version = np.lib.format.read_magic(arr_f)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(arr_f)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(arr_f)
        else:
            shape, fortran_order, dtype = (), True, None
        if fortran_order or dtype is None or dtype.hasobject or len(shape) == 0:
            yield MemoryNpzArrayReader.load(path, arr_name)
        else:
            yield StreamingNpzArrayReader(arr_f, shape, dtype)


def list_images(folder):
    """Image files (by extension) under `folder`, recursively, sorted by path; FileNotFoundError when none."""
    paths = sorted(
        os.path.join(root, name)
        for root, _, names in os.walk(folder)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not paths:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return paths


@contextmanager
def open_images(path):
    """A reader over the images of `path`: a folder of image files, or arr_0 of an .npz file."""
    if os.path.isdir(path):
        yield ImageFolderReader(list_images(path))
        return
    with open_npz_array(path, "arr_0") as reader:
        yield reader


def has_images(path):
    """True when `path` is a folder or an .npz holding arr_0."""
    return os.path.isdir(path) or "arr_0" in npz_keys(path)


def check_images(shape, dtype, name="arr_0"):
    """ValueError unless the array is uint8 images [N, H, W, 3] with N >= 1.

    :param shape: array shape.
    :param dtype: array dtype.
    :param name: what to call the array in the message.
    """
    if np.dtype(dtype) != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] < 1:
        raise ValueError(
            f"{name} must hold uint8 images [N, H, W, 3], got dtype {np.dtype(dtype)} and shape {tuple(shape)}"
        )


def read_reference_statistics(path):
    """(pool, spatial) FIDStatistics stored in an .npz file; None if it has no `mu` (or `path` is a folder).

    Two layouts: the ADM batches' mu, sigma, mu_s, sigma_s; and a file of only mu and sigma (pytorch-fid
    --save-stats, EDM fid.py ref), whose spatial statistics are None (no sFID). A file with images and
    mu/sigma but without mu_s/sigma_s is taken for an incomplete ADM batch and refused.

    :param path: the .npz file.
    """
    if os.path.isdir(path):
        return None
    keys = npz_keys(path)
    if "mu" not in keys:
        return None
    missing = [key for key in STATS_KEYS if key not in keys]
    fid_only = set(keys) == set(FID_STATS_KEYS)
    if missing and not fid_only:
        raise ValueError(f"{path} has precomputed statistics but lacks {missing}")
    with np.load(path) as data:
        pool = FIDStatistics(data["mu"], data["sigma"])
        return pool, (None if fid_only else FIDStatistics(data["mu_s"], data["sigma_s"]))


def check_statistics_destination(path, overwrite=False):
    """ValueError unless `path` ends in .npz and, without `overwrite`, does not exist yet (a reference batch
    given as the second argument by mistake is never replaced)."""
    if not str(path).endswith(".npz"):
        raise ValueError(f"statistics file {path} must end in .npz")
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"{path} already exists; with --save_stats the second argument is the file written: "
                         "pass --overwrite to replace it")


def save_statistics(path, stats, overwrite=False):
    """Write pool-feature statistics as an .npz of mu and sigma only (pytorch-fid / EDM fid.py layout).

    :param path: destination ending in .npz; written to a temporary name, then renamed.
    :param stats: FIDStatistics of the pool_3 features.
    :param overwrite: replace an existing file (otherwise a ValueError).
    """
    check_statistics_destination(path, overwrite)
    write_through_temporary(path, lambda f: np.savez(f, mu=np.asarray(stats.mu), sigma=np.asarray(stats.sigma)))


def resolve_device(name=None):
    """The torch device to run on: `name`, or CUDA when available, else CPU.

    :param name: device string such as "cpu", "cuda", "cuda:1", or None.
    :return: torch.device.
    """
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available")
    return device


class Evaluator:
    """Inception features of npz batches and the reference's metrics on them.

    :param model: feature network: model(images [N, 3, H, W] float in [0, 255]) -> (pool, spatial),
        and model.softmax(pool) -> class probabilities (an evaluations.inception.FIDInceptionV3).
    :param batch_size: images per forward pass (reference 64).
    :param softmax_batch_size: rows per softmax pass for IS (reference 512).
    :param device: torch device of the model's inputs; None uses the model's parameters' device.
    :param manifold_estimator: ManifoldEstimator for precision/recall; None uses the reference's settings on `device`.
    :param progress: show tqdm bars.
    :param channels_last: convert the model to channels-last memory format (about 1.3x faster on CPU;
        the same features up to float32 rounding).
    """

    def __init__(self, model, batch_size=64, softmax_batch_size=512, device=None, manifold_estimator=None,
                 progress=True, channels_last=True):
        if batch_size < 1 or softmax_batch_size < 1:
            raise ValueError("batch sizes must be positive")
        self.model = model.to(memory_format=torch.channels_last) if channels_last else model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.batch_size = batch_size
        self.softmax_batch_size = softmax_batch_size
        self.manifold_estimator = manifold_estimator or ManifoldEstimator(device=self.device)
        self.progress = progress

    def warmup(self):
        """Run one small batch (first-call allocation and kernel selection)."""
        self.compute_activations([np.zeros([1, 64, 64, 3], dtype=np.uint8)])

    def read_activations(self, npz_path):
        """(pool [N, 2048], spatial [N, 2023]) float32 features of the images, read batch by batch.

        :param npz_path: an .npz file (images in arr_0) or a folder of image files.
        """
        with open_images(npz_path) as reader:
            check_images(reader.shape, reader.dtype, f"images of {npz_path}" if os.path.isdir(npz_path) else
                         f"arr_0 of {npz_path}")
            return self.compute_activations(reader.read_batches(self.batch_size))

    def compute_activations(self, batches):
        """Features of an iterable of uint8 NHWC image batches.

        :param batches: iterable of arrays [n, H, W, 3] with values in [0, 255].
        :return: (pool [N, 2048], spatial [N, 2023]) float32 numpy arrays.
        """
        pools, spatials = [], []
        for batch in tqdm(batches, disable=not self.progress, desc="inception", unit="batch", leave=False):
            check_images(batch.shape, batch.dtype, "image batch")
            images = torch.from_numpy(np.array(batch, dtype=np.uint8, copy=True)).to(self.device)
            images = images.permute(0, 3, 1, 2).float()
            with torch.inference_mode():
                pool, spatial = self.model(images)
            pools.append(pool.reshape(len(pool), -1).float().cpu().numpy())
            spatials.append(spatial.reshape(len(spatial), -1).float().cpu().numpy())
        if not pools:
            raise ValueError("no images to compute activations of")
        return np.concatenate(pools), np.concatenate(spatials)

    def read_statistics(self, npz_path, activations):
        """(pool, spatial) FIDStatistics: the file's mu/sigma/mu_s/sigma_s if present, else from `activations`.

        :param npz_path: the .npz file.
        :param activations: (pool, spatial) features of its images, or None when it holds statistics.
        """
        stats = read_reference_statistics(npz_path)
        if stats is not None:
            return stats
        if activations is None:
            raise ValueError(f"{npz_path} has neither images (arr_0) nor statistics (mu, sigma[, mu_s, sigma_s])")
        sets = tqdm(activations, desc="statistics", unit="set", disable=not self.progress, leave=False)
        return tuple(self.compute_statistics(acts) for acts in sets)

    def read_input(self, path, what="batch", log=None):
        """(activations or None, statistics) of an evaluator input: an .npz batch (images and/or statistics)
        or a folder of images. Activations are computed whenever there are images (IS, precision, recall);
        stored statistics win over computed ones for FID, as in the reference's read_statistics.

        :param path: .npz file or image folder.
        :param what: name for the status line.
        :param log: callable taking a status line, or None.
        """
        activations = None
        if has_images(path):
            (log or (lambda message: None))(f"computing {what} activations...")
            activations = self.read_activations(path)
        return activations, self.read_statistics(path, activations)

    def compute_statistics(self, activations):
        """FIDStatistics (mean, covariance) of activations [N, D]."""
        return compute_statistics(activations)

    def compute_softmax(self, activations):
        """Inception class probabilities [N, 1008] of pool_3 activations [N, 2048], as float32 numpy."""
        out = []
        for start in range(0, len(activations), self.softmax_batch_size):
            pool = torch.from_numpy(np.asarray(activations[start : start + self.softmax_batch_size], np.float32))
            with torch.inference_mode():
                out.append(self.model.softmax(pool.to(self.device)).float().cpu().numpy())
        return np.concatenate(out)

    def compute_inception_score(self, activations, split_size=5000):
        """Inception Score of pool_3 activations [N, 2048] (softmax of pool_3 @ W, splits of `split_size`)."""
        return compute_inception_score(self.compute_softmax(activations), split_size)

    def compute_prec_recall(self, activations_ref, activations_sample):
        """(precision, recall) of sample pool_3 activations against reference ones, k = 3."""
        return compute_prec_recall(activations_ref, activations_sample, self.manifold_estimator)

    def evaluate(self, ref_batch, sample_batch, split_size=5000, fid_method="sqrtm", log=None):
        """All metrics of a sample batch against a reference batch (the reference's main()).

        :param ref_batch: reference .npz (arr_0 images and/or statistics) or a folder of images.
        :param sample_batch: sample .npz (arr_0 images and/or statistics) or a folder of images.
        :param split_size: IS split size.
        :param fid_method: "sqrtm" (reference) or "eigh"; see FIDStatistics.frechet_distance.
        :param log: callable taking a status line, or None for silence.
        :return: dict with inception_score, fid, sfid, precision, recall; a metric that the inputs cannot
            give is None (precision and recall need images on both sides, IS sample images, sFID the
            spatial statistics that a mu/sigma-only file lacks).
        """
        log = log or (lambda message: None)
        ref_acts, ref_stats = self.read_input(ref_batch, "reference batch", log)
        sample_acts, sample_stats = self.read_input(sample_batch, "sample batch", log)
        log("computing evaluations...")
        probs = self.compute_softmax(sample_acts[0]) if sample_acts is not None else None
        with tqdm(total=ALL_METRICS_STAGES, desc="evaluations", unit="stage", disable=not self.progress,
                  leave=False) as bar:
            def stage(name):
                bar.set_postfix_str(name, refresh=False)
                bar.update(1)

            return compute_all_metrics(
                ref_acts, sample_acts, probs, ref_stats, self.manifold_estimator, split_size, fid_method,
                sample_stats=sample_stats, stage=stage,
            )

    def write_statistics(self, path, out_path, log=None, overwrite=False):
        """Write the mu/sigma file (pytorch-fid / EDM layout) of an .npz batch or image folder; returns its stats.

        :param path: input .npz (images or statistics) or folder of images.
        :param out_path: .npz file to write; an existing one is refused unless `overwrite`.
        :param log: callable taking a status line, or None.
        """
        check_statistics_destination(out_path, overwrite)
        _, stats = self.read_input(path, "input", log)
        save_statistics(out_path, stats[0], overwrite)
        return stats[0]


def format_metrics(metrics):
    """The reference's result lines: Inception Score, FID, sFID, Precision, Recall."""
    names = (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
             ("Precision", "precision"), ("Recall", "recall"))
    lines = []
    for label, key in names:
        value = metrics.get(key)
        lines.append(f"{label}: {value if value is not None else 'n/a'}")
    return "\n".join(lines)


def create_argparser():
    """Command-line flags of the evaluator."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ref_batch",
                        help="reference: .npz batch (arr_0 uint8 NHWC images and/or mu, sigma[, mu_s, sigma_s]) "
                             "or a folder of images; with --save_stats, the input to summarise")
    parser.add_argument("sample_batch",
                        help="samples: .npz batch (arr_0 images and/or statistics) or a folder of images; "
                             "with --save_stats, the .npz statistics file to write")
    parser.add_argument("--save_stats", action="store_true",
                        help="write the mu/sigma statistics of ref_batch to the file sample_batch (the layout "
                             "pytorch-fid --save-stats and EDM fid.py ref read and write) instead of evaluating")
    parser.add_argument("--overwrite", action="store_true",
                        help="with --save_stats, replace an existing statistics file (otherwise refused)")
    parser.add_argument("--inception_weights", default=None,
                        help=f"FID Inception weights file (pt_inception-2015-12-05-6726825d.pth); default "
                             f"${INCEPTION_WEIGHTS_ENV}, then the torch hub cache")
    parser.add_argument("--allow_unverified_weights", action="store_true",
                        help="use an Inception weights file whose SHA256 is not that of the published "
                             "pt_inception-2015-12-05-6726825d.pth (e.g. the reference's inception-2015-12-05.pt); "
                             "the numbers may then differ from published ones")
    parser.add_argument("--random_weights", action="store_true",
                        help="random Inception weights (tests and timing only: the numbers mean nothing)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch_size", type=int, default=64, help="images per Inception forward pass")
    parser.add_argument("--split_size", type=int, default=5000, help="samples per Inception Score split")
    parser.add_argument("--row_batch_size", type=int, default=10000, help="rows per precision/recall distance block")
    parser.add_argument("--col_batch_size", type=int, default=10000, help="columns per precision/recall distance block")
    parser.add_argument("--fid_method", choices=FID_METHODS, default="sqrtm",
                        help="sqrtm: scipy's matrix square root (the reference); eigh: same value via "
                             "symmetric eigensolves, faster")
    parser.add_argument("--pr_fp32", action="store_true",
                        help="precision/recall distances in float32 only (the reference tries float16 first)")
    parser.add_argument("--json", action="store_true", help="also print the metrics as one JSON line")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    return parser


def main(argv=None):
    """Command-line entry point: prints the five metrics (or writes --save_stats) and returns the exit code
    (1 on bad input); anything unexpected ends in one line too (cm.script_util.run_or_exit).

    :param argv: argument list; None reads sys.argv.
    """
    return run_or_exit(evaluate_command, argv)


def evaluate_command(argv=None):
    """The body of main(): bad input is one 'error:' line and exit code 1."""
    args = create_argparser().parse_args(argv)
    progress = not args.quiet

    def log(message):
        if progress:
            print(message, file=sys.stderr, flush=True)

    try:
        if args.save_stats:
            check_statistics_destination(args.sample_batch, args.overwrite)
        device = resolve_device(args.device)
        model = load_inception(args.inception_weights, device, pretrained=not args.random_weights,
                               allow_unverified=args.allow_unverified_weights or None)
        if args.random_weights:
            log("warning: random Inception weights; these numbers are not comparable to any published ones")
        estimator = ManifoldEstimator(args.row_batch_size, args.col_batch_size, device=device, fp16=not args.pr_fp32)
        evaluator = Evaluator(model, args.batch_size, device=device, manifold_estimator=estimator, progress=progress)
        if args.save_stats:
            stats = evaluator.write_statistics(args.ref_batch, args.sample_batch, log, args.overwrite)
            print(f"wrote {args.sample_batch}: mu [{len(stats.mu)}], sigma {list(np.shape(stats.sigma))}")
            return 0
        metrics = evaluator.evaluate(args.ref_batch, args.sample_batch, args.split_size, args.fid_method, log)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_metrics(metrics))
    if args.json:
        print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
