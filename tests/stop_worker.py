"""Worker for the tests of stopping and slow checkpoint writes with two ranks (tests/test_stop_and_slow_saves.py).

    python stop_worker.py OUT_DIR MODE[,MODE...]     (under torchrun --nproc_per_node 2)

MODE slow_save: rank 0's write of the step-2 checkpoint takes SLOW_WRITE_SECONDS, longer than the CM_DIST_TIMEOUT
         the test sets; every rank must still train step 3 and save it.
MODE sigterm: rank 1 sends itself SIGTERM during step 3 of a long run with a log step only every 1000 steps.
MODE max_minutes: a long run whose time limit (--max_minutes) ends rank 1's time before rank 0's.
MODE sigusr1: as sigterm, with the pre-emption warning SIGUSR1 and requeue on (checkpoints every 2 steps).
MODE other_view: resumes OUT_DIR/log, where rank 1's directory listing lacks the newest model file (as a stale
         network file system cache would); trains to step 6.
MODE unreadable: resumes OUT_DIR/log, where rank 1 cannot read the newest optimizer file.
Every rank writes the step it ended at to OUT_DIR/rankR_step (and the step it resumed from to rankR_resumed). The
ranks first meet at a file barrier, so the short collective time-out does not have to cover the import of torch.
Several modes run one after the other in the same process group, each in OUT_DIR/MODE instead of OUT_DIR.
"""

import builtins
import os
import signal
import sys
import time

import blobfile as bf

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cm import dist_util, logger, train_util  # noqa: E402
from cm.script_util import run_or_exit  # noqa: E402
from cm.train_util import TrainLoop  # noqa: E402

from dist_worker import loop_kwargs  # noqa: E402
from helpers import tiny_model_and_diffusion  # noqa: E402

SLOW_WRITE_SECONDS = 3.0
LONG_RUN = 3000  # steps; each mode that stops early must stop long before


def meet(out_dir, rank, world):
    """Wait until every rank has started (a barrier through files, before any process group exists)."""
    open(os.path.join(out_dir, f"started{rank}"), "w").close()
    while not all(os.path.exists(os.path.join(out_dir, f"started{r}")) for r in range(world)):
        time.sleep(0.05)


class SignalledLoop(TrainLoop):
    """Rank 1 gets SIGTERM during step 3."""

    def run_step(self, batch, cond):
        if self.step == 2 and dist_util.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        super().run_step(batch, cond)


class PreemptedLoop(TrainLoop):
    """Rank 1 gets the pre-emption warning SIGUSR1 during step 3."""

    def run_step(self, batch, cond):
        if self.step == 2 and dist_util.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        super().run_step(batch, cond)


def hide_from_listing(name):
    """This process's directory listings lack `name`."""
    real = bf.listdir
    bf.listdir = lambda path: [n for n in real(path) if n != name]


def refuse_to_open(suffix):
    """This process cannot open files whose path ends with `suffix` (permission denied)."""
    real = builtins.open

    def open_(file, *args, **kwargs):
        if str(file).endswith(suffix):
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *args, **kwargs)

    builtins.open = open_


def slow_writes():
    real = train_util.atomic_save

    def atomic_save(obj, path):
        if path.endswith("model000002.pt"):
            time.sleep(SLOW_WRITE_SECONDS)
        real(obj, path)

    train_util.atomic_save = atomic_save


def train(out_dir, mode):
    rank = dist_util.get_rank()
    logger.configure(dir=os.path.join(out_dir, "log"), format_strs=["log"])
    torch.manual_seed(0)
    model, diffusion = tiny_model_and_diffusion()
    if mode == "slow_save":
        if rank == 0:
            slow_writes()
        loop = TrainLoop(**loop_kwargs(model, diffusion, lr=1e-3, save_interval=2, total_training_steps=3))
    elif mode == "sigusr1":
        loop = PreemptedLoop(**loop_kwargs(model, diffusion, lr=1e-3, save_interval=2, log_interval=1000,
                                           total_training_steps=LONG_RUN, preempt_signal="USR1", requeue=True))
    elif mode in ("other_view", "unreadable"):
        if rank == 1:
            hide_from_listing("model000004.pt") if mode == "other_view" else refuse_to_open("opt000004.pt")
        loop = TrainLoop(**loop_kwargs(model, diffusion, lr=1e-3, save_interval=0, total_training_steps=6))
    elif mode == "sigterm":
        loop = SignalledLoop(**loop_kwargs(model, diffusion, lr=1e-3, save_interval=0, log_interval=1000,
                                           total_training_steps=LONG_RUN))
    else:
        time_limit = 1.0 if rank == 1 else 600.0
        loop = TrainLoop(**loop_kwargs(model, diffusion, lr=1e-3, save_interval=0, log_interval=1000,
                                       total_training_steps=LONG_RUN, time_limit=time_limit))
    with open(os.path.join(out_dir, f"rank{rank}_resumed"), "w") as f:
        f.write(str(loop.resumed_step))
    loop.run_loop()
    with open(os.path.join(out_dir, f"rank{rank}_step"), "w") as f:
        f.write(str(loop.step))


def train_modes(out_dir, modes):
    """Join the process group once, then train each of the comma-separated modes in turn."""
    meet(out_dir, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    dist_util.setup_dist()
    modes = modes.split(",")
    for mode in modes:
        mode_dir = out_dir if len(modes) == 1 else os.path.join(out_dir, mode)
        os.makedirs(mode_dir, exist_ok=True)
        train(mode_dir, mode)


if __name__ == "__main__":
    run_or_exit(train_modes, sys.argv[1], sys.argv[2])
