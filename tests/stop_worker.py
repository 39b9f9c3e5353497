"""Worker for the tests of stopping and slow checkpoint writes with two ranks (tests/test_stop_and_slow_saves.py).

    python stop_worker.py OUT_DIR MODE     (under torchrun --nproc_per_node 2)

MODE slow_save: rank 0's write of the step-2 checkpoint takes SLOW_WRITE_SECONDS, longer than the CM_DIST_TIMEOUT
         the test sets; every rank must still train step 3 and save it.
MODE sigterm: rank 1 sends itself SIGTERM during step 3 of a long run with a log step only every 1000 steps.
MODE max_minutes: a long run whose time limit (--max_minutes) ends rank 1's time before rank 0's.
Every rank writes the step it ended at to OUT_DIR/rankR_step. The ranks first meet at a file barrier, so the
short collective time-out does not have to cover the import of torch.
"""

import os
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cm import dist_util, logger, train_util  # noqa: E402
from cm.script_util import run_or_exit  # noqa: E402
from cm.train_util import TrainLoop  # noqa: E402

from dist_worker import loop_kwargs  # noqa: E402
from helpers import tiny_model_and_diffusion  # noqa: E402

SLOW_WRITE_SECONDS = 4.0
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


def slow_writes():
    real = train_util.atomic_save

    def atomic_save(obj, path):
        if path.endswith("model000002.pt"):
            time.sleep(SLOW_WRITE_SECONDS)
        real(obj, path)

    train_util.atomic_save = atomic_save


def train(out_dir, mode):
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    meet(out_dir, rank, world)
    dist_util.setup_dist()
    logger.configure(dir=os.path.join(out_dir, "log"), format_strs=["log"])
    torch.manual_seed(0)
    model, diffusion = tiny_model_and_diffusion()
    if mode == "slow_save":
        if rank == 0:
            slow_writes()
        loop = TrainLoop(**loop_kwargs(model, diffusion, lr=1e-3, save_interval=2, total_training_steps=3))
    elif mode == "sigterm":
        loop = SignalledLoop(**loop_kwargs(model, diffusion, lr=1e-3, save_interval=0, log_interval=1000,
                                           total_training_steps=LONG_RUN))
    else:
        time_limit = 1.0 if rank == 1 else 600.0
        loop = TrainLoop(**loop_kwargs(model, diffusion, lr=1e-3, save_interval=0, log_interval=1000,
                                       total_training_steps=LONG_RUN, time_limit=time_limit))
    loop.run_loop()
    with open(os.path.join(out_dir, f"rank{rank}_step"), "w") as f:
        f.write(str(loop.step))


if __name__ == "__main__":
    run_or_exit(train, sys.argv[1], sys.argv[2])
