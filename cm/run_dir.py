"""A log dir belongs to one run: before a run writes anything there, what the directory holds is checked.

* No checkpoints: a new run.
* Checkpoints with the complete set of files this run writes: a resume. The resolved configuration stored
  in the newest one is compared with the run's; settings that change what the run computes must agree,
  unless --allow_config_change is given (then the differences are logged and the new values used). A larger
  --total_training_steps alone is a longer run when the steps already trained keep their schedule values.
  Another number of ranks (and so another batch or micro-batch per rank) with the same global batch is the same
  run: the log and the configuration's run.layout_changes record it in one line.
* Checkpoint files, but no complete set of this run's files (e.g. another --ema_rate): another run's. The run
  stops with one line rather than start at step 0 and overwrite them; the line names every setting of the
  stored config.json that differs (`key: old -> new`).

Before any of this, rank 0 takes an exclusive lock on the log dir (`lock_log_dir`: fcntl.flock on LOCK_FILE,
held until the process ends), so two processes never write one log dir (a requeued job that overlaps the old
one stops at once with one line naming the holder's host, pid and start time). flock is advisory and local:
on NFS it works only where the server supports locks (NFSv4, or v3 with lockd), so two hosts sharing an older
NFS mount are not kept apart.
"""

import datetime
import errno
import fcntl
import json
import os
import socket

import blobfile as bf
import numpy as np

from . import dist_util, logger

from .checkpoint_io import (
    checkpoint_files,
    checkpoint_steps,
    resume_point,
    write_atomic,
)
from .checkpoint_choice import chosen_on_rank0
from .config import config_to_json
from .errors import OneLineError
from .train_util import parse_ema_rates
from .training_modes import FLAGS, get_training_mode

# what runs stored before a setting existed did (their per-rank RNG streams), compared as their value at resume
BEFORE_IT_EXISTED = {"run.sample_indexed_rng": False, "latent.latent_norm": "scale", "latent.latent_mean": "",
                     "latent.latent_std": "", "optimizer.adam_betas": "0.9,0.999", "teacher.guidance_scale": 1.0,
                     "network.dit_final_conv": False, "teacher.network.dit_final_conv": False,
                     "network.dit_mlp_ratio": 4.0, "teacher.network.dit_mlp_ratio": 4.0}
LAYOUT_RECORD = "layout_changes"  # run.layout_changes: one line per resume on another number of ranks
# decided values that follow from flags which do not change what a run computes
OPERATIONAL_KEYS = frozenset({"loop.time_limit", f"run.{LAYOUT_RECORD}"})
# how the global batch is split over ranks and micro-batches: free to change while the global batch stays
LAYOUT_KEYS = frozenset({"run.world_size", "run.batch_size", "run.global_batch_size", "loop.batch_size",
                         "loop.microbatch", "data.batch_size"})
# settings a resume may change to run longer, when the steps already trained keep their schedule values
RUN_LENGTH_KEYS = frozenset({"loop.total_training_steps", "schedule.total_steps"})
SCHEDULE_CHECKS = 2000  # steps at which an old and a new schedule are compared
LOCK_FILE = "run.lock"  # in the log dir: flock'ed by the run that owns it, holding its host, pid and start time
CONFIG_FILE = "config.json"  # the resolved configuration of the run that last started in the log dir
_held_locks = {}  # lock file path -> the open file that holds this process's lock on it


class LogDirInUse(OneLineError, RuntimeError):
    """Another live process holds the log dir's lock."""


def _still_held(handle, path):
    """Whether `handle` is an open lock on the file now at `path` (not one moved or deleted since)."""
    try:
        return not handle.closed and os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except OSError:
        return False


def lock_log_dir(log_dir):
    """Take an exclusive lock on log_dir for the rest of this process's life (again in the same process: a no-op).

    A second process stops with LogDirInUse naming the holder (host, pid, start time, as written into LOCK_FILE).
    Remote (blobfile) log dirs cannot be locked and are not.
    """
    if "://" in str(log_dir):
        return None
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.realpath(os.path.join(log_dir, LOCK_FILE))
    held = _held_locks.get(path)
    if held is not None and _still_held(held, path):
        return held
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            raise
        raise LogDirInUse(
            f"log dir {log_dir} is in use by another run ({holder or 'its holder is starting'}); wait for that run "
            "to end, or pass another --log_dir"
        ) from None
    handle.seek(0)
    handle.truncate()
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    handle.write(f"host {socket.gethostname()}, pid {os.getpid()}, started {started}\n")
    handle.flush()
    if held is not None:
        held.close()
    _held_locks[path] = handle
    return handle


def release_log_dir(log_dir):
    """Give up this process's lock on log_dir (it ends with the process anyway)."""
    path = os.path.realpath(os.path.join(log_dir, LOCK_FILE))
    handle = _held_locks.pop(path, None)
    if handle is not None:
        handle.close()


def write_run_config(log_dir, config):
    """Rank 0 writes the resolved configuration to log_dir/config.json, atomically."""
    if dist_util.get_rank() == 0:
        write_atomic(config_to_json(config) + "\n", bf.join(log_dir, CONFIG_FILE))


def stored_config(log_dir):
    """The configuration in log_dir/config.json, or None when there is none (or it cannot be read)."""
    path = bf.join(log_dir, CONFIG_FILE)
    try:
        with bf.BlobFile(path, "r") as f:
            stored = json.load(f)
    except (OSError, ValueError):
        return None
    return stored if isinstance(stored, dict) else None


def flatten_config(config, prefix=""):
    """{"group.key": value} of a nested configuration (JSON-normalised, so tuples and lists compare equal)."""
    flat = {}
    for key, value in json.loads(json.dumps(config, default=str)).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = value
    return flat


