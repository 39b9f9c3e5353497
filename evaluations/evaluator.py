"""FID, sFID, Inception Score, precision and recall of a sample batch against a reference batch.

    python evaluations/evaluator.py REF_BATCH.npz SAMPLE_BATCH.npz [--json]

Both files hold `arr_0`, uint8 images [N, H, W, 3] of any size; they are read in batches, never whole.
A reference batch that also holds `mu`, `sigma`, `mu_s`, `sigma_s` (as the released ones do) has
its FID/sFID statistics taken from those arrays. The numbers follow the reference evaluator
(TensorFlow Inception graph of 2015-12-05), here run in PyTorch on CPU or CUDA; see README.md.
"""

import argparse
import json
import os
import sys
import zipfile
from contextlib import contextmanager

import numpy as np
import torch
from tqdm.auto import tqdm

if __package__ in (None, ""):  # run as a file: make the package importable from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from evaluations.inception import INCEPTION_WEIGHTS_ENV, load_inception  # noqa: E402
from evaluations.metrics import (  # noqa: E402,F401  (re-exported under the reference's module path)
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


class NpzArrayReader:
    """Rows of one .npz array in order, streamed from its zip member or served from memory.

    :param shape: array shape.
    :param dtype: array dtype.
    :param file: open binary file positioned at the array data (streaming), or None.
    :param array: the loaded array (for Fortran-order or object arrays), or None.
    """

    def __init__(self, shape, dtype, file=None, array=None):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.file, self.array = file, array
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.index = 0

    def remaining(self):
        """Rows not read yet."""
        return max(0, self.shape[0] - self.index)

    def read_batch(self, batch_size):
        """The next `batch_size` rows (fewer at the end), or None when all were read."""
        count = min(batch_size, self.remaining())
        if count <= 0:
            return None
        if self.array is not None:
            batch = self.array[self.index : self.index + count]
        else:
            data = _read_exactly(self.file, count * self.row_bytes)
            batch = np.frombuffer(data, dtype=self.dtype).reshape(count, *self.shape[1:])
        self.index += count
        return batch

    def read_batches(self, batch_size):
        """An iterable over the remaining rows in batches, with len() for progress bars."""
        return _Batches(self, batch_size)


class _Batches:
    """Iterable of a reader's batches that knows how many there are.

    :param reader: an NpzArrayReader.
    :param batch_size: rows per batch.
    """

    def __init__(self, reader, batch_size):
        self.reader, self.batch_size = reader, batch_size
        self.length = -(-reader.remaining() // batch_size)

    def __len__(self):
        return self.length

    def __iter__(self):
        while (batch := self.reader.read_batch(self.batch_size)) is not None:
            yield batch


def _read_exactly(file, size):
    """`size` bytes from a file object, or ValueError when it ends first."""
    chunks, left = [], size
    while left > 0:
        chunk = file.read(left)
        if not chunk:
            raise ValueError(f"npz array data is truncated: expected {size} bytes, got {size - left}")
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
def open_npz_array(path, arr_name="arr_0"):
    """Context manager giving a reader over one array of an .npz file without loading it whole.

    :param path: the .npz file.
    :param arr_name: array name inside it.
    :return: an NpzArrayReader with shape, dtype, read_batch, read_batches.
    """
    keys = npz_keys(path)
    if arr_name not in keys:
        raise ValueError(f"{path} has no array {arr_name!r} (it has {keys})")
    with zipfile.ZipFile(path) as archive, archive.open(f"{arr_name}.npy") as file:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(file)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(file)
        else:
            shape, fortran_order, dtype = (), True, None
        if fortran_order or dtype is None or dtype.hasobject or len(shape) == 0:
            with np.load(path) as data:
                array = np.atleast_1d(data[arr_name])
            yield NpzArrayReader(array.shape, array.dtype, array=array)
        else:
            yield NpzArrayReader(shape, dtype, file=file)


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
    """(pool, spatial) FIDStatistics stored in an .npz file as mu, sigma, mu_s, sigma_s; None if it has no `mu`.

    :param path: the .npz file.
    """
    keys = npz_keys(path)
    if "mu" not in keys:
        return None
    missing = [key for key in STATS_KEYS if key not in keys]
    if missing:
        raise ValueError(f"{path} has precomputed statistics but lacks {missing}")
    with np.load(path) as data:
        return FIDStatistics(data["mu"], data["sigma"]), FIDStatistics(data["mu_s"], data["sigma_s"])


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
        """(pool [N, 2048], spatial [N, 2023]) float32 features of the images in `arr_0`, read batch by batch.

        :param npz_path: the .npz file.
        """
        with open_npz_array(npz_path, "arr_0") as reader:
            check_images(reader.shape, reader.dtype, f"arr_0 of {npz_path}")
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
            raise ValueError(f"{npz_path} has neither images (arr_0) nor statistics (mu, sigma, mu_s, sigma_s)")
        return tuple(self.compute_statistics(acts) for acts in activations)

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

        :param ref_batch: reference .npz (arr_0 images and/or mu, sigma, mu_s, sigma_s).
        :param sample_batch: sample .npz (arr_0 images).
        :param split_size: IS split size.
        :param fid_method: "sqrtm" (reference) or "eigh"; see FIDStatistics.frechet_distance.
        :param log: callable taking a status line, or None for silence.
        :return: dict with inception_score, fid, sfid, precision, recall (precision and recall are None
            when the reference batch has statistics but no images).
        """
        log = log or (lambda message: None)
        ref_stats = read_reference_statistics(ref_batch)
        ref_acts = None
        if ref_stats is None or "arr_0" in npz_keys(ref_batch):
            log("computing reference batch activations...")
            ref_acts = self.read_activations(ref_batch)
        log("computing sample batch activations...")
        sample_acts = self.read_activations(sample_batch)
        log("computing evaluations...")
        return compute_all_metrics(
            ref_acts, sample_acts, self.compute_softmax(sample_acts[0]), ref_stats,
            self.manifold_estimator, split_size, fid_method,
        )


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
                        help="reference batch .npz (arr_0 uint8 NHWC images, optional mu/sigma/mu_s/sigma_s)")
    parser.add_argument("sample_batch", help="sample batch .npz (arr_0 uint8 NHWC images)")
    parser.add_argument("--inception_weights", default=None,
                        help=f"FID Inception weights file (pt_inception-2015-12-05-6726825d.pth); default "
                             f"${INCEPTION_WEIGHTS_ENV}, then the torch hub cache")
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
    """Command-line entry point: prints the five metrics and returns the exit code (1 on bad input).

    :param argv: argument list; None reads sys.argv.
    """
    args = create_argparser().parse_args(argv)
    progress = not args.quiet

    def log(message):
        if progress:
            print(message, file=sys.stderr, flush=True)

    try:
        device = resolve_device(args.device)
        model = load_inception(args.inception_weights, device, pretrained=not args.random_weights)
        if args.random_weights:
            log("warning: random Inception weights; these numbers are not comparable to any published ones")
        estimator = ManifoldEstimator(args.row_batch_size, args.col_batch_size, device=device, fp16=not args.pr_fp32)
        evaluator = Evaluator(model, args.batch_size, device=device, manifold_estimator=estimator, progress=progress)
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
