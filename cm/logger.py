"""Key/value logger with the reference's API (configure, logkv, logkv_mean, dumpkvs, log, get_dir).

Rank 0 writes a table to stdout, lines to log.txt, rows to progress.csv and, when the tensorboard
package is installed, TensorBoard events. Values given to logkv_mean may be device tensors: they are
summed on the device and read once per dumpkvs, so logging adds no host-device sync to a step.
With several ranks, dumpkvs averages logkv_mean values over all ranks (weighted by their counts).
"""

import csv
import datetime
import os
import sys
import tempfile

import torch

from . import dist_util

DEBUG, INFO, WARN, ERROR, DISABLED = 10, 20, 30, 40, 50


class HumanOutput:
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

    def writeseq(self, text):
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self):
        pass


class TextOutput(HumanOutput):
    """HumanOutput into a file it owns."""

    def __init__(self, path):
        super().__init__(open(path, "a"))

    def close(self):
        self.stream.close()


class CSVOutput:
    """progress.csv; a new key rewrites the header and pads earlier rows."""

    def __init__(self, path):
        self.path = path
        self.keys = []
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, newline="") as f:
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


class TensorBoardOutput:
    """TensorBoard events through torch.utils.tensorboard (only when tensorboard is installed)."""

    def __init__(self, logdir):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(logdir)

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


class Logger:
    def __init__(self, dir, outputs, level=INFO):
        self.dir = dir
        self.outputs = outputs
        self.level = level
        self.values = {}
        self.means = {}

    def logkv(self, key, value):
        self.values[key] = value

    def logkv_mean(self, key, value, weight=1.0):
        """Accumulate a weighted mean; value and weight may be (device) tensors."""
        total, count = self.means.get(key, (0.0, 0.0))
        self.means[key] = (total + value * weight, count + weight)

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
            for o in self.outputs:
                o.writekvs(out)
        self.values.clear()
        self.means.clear()
        return out

    def log(self, *args, level=INFO):
        if self.level <= level and dist_util.get_rank() == 0:
            text = " ".join(map(str, args))
            for o in self.outputs:
                if hasattr(o, "writeseq"):
                    o.writeseq(text)

    def close(self):
        for o in self.outputs:
            o.close()


_current = None


def configure(dir=None, format_strs=None):
    """Start logging into `dir` (default: OPENAI_LOGDIR, else a fresh temp dir); returns the directory.

    format_strs: any of stdout, log, csv, tensorboard (default: OPENAI_LOG_FORMAT or stdout,log,csv,tensorboard).
    """
    global _current
    if _current is not None:
        _current.close()
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
        for fmt in format_strs:
            if fmt == "stdout":
                outputs.append(HumanOutput(sys.stdout))
            elif fmt == "log":
                outputs.append(TextOutput(os.path.join(dir, "log.txt")))
            elif fmt == "csv":
                outputs.append(CSVOutput(os.path.join(dir, "progress.csv")))
            elif fmt == "tensorboard":
                try:
                    outputs.append(TensorBoardOutput(os.path.join(dir, "tb")))
                except ImportError:
                    pass
            elif fmt:
                raise ValueError(f"unknown log format {fmt!r}; allowed: stdout, log, csv, tensorboard")
    _current = Logger(dir, outputs)
    log(f"Logging to {dir}")
    return dir


def get_current():
    if _current is None:
        configure(format_strs=["stdout"])
    return _current


def logkv(key, value):
    get_current().logkv(key, value)


def logkv_mean(key, value, weight=1.0):
    get_current().logkv_mean(key, value, weight)


def dumpkvs():
    return get_current().dumpkvs()


def log(*args, level=INFO):
    get_current().log(*args, level=level)


def info(*args):
    log(*args, level=INFO)


def warn(*args):
    log("WARNING:", *args, level=WARN)


def error(*args):
    log("ERROR:", *args, level=ERROR)


def set_level(level):
    get_current().level = level


def get_dir():
    return get_current().dir
