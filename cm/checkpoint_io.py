"""Checkpoint files in two formats, chosen by the file name's extension.

* ``.safetensors``: a flat {name: tensor} dict (model, EMA and target weights); no pickle, so loading
  cannot run code, and other tools (diffusers, ComfyUI, the Hub) read it directly.
* anything else (the reference's ``.pt``): ``torch.save``; read back with ``weights_only=True``.

Writes are atomic (a temporary file in the same folder, flushed, then renamed), so a reader never sees
half a file. Paths with a scheme (``gs://``, ``az://``) go through blobfile, whose stores publish an
object only once it is complete.
"""

import io
import os

import blobfile as bf
import torch

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


def write_atomic(data, path):
    """Write bytes to `path` through a temporary file and a rename (blobfile for remote paths)."""
    path = str(path)
    if "://" in path:
        with bf.BlobFile(path, "wb") as f:
            f.write(data)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    try:
        with bf.BlobFile(str(path), "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None


def load_checkpoint_bytes(data, path, map_location=None):
    """Decode checkpoint bytes by `path`'s extension: safetensors, or torch.load with weights_only=True
    (through cm.dist_util, whose errors name a truncated, corrupt or code-carrying file in one line)."""
    if is_safetensors(path):
        return load_safetensors_bytes(data, map_location)
    from .dist_util import torch_load_bytes

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
