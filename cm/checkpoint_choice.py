"""One resume decision for every rank: rank 0 chooses the checkpoint, every rank loads that one, and a rank that
cannot read one of its files stops the whole job with one line naming the file and the rank.

Ranks on several nodes can see a shared folder differently (a network file system's cached listing, a node whose
mount is missing or stale). If each rank chose for itself, the ranks could resume from different steps, or probe
different files and so call different collectives and hang.
"""

import blobfile as bf

from . import dist_util
from .errors import CheckpointError

SAME_VIEW_ADVICE = "every rank must see the log dir alike (the same shared file system, mounted on every node)"


def chosen_on_rank0(choose):
    """choose() computed on rank 0 alone and broadcast: the same decision on every rank."""
    return dist_util.broadcast_object(choose() if dist_util.get_rank() == 0 else None)


def read_problem(path):
    """Why this process cannot read `path` (one phrase), or None when its first byte can be read."""
    try:
        if "://" in str(path):
            with bf.BlobFile(str(path), "rb") as f:
                f.read(1)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except FileNotFoundError:
        return "it does not exist there"
    except OSError as e:
        return e.strerror or str(e)
    return None


def first_disagreement(paths, problems, required):
    """The error line for the first file some rank cannot read (None when all is well).

    :param paths: the files, in order.
    :param problems: per rank, per file, read_problem's answer (None: readable).
    :param required: per file, whether every rank must read it; an optional file must be readable on every rank
        or on none (the ranks then agree on whether to load it).
    """
    for i, (path, must) in enumerate(zip(paths, required)):
        for rank, problem in enumerate(row[i] for row in problems):
            if problem is not None and (must or problems[0][i] is None):
                what = "a file of the checkpoint that rank 0 chose to resume from" if must else (
                    "which rank 0 reads to resume")
                return f"rank {rank} cannot read {path} ({problem}), {what}; {SAME_VIEW_ADVICE}"
            if problem is None and not must and problems[0][i] is not None:
                return f"rank {rank} sees {path}, which rank 0 cannot read ({problems[0][i]}); {SAME_VIEW_ADVICE}"
    return None


def check_every_rank_can_read(required, optional=()):
    """Every rank tries to read the first byte of each file; when a rank cannot read a required file (or the ranks
    disagree on an optional one), every rank raises the same CheckpointError naming the rank and the file."""
    paths = list(required) + list(optional)
    mine = [read_problem(p) for p in paths]
    problems = dist_util.all_gather_object(mine)
    line = first_disagreement(paths, problems, [True] * len(required) + [False] * len(optional))
    if line is not None:
        raise CheckpointError(line)


def resume_files(path, found, names):
    """(required, optional) files of a resume from `path`: a checkpoint found in the log dir needs all its files;
    an explicit --resume_checkpoint needs its model file, the others (EMA, optimizer, state) are used when present.

    :param names: the file names of a complete checkpoint at path's step.
    """
    directory = bf.dirname(path)
    companions = [bf.join(directory, n) for n in names if bf.join(directory, n) != path]
    return ([path] + companions, []) if found else ([path], companions)
