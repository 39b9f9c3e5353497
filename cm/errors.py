"""How a script ends on an exception: one line on stderr, plus a file with the traceback when it was unexpected.

* Input errors (ValueError, FileNotFoundError, FloatingPointError, ImportError and OneLineError) are the
  user's to fix, and their message (when it is one line) says how: that line, nothing else.
* Anything else is unexpected (out of memory, a device fault, a bug): one line naming the exception and a
  file that holds the full traceback. The file is written every time, into the run's log dir when one is
  configured, else into the temp dir.
* With several ranks the process ends at once, skipping MPI_Finalize (which waits for every rank), so the
  other ranks' collectives fail within seconds instead of after the distributed time-out. A rank that only
  lost contact with another (PeerFailure) leaves the explaining to that rank: it prints only on rank 0.
"""

import datetime
import os
import re
import sys
import tempfile
import time
import traceback

import torch.distributed as dist


class OneLineError(Exception):
    """An error whose message says what happened and what to do; scripts show it as one line."""


class CheckpointError(OneLineError, ValueError):
    """A checkpoint file that cannot be loaded: empty, truncated, corrupt, or holding more than tensors."""


class CheckpointWriteError(OneLineError, OSError):
    """A checkpoint that could not be written (disk full, quota, permissions); the previous one is intact."""


class PeerFailure(OneLineError, RuntimeError):
    """Another rank failed or vanished; its own message says why."""


class SetupError(OneLineError, RuntimeError):
    """This environment cannot run the command: a missing library, an unreachable rendezvous address."""


INPUT_ERRORS = (ValueError, FileNotFoundError, FloatingPointError, ImportError, OneLineError)
# what gloo and the c10d store say when the process at the other end of a collective is gone (or silent)
PEER_LOSS_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out waiting")
PEER_GRACE_SECONDS = 1.0  # lets the rank with the real error print it before a launcher ends the job


def check_choice(name, value, allowed):
    """Raise a ValueError naming the allowed values when value is not one of them."""
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def lines_of(exc):
    """The exception's message as a list of its non-empty lines."""
    return [line.strip() for line in str(exc).splitlines() if line.strip()]


def first_line(exc):
    """The first non-blank line of an exception's (or any object's) text, else the exception's type name."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def is_input_error(exc):
    """True for errors the user fixes by changing the input; their message is one line of our own."""
    return isinstance(exc, INPUT_ERRORS) and len(lines_of(exc)) <= 1


def is_peer_loss(exc):
    """True when exc says that another rank of a distributed run is gone (or failed a collective first)."""
    if isinstance(exc, PeerFailure):
        return True
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return isinstance(exc, getattr(dist, "DistNetworkError", ())) or any(m in str(exc) for m in PEER_LOSS_MESSAGES)


def short_peer_message(line):
    """A gloo / c10d error line without its source location and advice: 'Read error [addr]:port: ... by peer'."""
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", line)
    return line.split(". ")[0].rstrip(".")


def traceback_path(log_dir, rank):
    """Where the traceback of an unexpected error goes: log_dir/traceback_rankR.txt, else a new temp file."""
    if log_dir and "://" not in str(log_dir) and os.path.isdir(log_dir):
        return os.path.join(log_dir, f"traceback_rank{rank}.txt")
    fd, path = tempfile.mkstemp(prefix=f"cm-traceback-rank{rank}-", suffix=".txt")
    os.close(fd)
    return path


def write_traceback(exc, path):
    """Write the command line, the time and the full traceback of exc to path; returns path."""
    with open(path, "w") as f:
        f.write(f"command: {' '.join(sys.argv)}\n")
        f.write(f"time: {datetime.datetime.now().isoformat(timespec='seconds')}  pid: {os.getpid()}\n\n")
        f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    return path


def one_line_report(exc, log_dir=None, rank=0):
    """The 'error: ...' line for exc; for an unexpected error also writes the traceback file it names."""
    first = lines_of(exc)[0] if lines_of(exc) else type(exc).__name__
    if is_input_error(exc):
        return f"error: {first}"
    if is_peer_loss(exc):
        return (
            f"error: rank {rank} lost contact with another rank ({short_peer_message(first)}); see that rank's own "
            "error, or whether it was killed (e.g. out of memory)"
        )
    try:
        where = f"full traceback in {write_traceback(exc, traceback_path(log_dir, rank))}"
    except OSError as e:  # the log dir may be the very thing that failed
        where = f"the traceback could not be written: {e}"
    return f"error: {type(exc).__name__}: {first} ({where})"


def close_progress_bars():
    """Close the tqdm bars an exception left open (each ends its line)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def exit_on_error(exc, log_dir=None):
    """Print exc's one-line report to stderr and end the process with status 1 (at once with several ranks).

    :param log_dir: where the traceback file of an unexpected error goes (None: the temp dir).
    """
    initialized = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if initialized else (0, 1)
    peer = is_peer_loss(exc)
    line = one_line_report(exc, log_dir, rank)
    close_progress_bars()  # so the line starts a line of its own
    if world == 1:
        print(line, file=sys.stderr)
        raise SystemExit(1) from None
    if rank == 0 or not peer:
        print(f"[rank {rank}] {line}", file=sys.stderr)
    if peer and rank != 0:
        time.sleep(PEER_GRACE_SECONDS)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
