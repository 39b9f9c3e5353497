"""Reading files that come from elsewhere without running their code, and knowing which file one has.

* `restricted_pickle_load`: a pickle reader that builds only the globals it is given (e.g. the numpy array
  reconstruction of the CIFAR-10 python batches); any other global stops it before anything runs.
* `check_torch_load_is_safe`: torch.load(weights_only=True) could be made to run code before torch 2.6
  (CVE-2025-32434); on such a torch a .pt file is refused (safetensors files still load).
* `verify_known_weights`: a weights file with a published hash (torch.hub's convention: the first hex digits
  of its SHA256 in the file name) must have that hash; CM_ALLOW_UNVERIFIED_WEIGHTS=1 accepts another knowingly.
"""

import codecs
import hashlib
import importlib
import os
import pickle
import sys

import numpy as np
import torch

from .errors import CheckpointError

SAFE_TORCH_LOAD = (2, 6)  # first torch whose weights_only unpickler has no known way to run code
ALLOW_UNVERIFIED_WEIGHTS_ENV = "CM_ALLOW_UNVERIFIED_WEIGHTS"
_HASH_CHUNK = 1 << 22


def _numpy_core(name):
    """numpy's private core module `name` (numpy._core in numpy 2, numpy.core before)."""
    try:
        return importlib.import_module(f"numpy._core.{name}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{name}")


def numpy_array_globals():
    """{(module, name): object} that pickled numpy arrays and dtypes refer to, under numpy 1 and 2 names.

    Protocol <= 4 pickles (Python 2's cPickle too) rebuild arrays with multiarray._reconstruct, ndarray and
    dtype; protocol 5 with numeric._frombuffer; Python 3 pickles at protocol <= 2 spell bytes as
    _codecs.encode(str, "latin1"). None of these can do more than build an array or bytes.
    """
    multiarray, numeric = _numpy_core("multiarray"), _numpy_core("numeric")
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): codecs.encode}
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in `allowed`; any other raises UnpicklingError naming it."""

    def __init__(self, file, allowed, **kwargs):
        super().__init__(file, **kwargs)
        self.allowed = allowed

    def find_class(self, module, name):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refers to {module}.{name}") from None


def restricted_pickle_load(file, allowed, what, encoding="bytes"):
    """pickle.load of `file` building only plain data and the globals in `allowed`.

    :param file: a binary file object.
    :param allowed: {(module, name): object} that the pickle may refer to.
    :param what: the file's name for the message.
    :raises ValueError: one line naming the file and the refused global (nothing of it was run).
    """
    try:
        return RestrictedUnpickler(file, allowed, encoding=encoding).load()
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{what} {e}, which is not data and could run code when loaded; it was refused without running "
            "anything (use only files you trust)"
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ValueError(f"{what} is damaged or not a pickle of data ({type(e).__name__}: {e})") from None


def torch_version_tuple(version=None):
    """(major, minor) of a torch version string (default: the installed torch's)."""
    major, minor = (version or torch.__version__).split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_torch_load_is_safe(path, version=None):
    """Refuse to torch.load `path` on a torch older than 2.6, whose weights_only loading can run code.

    :raises CheckpointError: one line naming the file, the installed torch and the ways out.
    """
    if torch_version_tuple(version) >= SAFE_TORCH_LOAD:
        return
    raise CheckpointError(
        f"refusing to load {path}: torch {version or torch.__version__} can run code hidden in a .pt file even with "
        f"weights_only=True (CVE-2025-32434, fixed in torch {SAFE_TORCH_LOAD[0]}.{SAFE_TORCH_LOAD[1]}); upgrade "
        "torch (pip install 'torch>=2.6'), or load a .safetensors file, which still works"
    )


def file_digest(path, algorithm="sha256"):
    """Hex digest of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unverified_weights_allowed():
    """True when CM_ALLOW_UNVERIFIED_WEIGHTS asks to use weights files whose hash is not the published one."""
    return os.environ.get(ALLOW_UNVERIFIED_WEIGHTS_ENV, "").strip().lower() in ("1", "true", "yes")


def verify_known_weights(path, known, what, allow_unverified=None, flag_hint=""):
    """Check that `path` is one of the published files `known` ({SHA256 prefix: published file name}).

    :param allow_unverified: accept another file with a warning (None: from CM_ALLOW_UNVERIFIED_WEIGHTS).
    :param flag_hint: a command-line flag that also accepts it, named in the message.
    :return: the published name the file matched, or None when another file was accepted.
    :raises ValueError: one line naming the file, its hash and the expected ones.
    """
    actual = file_digest(path)
    for prefix, name in known.items():
        if actual.startswith(prefix):
            return name
    if allow_unverified is None:
        allow_unverified = unverified_weights_allowed()
    expected = ", ".join(f"{name} (SHA256 {prefix}...)" for prefix, name in known.items())
    if allow_unverified:
        print(f"warning: using {path} as {what} although its SHA256 {actual[:16]}... is not that of {expected}",
              file=sys.stderr)
        return None
    how = f"pass {flag_hint} or set" if flag_hint else "set"
    raise ValueError(
        f"{path} is not the published {what}: its SHA256 is {actual[:16]}..., expected {expected}; supply that "
        f"file, or {how} {ALLOW_UNVERIFIED_WEIGHTS_ENV}=1 to use this one knowingly"
    )

