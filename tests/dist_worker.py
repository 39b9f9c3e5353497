"""Worker for the distributed tests: 3 EDM steps on a fixed global batch split over the ranks.

Run as `python dist_worker.py OUT_DIR` (one process), under `mpiexec -n K` or under torchrun.
With --die, rank 1 fails right after start-up; the other ranks must not hang.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cm import dist_util, logger  # noqa: E402
from cm.train_util import TrainLoop  # noqa: E402

from helpers import tiny_model_and_diffusion  # noqa: E402

GLOBAL_BATCH = 4


class FixedBatches:
    """The same global batches on every rank; rank r keeps rows r, r + K, ..."""

    def __init__(self):
        self.g = torch.Generator().manual_seed(0)

    def __next__(self):
        x = torch.rand(GLOBAL_BATCH, 3, 8, 8, generator=self.g) * 2 - 1
        r, k = dist_util.get_rank(), dist_util.get_world_size()
        return x[r::k], {}


class GradRecordingLoop(TrainLoop):
    """Keeps the gradients and parameters of the first step.

    Later steps are compared only across ranks: Adam turns round-off in gradients that are zero in
    exact arithmetic (behind zero-initialised layers) into updates of order lr.
    """

    first_grads = first_params = None

    def forward_backward(self, batch, cond):
        super().forward_backward(batch, cond)
        if self.first_grads is None:
            self.first_grads = [p.grad.detach().clone() for p in self.model.parameters()]

    def run_step(self, batch, cond):
        super().run_step(batch, cond)
        if self.first_params is None:
            self.first_params = [p.detach().clone() for p in self.model.parameters()]


class DataDerivedSigmas:
    """Noise levels that depend only on each sample, so any split of the batch sees the same ones."""

    def sample(self, n, device):
        return torch.ones(n), torch.ones(n)


def loop_kwargs(model, diffusion, **overrides):
    """TrainLoop keywords of the workers: fixed batches split over the ranks, data-derived sigmas, Adam."""
    kwargs = dict(model=model, diffusion=diffusion, data=FixedBatches(),
                  batch_size=GLOBAL_BATCH // dist_util.get_world_size(), microbatch=-1, ema_rate="0.9",
                  log_interval=1, resume_checkpoint="", optimizer="adam", schedule_sampler=DataDerivedSigmas(),
                  progress=False)
    return {**kwargs, **overrides}


def main():
    out_dir = sys.argv[1]
    dist_util.setup_dist()
    rank = dist_util.get_rank()
    if "--die" in sys.argv:
        if rank == 1:
            raise SystemExit(3)
        dist_util.barrier()
        return
    logger.configure(dir=os.path.join(out_dir, "log"), format_strs=["csv"])
    torch.manual_seed(0)
    model, diffusion = tiny_model_and_diffusion()
    real = diffusion.training_losses

    def per_sample(model, x, sigmas, model_kwargs=None, noise=None):
        sigmas = 0.5 + (x[:, 0, 0, 0] + 1)
        return real(model, x, sigmas, model_kwargs, noise=torch.sin(1000 * x))

    diffusion.training_losses = per_sample
    loop = GradRecordingLoop(**loop_kwargs(model, diffusion, lr=1e-2, save_interval=-1, total_training_steps=3))
    loop.run_loop()
    torch.save(
        {"params": model.state_dict(), "first_grads": loop.first_grads, "first_params": loop.first_params},
        os.path.join(out_dir, f"params_rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
