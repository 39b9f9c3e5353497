"""Key/value logger with the reference's API (configure, logkv, logkv_mean, dumpkvs, log, get_dir, ...).

Rank 0 writes a table to stdout, lines to log.txt, rows to progress.csv and, when the tensorboard
package is installed, TensorBoard events. Values given to logkv_mean may be device tensors: they are
summed on the device and read once per dumpkvs, so logging adds no host-device sync to a step.
With several ranks, dumpkvs averages logkv_mean values over all ranks (weighted by their counts).
"""

import contextlib
import csv
import datetime
import json
import os
import sys
import tempfile
import time
import warnings
from abc import ABC, abstractmethod

import torch

from . import dist_util

DEBUG, INFO, WARN, ERROR, DISABLED = 10, 20, 30, 40, 50


class KVWriter(ABC):
    """An output that takes key/value rows (the reference's interface)."""

    @abstractmethod
    def writekvs(self, kvs):
        """Write one row of key/value pairs."""


class SeqWriter(ABC):
    """An output that takes free-text lines (the reference's interface)."""

    @abstractmethod
    def writeseq(self, seq):
        """Write one line: a string, or a sequence of strings joined by spaces."""


class HumanOutput(KVWriter, SeqWriter):
    """A boxed key | value table, written to a stream."""

    def __init__(self, stream):
        self.stream = stream

    def writekvs(self, kvs):
        if not kvs:
            return
        rows = [(k[:40], f"{v:<8.4g}" if isinstance(v, float) else str(v)[:40]) for k, v in sorted(kvs.items())]
        kw = max(len(k) for k, _ in rows)
        vw = max(len(v) for _, v in rows)
        line = "-" * (kw + vw + 7)
        body = [f"| {k:<{kw}} | {v:<{vw}} |" for k, v in rows]
        self.stream.write("\n".join([line, *body, line]) + "\n")
        self.stream.flush()

    def writeseq(self, seq):
        text = seq if isinstance(seq, str) else " ".join(seq)
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        pass


class HumanOutputFormat(HumanOutput):
    """The table to an open stream, or to a file it opens; the file is appended to (the reference truncates
    it), so a resumed run keeps its earlier log."""

    def __init__(self, filename_or_file):
        self.own_file = isinstance(filename_or_file, (str, os.PathLike))
        super().__init__(open(filename_or_file, "a") if self.own_file else filename_or_file)

    def close(self):
        if self.own_file:
            self.stream.close()


class JSONOutputFormat(KVWriter):
    """One JSON object per dumpkvs, one per line."""

    def __init__(self, filename):
        self.file = open(filename, "a")

    def writekvs(self, kvs):
        row = {k: float(v) if hasattr(v, "dtype") else v for k, v in sorted(kvs.items())}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


