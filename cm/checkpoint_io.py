"""Checkpoint files in two formats, chosen by the file name's extension.

* ``.safetensors``: a flat {name: tensor} dict (model, EMA and target weights); no pickle, so loading
  cannot run code, and other tools (diffusers, ComfyUI, the Hub) read it directly.
* anything else (the reference's ``.pt``): ``torch.save``; read back with ``weights_only=True``.

Writes are atomic (a temporary file in the same folder, fsynced, then renamed, then the folder fsynced), so a
reader never sees half a file and a written file survives a power cut; every output of the library (samples,
grids, statistics, configurations, exports) goes through `write_through_temporary`. Paths with a scheme (``gs://``, ``az://``) go through blobfile, whose stores publish an
object only once it is complete.

A training checkpoint at step N is a set of files with the reference's names (modelNNNNNN.pt,
ema_RATE_NNNNNN.pt, optNNNNNN.pt, target_modelNNNNNN.pt, ...) plus stateNNNNNN.pt; `checkpoint_files` lists
them, the model file last, and `find_resume_checkpoint` finds the newest complete set.
"""

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import zipfile

import blobfile as bf
import torch

from .distributed_checkpoint import sharded_dir_name, sharded_steps
from .errors import CheckpointError, first_line
from .safe_load import check_torch_load_is_safe

SAFETENSORS_SUFFIX = ".safetensors"


def is_safetensors(path):
    """True when `path` names a safetensors file (by its extension)."""
    return str(path).lower().endswith(SAFETENSORS_SUFFIX)


def _safetensors_torch():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError('reading or writing .safetensors files needs safetensors: pip install safetensors') from None
    return safetensors.torch


def flat_tensors(state_dict):
    """The {name: tensor} dict safetensors stores: contiguous CPU tensors, shared storage copied apart.

    :param state_dict: mapping of str to torch.Tensor (a model's state_dict()).
    """
    out, seen = {}, set()
    for name, value in state_dict.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"a .safetensors file holds only {{name: tensor}}; entry {name!r} is a {type(value).__name__} "
                "(save optimizer and training state as .pt)"
            )
        tensor = value.detach().cpu().contiguous()
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()  # safetensors refuses tensors that share memory
        if tensor.numel():
            seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def checkpoint_bytes(state_dict, path, metadata=None):
    """The bytes of `state_dict` in the format that `path`'s extension names.

    :param metadata: {str: str} stored in the safetensors header (ignored for .pt).
    """
    if is_safetensors(path):
        return _safetensors_torch().save(flat_tensors(state_dict), metadata=metadata)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


BLOB_RETRY_LIMIT = int(os.environ.get("CM_BLOB_RETRIES", "8"))  # blobfile's default retries forever
_blobfile_configured = False


def configure_blobfile():
    """Bound blobfile's retries of a remote read or write (CM_BLOB_RETRIES, default 8; blobfile's own default
    retries forever, so a lost bucket would hang a checkpoint write); set once per process."""
    global _blobfile_configured
    if not _blobfile_configured:
        bf.configure(retry_limit=BLOB_RETRY_LIMIT, connect_timeout=30, read_timeout=120)
        _blobfile_configured = True


def temporary_name(path):
    """The temporary file a write of `path` goes through: path.tmpPID, in the same folder (so the rename is atomic)."""
    return f"{path}.tmp{os.getpid()}"


def fsync_directory(directory):
    """Flush a folder's entries (a rename into it) to disk; file systems that cannot sync a folder are skipped."""
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_through_temporary(path, write):
    """Call write(file) on a temporary file next to `path`, fsync it, rename it into place and fsync the folder,
    so the file counts as written only once it survives a power cut (remote paths go through blobfile, whose
    stores publish an object only once it is complete). A failure leaves the previous `path` as it was and no
    temporary file."""
    path = str(path)
    if "://" in path:
        configure_blobfile()
        with bf.BlobFile(path, "wb") as f:
            write(f)
        return
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(os.path.dirname(path))
    except Exception as e:
        if not isinstance(e, OSError) and isinstance(e.__context__, OSError):
            raise e.__context__ from None  # torch.save reports a full disk as a RuntimeError raised while closing
        raise
    finally:
        with contextlib.suppress(OSError):
            if os.path.exists(tmp):
                os.remove(tmp)


