"""Checkpoint retention (--keep_checkpoints K): after each complete save, rank 0 deletes the files of older steps
so that the newest K complete checkpoints stay (K >= 2: should the newest be damaged, one more is left to resume
from).

The choice works on step numbers alone (`steps_to_delete`), so any checkpoint layout can use it: it needs the steps
present (any file), the steps complete (resumable), the steps to protect, and a way to delete one step.
`prune_checkpoint_files` applies it to the reference's file names (modelNNNNNN.pt, ema_RATE_NNNNNN.pt, ...) and to
distributed checkpoints (shardedNNNNNN/ folders, complete with their .metadata and stateNNNNNN.pt).
Temporary files (NNNNNN.pt.tmpPID) are not checkpoint files here; the next save removes stale ones.
"""

import os
import re
import shutil

import blobfile as bf

from . import logger
from .distributed_checkpoint import sharded_steps

MIN_KEPT = 2
_STEP_SUFFIX = re.compile(r"^(\d{6,})\.(pt|safetensors)$")


def check_keep(keep):
    """Raise a ValueError unless keep (--keep_checkpoints) is 0 (keep all) or at least MIN_KEPT."""
    if keep != 0 and not (isinstance(keep, int) and keep >= MIN_KEPT):
        raise ValueError(f"--keep_checkpoints must be 0 (keep every checkpoint) or at least {MIN_KEPT}, got {keep!r}: "
                         "the newest checkpoint could be damaged, so one more is always kept")


def steps_to_delete(present, complete, keep, protected=()):
    """The steps whose files go, oldest first: every step older than the keep-th newest complete one, except the
    protected ones. Steps newer than that stay, complete or not (a newer incomplete step is being written).

    :param present: steps with at least one file.
    :param complete: steps whose checkpoint is complete (every file present).
    :param keep: K, the complete checkpoints to keep; 0 keeps all; below MIN_KEPT counts as MIN_KEPT.
    :param protected: steps never deleted (the step this run resumed from).
    """
    if keep <= 0:
        return []
    kept = sorted(set(complete), reverse=True)[: max(keep, MIN_KEPT)]
    if len(kept) < max(keep, MIN_KEPT):
        return []
    oldest_kept, protected = kept[-1], set(protected)
    return sorted(s for s in set(present) | set(complete) if s < oldest_kept and s not in protected)


def files_by_step(names, prefixes):
    """{step: [names]} of the checkpoint files among names: a known prefix, then the step, then .pt / .safetensors."""
    steps = {}
    for name in names:
        for prefix in prefixes:
            match = _STEP_SUFFIX.match(name[len(prefix):]) if name.startswith(prefix) else None
            if match:
                steps.setdefault(int(match.group(1)), []).append(name)
                break
    return steps


def prefixes_of(file_names):
    """The file-name prefixes of a checkpoint ("model", "opt", "ema_0.999_", ...), from file_names(step, fmt)."""
    return sorted({name.split("000000.")[0] for fmt in ("pt", "safetensors") for name in file_names(0, fmt)},
                  key=len, reverse=True)


def complete_steps(by_step, file_names):
    """The steps of by_step whose files include a complete checkpoint in either format."""
    return [step for step, names in by_step.items()
            if any(set(file_names(step, fmt)) <= set(names) for fmt in ("pt", "safetensors"))]


def _remove(path):
    if "://" in path:
        bf.remove(path)
    else:
        os.remove(path)


def prune_checkpoint_files(directory, keep, file_names, protected=(), sharded=False):
    """Delete the files of the checkpoints older than the newest `keep` complete ones in directory (rank 0's job);
    returns the steps deleted. A file that cannot be deleted is a warning in the log, not an error.

    :param file_names: (step, fmt) -> the file names of a complete checkpoint (cm.checkpoint_io.checkpoint_files).
    :param protected: steps never deleted.
    :param sharded: the run writes distributed checkpoints (shardedNNNNNN/ with stateNNNNNN.pt; the single files
        beside them are exports): their completeness decides, and old folders go with their step's files.
    """
    if keep <= 0 or not bf.exists(directory):
        return []
    names = list(bf.listdir(directory))
    by_step = files_by_step(names, prefixes_of(file_names))
    folders = {int(n[7:]): n for n in names if n.startswith("sharded") and n[7:].isdigit()} if sharded else {}
    complete = sharded_steps(directory) if sharded else complete_steps(by_step, file_names)
    doomed = steps_to_delete(set(by_step) | set(folders), complete, keep, protected)
    first = "state" if sharded else "model"  # the file whose loss makes the step incomplete goes first
    for step in doomed:
        for name in sorted(by_step.get(step, ()), key=lambda n: not n.startswith(first)):
            try:
                _remove(bf.join(directory, name))
            except OSError as e:
                logger.log(f"warning: could not delete old checkpoint file {name} ({e.strerror or e})")
        if step in folders:
            _remove_folder(bf.join(directory, folders[step]))
    if doomed:
        steps = ", ".join(str(s) for s in doomed)
        logger.log(f"deleted the checkpoints of step {steps} (--keep_checkpoints {keep} keeps the newest {keep})")
    return doomed


def _remove_folder(path):
    try:
        if "://" in path:
            bf.rmtree(path)
        else:
            shutil.rmtree(path)
    except OSError as e:
        logger.log(f"warning: could not delete old checkpoint folder {path} ({e.strerror or e})")