class CSVOutputFormat(KVWriter):
    """progress.csv; a new key rewrites the header and pads earlier rows. An existing file is continued
    (the reference truncates it), so a resumed run keeps one table."""

    def __init__(self, filename):
        self.path = filename
        self.keys = []
        if os.path.exists(filename) and os.path.getsize(filename) > 0:
            with open(filename, newline="") as f:
                self.keys = next(csv.reader(f), [])

    def writekvs(self, kvs):
        new = [k for k in sorted(kvs) if k not in self.keys]
        if new:
            rows = []
            if os.path.exists(self.path):
                with open(self.path, newline="") as f:
                    rows = list(csv.reader(f))[1:]
            self.keys += new
            with open(self.path, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(self.keys)
                w.writerows(r + [""] * (len(self.keys) - len(r)) for r in rows)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow(["" if kvs.get(k) is None else kvs[k] for k in self.keys])

    def close(self):
        pass


class TensorBoardOutputFormat(KVWriter):
    """TensorBoard events through torch.utils.tensorboard (only when tensorboard is installed)."""

    def __init__(self, dir):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(dir)

    def writekvs(self, kvs):
        step = int(kvs.get("step", 0))
        for k, v in kvs.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


def _to_float(v):
    return float(v.detach().float().cpu()) if torch.is_tensor(v) else float(v)


def make_output_format(format, ev_dir, log_suffix=""):
    """The output named `format` (stdout, log, json, csv, tensorboard) writing into ev_dir."""
    if format == "stdout":
        return HumanOutputFormat(sys.stdout)
    if format == "log":
        return HumanOutputFormat(os.path.join(ev_dir, f"log{log_suffix}.txt"))
    if format == "json":
        return JSONOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.json"))
    if format == "csv":
        return CSVOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.csv"))
    if format == "tensorboard":
        return TensorBoardOutputFormat(os.path.join(ev_dir, f"tb{log_suffix}"))
    raise ValueError(f"unknown log format {format!r}; allowed: stdout, log, json, csv, tensorboard")


class Logger:
    """Key/value rows and log lines to a list of outputs; rank 0 writes.

    :param comm: accepted for the reference's signature and kept as self.comm; means are averaged over the
        torch.distributed group, which holds the same ranks under mpiexec.
    """

    def __init__(self, dir, output_formats, comm=None, level=INFO):
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm
        self.level = level
        self.values = {}
        self.means = {}

    def logkv(self, key, val):
        self.values[key] = val

    def logkv_mean(self, key, val, weight=1.0):
        """Accumulate a weighted mean; val and weight may be (device) tensors."""
        total, count = self.means.get(key, (0.0, 0.0))
        self.means[key] = (total + val * weight, count + weight)

    def getkvs(self):
        """What the next dumpkvs would write from this rank: means so far and the last logkv values."""
        out = {k: _to_float(s) / _to_float(c) for k, (s, c) in self.means.items() if _to_float(c) > 0}
        out.update({k: _to_float(v) if torch.is_tensor(v) else v for k, v in self.values.items()})
        return out

    def dumpkvs(self):
        """Write everything logged since the last dump and clear it; call on every rank at the same step."""
        keys = sorted(self.means)
        sums = {k: (_to_float(self.means[k][0]), _to_float(self.means[k][1])) for k in keys}
        if dist_util.get_world_size() > 1:
            merged = {}
            for part in dist_util.all_gather_object(sums):
                for k, (s, c) in part.items():
                    ms, mc = merged.get(k, (0.0, 0.0))
                    merged[k] = (ms + s, mc + c)
            sums = merged
        out = {k: (s / c) for k, (s, c) in sums.items() if c > 0}
        out.update({k: _to_float(v) if torch.is_tensor(v) else v for k, v in self.values.items()})
        if dist_util.get_rank() == 0:
            for o in self.output_formats:
                if isinstance(o, KVWriter):
                    o.writekvs(out)
        self.values.clear()
        self.means.clear()
        return out

    def log(self, *args, level=INFO):
        if self.level <= level and dist_util.get_rank() == 0:
            text = " ".join(map(str, args))
            for o in self.output_formats:
                if isinstance(o, SeqWriter):
                    o.writeseq(text)

    def set_level(self, level):
        self.level = level

    def set_comm(self, comm):
        self.comm = comm

    def get_dir(self):
        return self.dir

    def close(self):
        for o in self.output_formats:
            o.close()


_current = None


def configure(dir=None, format_strs=None, comm=None, log_suffix=""):
    """Start logging into `dir` (default: OPENAI_LOGDIR, else a fresh temp dir); returns the directory.

    format_strs: any of stdout, log, json, csv, tensorboard (default: OPENAI_LOG_FORMAT or
    stdout,log,csv,tensorboard); tensorboard is left out when the package is missing. log_suffix is added to
    the file names (log{suffix}.txt, progress{suffix}.csv, ...). Only rank 0 writes.
    """
    global _current
    if _current is not None:
        _current.close()
    _current = _new_logger(dir, format_strs, comm, log_suffix)
    log(f"Logging to {_current.dir}")
    return _current.dir


def _new_logger(dir, format_strs, comm, log_suffix):
    dir = dir or os.environ.get("OPENAI_LOGDIR")
    if not dir:
        stamp = datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
        dir = os.path.join(tempfile.gettempdir(), stamp)
    dir = os.path.expanduser(dir)
    if format_strs is None:
        format_strs = os.environ.get("OPENAI_LOG_FORMAT", "stdout,log,csv,tensorboard").split(",")
    outputs = []
    if dist_util.get_rank() == 0:
        os.makedirs(dir, exist_ok=True)
        for fmt in filter(None, format_strs):
            try:
                outputs.append(make_output_format(fmt, dir, log_suffix))
            except ImportError:
                if fmt != "tensorboard":
                    raise
    return Logger(dir, outputs, comm=comm)


def configured_dir():
    """The directory logging was configured into, or None when it never was (nothing is created)."""
    return _current.dir if _current is not None else None


def get_current():
    if _current is None:
        configure(format_strs=["stdout"])
    return _current


def logkv(key, val):
    get_current().logkv(key, val)


def logkv_mean(key, val, weight=1.0):
    get_current().logkv_mean(key, val, weight)


def logkvs(d):
    """logkv for every item of a dict."""
    for k, v in d.items():
        logkv(k, v)


def getkvs():
    return get_current().getkvs()


def dumpkvs():
    return get_current().dumpkvs()


def log(*args, level=INFO):
    get_current().log(*args, level=level)


def debug(*args):
    log(*args, level=DEBUG)


def info(*args):
    log(*args, level=INFO)


def warn(*args):
    log("WARNING:", *args, level=WARN)


def error(*args):
    log("ERROR:", *args, level=ERROR)


def set_level(level):
    get_current().set_level(level)


def set_comm(comm):
    get_current().set_comm(comm)


def get_dir():
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


@contextlib.contextmanager
def profile_kv(scopename):
    """Add the seconds spent in the block to the key wait_<scopename> until the next dumpkvs."""
    start = time.time()
    try:
        yield
    finally:
        values = get_current().values
        key = "wait_" + scopename
        values[key] = values.get(key, 0.0) + time.time() - start


def profile(n):
    """Decorator: time every call of the function under profile_kv(n)."""

    def decorator(func):
        def timed(*args, **kwargs):
            with profile_kv(n):
                return func(*args, **kwargs)

        return timed

    return decorator


def get_rank_without_mpi_import():
    """This process's MPI rank from PMI_RANK or OMPI_COMM_WORLD_RANK (0 without them), without importing mpi4py."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def mpi_weighted_mean(comm, local_name2valcount):
    """{name: sum(value * count) / sum(count)} over the {name: (value, count)} dicts of all ranks of an MPI comm,
    on rank 0 ({} elsewhere); values that are not numbers are left out with a warning."""
    gathered = comm.gather(local_name2valcount)
    if comm.rank != 0:
        return {}
    sums, counts = {}, {}
    for part in gathered:
        for name, (val, count) in part.items():
            try:
                val = float(val)
            except (TypeError, ValueError):
                warnings.warn(f"tried to compute mean on non-float {name}={val}")
                continue
            sums[name] = sums.get(name, 0.0) + val * count
            counts[name] = counts.get(name, 0.0) + count
    return {name: sums[name] / counts[name] for name in sums}


def reset():
    """Close the current logger; the next call logs to stdout again."""
    global _current
    if _current is not None:
        _current.close()
        _current = None


@contextlib.contextmanager
def scoped_configure(dir=None, format_strs=None, comm=None):
    """Log into `dir` inside the block, then go back to the logger that was current."""
    global _current
    previous = _current
    _current = _new_logger(dir, format_strs, comm, "")
    try:
        yield
    finally:
        _current.close()
        _current = previous