def write_atomic(data, path):
    """Write bytes (or str, as UTF-8) to `path` through a temporary file and a rename (blobfile for remote paths)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    write_through_temporary(path, lambda f: f.write(data))


def write_json_atomic(obj, path, indent=2):
    """`obj` as indented JSON (with a final newline), written atomically."""
    write_atomic(json.dumps(obj, indent=indent) + "\n", path)


def write_directory_atomically(path, write):
    """Call write(folder) on a new temporary folder next to `path`, then put it in `path`'s place (an earlier
    folder there is replaced only once the new one is complete). A failure leaves `path` as it was and no
    temporary folder."""
    path = os.path.abspath(str(path)).rstrip(os.sep)
    tmp, old = temporary_name(path), f"{path}.old{os.getpid()}"
    try:
        os.makedirs(tmp)
        write(tmp)
        replaced = os.path.isdir(path)
        if replaced:
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if replaced:
                os.replace(old, path)
            raise
        fsync_directory(os.path.dirname(path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(state_dict, path, metadata=None):
    """Write `state_dict` atomically as .safetensors or (any other extension) torch.save.

    :param state_dict: {name: tensor} for .safetensors; any torch.save-able object otherwise.
    :param path: destination file; its extension picks the format.
    :param metadata: {str: str} for the safetensors header, e.g. the run's flags as JSON.
    """
    write_atomic(checkpoint_bytes(state_dict, path, metadata), path)


def _move(state_dict, map_location):
    if map_location is None:
        return state_dict
    if not isinstance(map_location, (str, torch.device)):
        raise ValueError(f"map_location for a .safetensors file must be a device name, got {map_location!r}")
    return {name: tensor.to(map_location) for name, tensor in state_dict.items()}


def load_safetensors_bytes(data, map_location=None):
    """{name: tensor} from the bytes of a .safetensors file, moved to `map_location` (default CPU)."""
    try:
        state_dict = _safetensors_torch().load(bytes(data))
    except Exception as e:  # noqa: BLE001 - the library raises its own error types for bad headers
        raise ValueError(f"not a valid .safetensors file ({type(e).__name__}: {e})") from None
    return _move(state_dict, map_location)


def read_bytes(path):
    """The whole file at `path` (local or blobfile), or FileNotFoundError naming it."""
    if "://" in str(path):
        configure_blobfile()
    try:
        with bf.BlobFile(str(path), "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None


def torch_load_bytes(data, path, **kwargs):
    """torch.load of a checkpoint's bytes; an empty, truncated, corrupt or code-carrying file is one line naming it,
    and on a torch older than 2.6 every .pt file is refused (cm.safe_load.check_torch_load_is_safe)."""
    check_torch_load_is_safe(path)
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was cut off before anything was written")
    if data[:4] == b"PK\x03\x04" and not zipfile.is_zipfile(io.BytesIO(data)):
        raise CheckpointError(f"checkpoint {path} is truncated: its {len(data):,} bytes lack the end of the file")
    try:
        return torch.load(io.BytesIO(data), **kwargs)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(
                f"checkpoint {path} refers to {found.group(1)}, which is not tensor data and could run code when "
                "loaded; it was refused without running anything (load only files you trust)"
            ) from None
        detail = first_line(str(e).split("WeightsUnpickler error:")[-1])
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint ({detail})") from None
    except Exception as e:  # noqa: BLE001 - the unpickler fails in many ways on a damaged file
        if isinstance(e, RuntimeError) and ("device" in str(e) or "CUDA" in str(e)):
            raise  # a map_location problem, not a damaged file
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {first_line(e)})") from None


def load_checkpoint_bytes(data, path, map_location=None):
    """Decode checkpoint bytes by `path`'s extension: safetensors, or torch.load with weights_only=True (whose
    errors name a truncated, corrupt or code-carrying file in one line)."""
    if is_safetensors(path):
        return load_safetensors_bytes(data, map_location)
    return torch_load_bytes(data, path, map_location=map_location, weights_only=True)


def load_checkpoint(path, map_location=None):
    """Read a .safetensors or .pt checkpoint (chosen by extension) onto `map_location`.

    :param path: local path or blobfile URL.
    :param map_location: device for the tensors (default: CPU for safetensors, as saved for .pt).
    """
    return load_checkpoint_bytes(read_bytes(path), path, map_location)


def convert_checkpoint(src, dst, metadata=None):
    """Read `src` and write it to `dst`, each in the format of its own extension; returns the tensor count."""
    state_dict = load_checkpoint(src, map_location="cpu")
    if isinstance(state_dict, dict) and "state_dict" in state_dict and is_safetensors(dst):
        state_dict = state_dict["state_dict"]
    save_checkpoint(state_dict, dst, metadata)
    return len(state_dict)


def describe_state_dict_mismatch(model, state_dict, limit=3):
    """One line naming missing keys, unexpected keys and shape mismatches ('' when the state dict fits)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]

    def part(name, items):
        more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
        return f"{name}: {', '.join(items[:limit])}{more}" if items else ""

    return "; ".join(p for p in (part("missing keys", missing), part("unexpected keys", unexpected), part("shape mismatches", shapes)) if p)


