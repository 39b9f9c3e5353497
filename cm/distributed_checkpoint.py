"""Distributed checkpoints (`torch.distributed.checkpoint`, DCP) of a sharded run: shardedNNNNNN/ in the log dir.

Each rank writes its own shards of the model, optimizer, EMAs and target in parallel; the folder counts as
complete only once its `.metadata` file exists, which DCP writes to a temporary name and renames into place after
every rank's data is on disk. A checkpoint step is complete when its folder is and stateNNNNNN.pt (rank 0's run
state, written before the folder) exists. Loading reshards: a folder saved on K ranks loads on any number of
ranks, sharded or not, and into a single process (`read_full`, for conversion to the reference's files).

An asynchronous save (`Checkpointer(asynchronous=True)`) copies the state to CPU memory before it returns, so
training may change the parameters at once, and writes in a background thread on a process group of its own; a
save waits for the one before it, and `wait()` for the last one.
"""

import contextlib
import os
import warnings

import blobfile as bf
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

METADATA = ".metadata"


def sharded_dir_name(step):
    """shardedNNNNNN: the DCP folder of `step`."""
    return f"sharded{step:06d}"


def is_complete(path):
    """True when the DCP folder at `path` has its metadata (every rank's shards were written)."""
    return bf.exists(bf.join(path, METADATA))


def sharded_steps(log_dir):
    """Steps of the complete DCP folders in log_dir whose stateNNNNNN.pt exists, newest first."""
    if not log_dir or not bf.exists(log_dir):
        return []
    names = set(bf.listdir(log_dir))
    steps = []
    for name in names:
        if name.startswith("sharded") and name[7:].isdigit():
            step = int(name[7:])
            if f"state{step:06d}.pt" in names and is_complete(bf.join(log_dir, name)):
                steps.append(step)
    return sorted(steps, reverse=True)


def read_full(path):
    """Every tensor and value of the DCP folder at `path` as whole tensors, in one process (no process group)."""
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete distributed checkpoint (no {METADATA})")
    state = {}
    with _single_process_quietly():
        _load_state_dict(state, storage_reader=dcp.FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    return state


def _distributed():
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_quietly():
    """DCP in one process warns that it assumes one process, which is meant here (also from the thread of an
    asynchronous save, hence a process-wide filter for that one message)."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    yield


def load(state, path):
    """Load the DCP folder at `path` into `state` in place (its tensors, sharded or whole, decide the layout)."""
    with _single_process_quietly():
        dcp.load(state, checkpoint_id=path, no_dist=not _distributed())


class Checkpointer:
    """Writes DCP folders, synchronously or in the background (one at a time).

    :param asynchronous: stage to CPU and write in a background thread on a gloo process group of its own.
    """

    def __init__(self, asynchronous=False):
        self.asynchronous = asynchronous
        self._pending = None  # the future of the save being written
        self._group = None
        if asynchronous and _distributed():
            self._group = dist.new_group(backend="gloo")

    def save(self, state, path):
        """Write `state` to the folder `path` (every rank calls it); waits for the previous save first, so two
        never overlap. Asynchronous: returns once the state is copied to CPU memory."""
        self.wait()
        if "://" not in path:
            os.makedirs(path, exist_ok=True)
        with _single_process_quietly():
            if self.asynchronous:
                self._pending = dcp.async_save(state, checkpoint_id=path, process_group=self._group,
                                               no_dist=not _distributed())
            else:
                dcp.save(state, checkpoint_id=path, no_dist=not _distributed())

    def wait(self):
        """Block until the background save (if any) is on disk; its error, if it failed, is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()


def step_of(path):
    """NNNNNN of .../shardedNNNNNN."""
    name = bf.basename(path.rstrip("/"))
    if not (name.startswith("sharded") and name[7:].isdigit()):
        raise ValueError(f"{path} is not a distributed checkpoint folder (expected a name like sharded000100)")
    return int(name[7:])


def indexed_optimizer_state(state):
    """An optimizer state keyed by parameter name (DCP's) as torch.optim's own state_dict(): parameters numbered
    in the order of the param groups."""
    names = [name for group in state["param_groups"] for name in group["params"]]
    number = {name: i for i, name in enumerate(names)}
    groups, start = [], 0
    for group in state["param_groups"]:
        count = len(group["params"])
        groups.append({**group, "params": list(range(start, start + count))})
        start += count
    return {"state": {number[name]: values for name, values in state["state"].items()}, "param_groups": groups}


def single_files(path, fmt="pt"):
    """{file name: object} of the reference's files of the DCP folder at `path`: modelNNNNNN, ema_RATE_NNNNNN, the
    extra networks (*_modelNNNNNN) and optNNNNNN.pt (torch.optim's layout), read in one process."""
    step = step_of(path)
    state = read_full(path)
    model = state.pop("model")
    files = {f"opt{step:06d}.pt": indexed_optimizer_state(state.pop("optimizer"))}
    for key, values in state.items():
        if key.startswith("ema_"):
            files[f"{key}_{step:06d}.{fmt}"] = {**model, **values}
        else:
            files[f"{key}{step:06d}.{fmt if key.endswith('_model') else 'pt'}"] = values
    files[f"model{step:06d}.{fmt}"] = model
    return files
