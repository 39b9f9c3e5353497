"""Worker for the distributed fault tests: a tiny EDM run on every rank, checkpoints every 2 steps.

    python fault_worker.py OUT_DIR MODE     (under torchrun or mpiexec -n 2)

MODE disk_full: rank 0's write of the step-4 checkpoint fails half way, as a full disk does.
MODE kill: rank 1 is SIGKILLed at the start of step 3.
MODE error: rank 1 raises an input error at the start of step 3 (and exits with its one line).
The failing rank first writes the time to OUT_DIR/fault_time, so the test can tell how long the others took.
"""

import errno
import io
import os
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cm import checkpoint_io, dist_util, logger  # noqa: E402
from cm.script_util import run_or_exit  # noqa: E402
from cm.train_util import TrainLoop  # noqa: E402

from dist_worker import loop_kwargs  # noqa: E402
from helpers import tiny_model_and_diffusion  # noqa: E402


def note_fault_time(out_dir):
    with open(os.path.join(out_dir, "fault_time"), "w") as f:
        f.write(repr(time.time()))


def fill_the_disk_at(name, out_dir):
    """Make torch.save write half of file `name`, then fail with ENOSPC."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if name not in getattr(f, "name", ""):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        note_fault_time(out_dir)
        raise OSError(errno.ENOSPC, "No space left on device")

    checkpoint_io.torch.save = save


class DyingLoop(TrainLoop):
    """Rank 1 is killed, or fails, at the start of step 3 when asked to."""

    fault = None

    def run_step(self, batch, cond):
        if self.step == 2 and self.fault in ("kill", "error") and dist_util.get_rank() == 1:
            note_fault_time(self.out_dir)
            if self.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError("simulated bad input on rank 1")
        super().run_step(batch, cond)


def train(out_dir, mode):
    dist_util.setup_dist()
    logger.configure(dir=os.path.join(out_dir, "log"), format_strs=["log"])
    if mode == "disk_full" and dist_util.get_rank() == 0:
        fill_the_disk_at("opt000004.pt", out_dir)
    torch.manual_seed(0)
    model, diffusion = tiny_model_and_diffusion()
    DyingLoop.fault = mode
    DyingLoop.out_dir = out_dir
    loop = DyingLoop(**loop_kwargs(model, diffusion, lr=1e-3, save_interval=2, total_training_steps=6))
    loop.run_loop()


if __name__ == "__main__":
    run_or_exit(train, sys.argv[1], sys.argv[2])