def load_fitting_state_dict(model, state_dict, path, what="checkpoint"):
    """model.load_state_dict(state_dict, strict=True), or one line naming the keys and shapes that differ."""
    problem = describe_state_dict_mismatch(model, state_dict)
    if problem:
        raise ValueError(f"{what} {path} does not fit the model flags: {problem}")
    model.load_state_dict(state_dict, strict=True)
    return model


# ----- the files of a training checkpoint (the reference's names) -----------------------------------------------

CHECKPOINT_FORMATS = ("pt", "safetensors")  # of the network files (model, EMAs, *_model); opt and state are .pt
_MODEL_FILE = re.compile(r"^model(\d+)\.(pt|safetensors)$")
_TEMPORARY_FILE = re.compile(r"\d{6}\.(pt|safetensors)\.tmp\d+$")


def parse_resume_step_from_filename(filename):
    """The step NNNNNN of path/to/modelNNNNNN.pt (or .safetensors; 0 when the name has none)."""
    match = re.search(r"model(\d+)\.(pt|safetensors)$", bf.basename(filename))
    return int(match.group(1)) if match else 0


def checkpoint_format_of(path):
    """"safetensors" for a .safetensors file, else "pt" (the reference's files, and any other name)."""
    return "safetensors" if is_safetensors(path) else "pt"


def network_file(prefix, step, fmt="pt"):
    """The file name of a network's weights at `step`: modelNNNNNN.pt, ema_RATE_NNNNNN.safetensors, ..."""
    return f"{prefix}{step:06d}.{fmt}"


def checkpoint_files(step, ema_rates, extra_names=(), fmt="pt"):
    """File names of a complete checkpoint at `step`, the model file last. Networks (the model, its EMAs and
    extras named *_model) are in `fmt`; the optimizer, the run state and other extras are always .pt."""
    names = [network_file(f"ema_{rate}_", step, fmt) for rate in ema_rates]
    names += [f"opt{step:06d}.pt", f"state{step:06d}.pt"]
    names += [network_file(name, step, fmt if name.endswith("_model") else "pt") for name in extra_names]
    return names + [network_file("model", step, fmt)]


def checkpoint_steps(log_dir):
    """(step, format) of the modelNNNNNN.pt / .safetensors files in log_dir, newest first."""
    if not log_dir or not bf.exists(log_dir):
        return []
    return sorted(((int(m.group(1)), m.group(2)) for m in map(_MODEL_FILE.match, bf.listdir(log_dir)) if m), reverse=True)


def find_resume_checkpoint(log_dir, ema_rates=(), extra_names=()):
    """The newest modelNNNNNN.pt (or .safetensors) in log_dir whose companion files all exist, else None."""
    steps = checkpoint_steps(log_dir)
    present = set(bf.listdir(log_dir)) if steps else set()
    for step, fmt in steps:
        if all(name in present for name in checkpoint_files(step, ema_rates, extra_names, fmt)):
            return bf.join(log_dir, network_file("model", step, fmt))
    return None


def resume_point(log_dir, ema_rates=(), extra_names=()):
    """(step, path) of the newest complete checkpoint in log_dir, else None: the modelNNNNNN file of a checkpoint of
    single files, or the shardedNNNNNN folder of a distributed one (cm.distributed_checkpoint; at equal steps the
    folder, which holds the optimizer too)."""
    found = find_resume_checkpoint(log_dir, ema_rates, extra_names)
    file_step = parse_resume_step_from_filename(found) if found else -1
    sharded = sharded_steps(log_dir)
    if sharded and sharded[0] >= file_step:
        return sharded[0], bf.join(log_dir, sharded_dir_name(sharded[0]))
    return (file_step, found) if found else None


def find_ema_checkpoint(main_checkpoint, step, rate):
    """ema_RATE_NNNNNN.pt (or .safetensors, as main_checkpoint) next to main_checkpoint, if it exists."""
    if not main_checkpoint:
        return None
    name = network_file(f"ema_{rate}_", step, checkpoint_format_of(main_checkpoint))
    path = bf.join(bf.dirname(main_checkpoint), name)
    return path if bf.exists(path) else None


def atomic_save(obj, path):
    """torch.save (or, for a .safetensors name, safetensors) through a temporary file and a rename: readers never
    see a partial file, and a failed write (disk full) leaves no temporary file behind."""
    if is_safetensors(path):
        save_checkpoint(obj, path)
        return
    write_through_temporary(path, lambda f: torch.save(obj, f))


def remove_stale_temporaries(directory):
    """Delete temporary checkpoint files (NNNNNN.pt.tmpPID) that a killed process left in directory."""
    if "://" in directory or not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if _TEMPORARY_FILE.search(name):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(directory, name))


def remove_files(paths):
    """Delete the files that exist among paths (local or blobfile)."""
    for path in paths:
        with contextlib.suppress(OSError):
            if bf.exists(path):
                bf.remove(path)