def affects_result(key):
    """Whether a flattened configuration key changes what a run computes (log and output settings do not)."""
    if key in OPERATIONAL_KEYS:
        return False
    flag = FLAGS.get(key.rsplit(".", 1)[-1])
    return flag is None or flag.affects_result


def config_differences(stored, current):
    """["key: stored -> current", ...] for the settings that change what a run computes and differ."""
    new = flatten_config(current)
    old = {**{k: v for k, v in BEFORE_IT_EXISTED.items() if k in new}, **flatten_config(stored)}
    keys = sorted(k for k in old.keys() | new.keys() if affects_result(k) and old.get(k) != new.get(k))
    return [f"{k}: {old.get(k, '(none)')} -> {new.get(k, '(none)')}" for k in keys]


def extends_the_run(stored, current, step):
    """Whether `current` only makes the run of `stored` longer: the mode's schedule (mu(k), N(k), stages) gives
    the same values at every step already trained (checked at up to SCHEDULE_CHECKS steps)."""
    mode = get_training_mode(current["training_mode"])
    if not mode.has_step_schedule:
        return True
    try:
        old, new = mode.schedule_fn(stored["schedule"]), mode.schedule_fn(current["schedule"])
    except (KeyError, TypeError, ValueError):
        return False
    checked = range(step) if step <= SCHEDULE_CHECKS else np.linspace(0, step - 1, SCHEDULE_CHECKS).astype(int)
    return all(old(int(k)) == new(int(k)) for k in checked)


def global_batch(config):
    """Samples per step over all ranks of a resolved configuration."""
    return config.get("loop", {}).get("batch_size", 0) * config.get("run", {}).get("world_size", 1)


def layout_change(stored, current, differences, step):
    """(the one line recording a change of ranks that keeps the global batch, the differences left), or (None,
    differences) when the layout is unchanged or the global batch differs."""
    resized = [d for d in differences if d.split(":")[0] in LAYOUT_KEYS]
    if not resized or global_batch(stored) != global_batch(current):
        return None, differences
    rest = [d for d in differences if d not in resized]
    how = ("the sample-indexed draws continue the same trajectory" if current["run"].get("sample_indexed_rng")
           else "RNG streams restart")
    layouts = f"{describe_layout(stored)} -> {describe_layout(current)}"
    return f"step {step}: {layouts}, global batch {global_batch(current)} kept ({how})", rest


def describe_layout(config):
    """'2 rank(s) x 4' (in micro-batches of 2): how a configuration splits its global batch."""
    batch, micro = config["loop"]["batch_size"], config["loop"].get("microbatch", -1)
    split = f" in micro-batches of {micro}" if 0 < micro < batch else ""
    return f"{config['run']['world_size']} rank(s) x {batch}{split}"


def expected_files(config):
    """(EMA rates, extra network prefixes) of the checkpoints a run with this configuration writes."""
    mode = get_training_mode(config["training_mode"])
    return parse_ema_rates(config["loop"]["ema_rate"]), mode.saved_networks


def check_log_dir(log_dir, config):
    """Lock log_dir for this run (rank 0), then stop with one line when it holds another run's checkpoints or a
    run with other settings."""
    error = None
    if dist_util.get_rank() == 0:
        try:
            lock_log_dir(log_dir)
        except LogDirInUse as e:
            error = e
    dist_util.share_outcome(error, f"to lock the log dir {log_dir}")
    if error is not None:
        raise error
    ema_rates, extra = expected_files(config)
    # rank 0's view of the folder decides for every rank (cm.checkpoint_choice)
    steps, point = chosen_on_rank0(lambda: (checkpoint_steps(log_dir), resume_point(log_dir, ema_rates, extra)))
    if not steps and point is None:
        return
    if point is None:
        present = set(bf.listdir(log_dir))
        step, fmt = steps[0]
        missing = [n for n in checkpoint_files(step, ema_rates, extra, fmt) if n not in present]
        stored = stored_config(log_dir)
        differences = config_differences(stored, config) if stored else []
        settings = f", whose settings differ: {'; '.join(differences)}" if differences else ""
        raise ValueError(
            f"log dir {log_dir} holds checkpoints of another run (model{step:06d}.{fmt} without "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}){settings}; pass a new --log_dir so they "
            "are not overwritten"
        )
    step = point[0]
    state_path = bf.join(log_dir, f"state{step:06d}.pt")
    has_state = chosen_on_rank0(lambda: bf.exists(state_path))
    stored = dist_util.load_state_dict(state_path, map_location="cpu").get("config") if has_state else None
    if not isinstance(stored, dict) or "training_mode" not in stored or "network" not in stored:
        logger.log(f"note: {state_path} records no resolved configuration to compare with this run's")
        return
    history = list((stored.get("run") or {}).get(LAYOUT_RECORD) or [])
    change, differences = layout_change(stored, config, config_differences(stored, config), step)
    if change is not None:
        history.append(change)
        logger.log(f"continuing the run in {log_dir} on another number of ranks: {change}")
    if history:
        config["run"][LAYOUT_RECORD] = history
    if not differences:
        return
    if all(d.split(":")[0] in RUN_LENGTH_KEYS for d in differences) and extends_the_run(stored, config, step):
        logger.log(f"continuing the run in {log_dir} (step {step}) for longer: {'; '.join(differences)}")
        return
    listed = "; ".join(differences[:6]) + (f" (+{len(differences) - 6} more)" if len(differences) > 6 else "")
    if not config["run"].get("allow_config_change"):
        raise ValueError(
            f"log dir {log_dir} holds a run (step {step}) with other settings: {listed}; pass "
            "--allow_config_change true to continue it with the new ones, or a new --log_dir"
        )
    logger.log(f"continuing the run in {log_dir} (step {step}) with changed settings: {listed}")
