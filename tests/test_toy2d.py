"""The algorithms on 2-D data: a mixture of four Gaussians and a small MLP as the network.

Consistency training (iCT recipe) from scratch and consistency distillation from an EDM teacher must
give one-step samples whose mode weights and means match the data.
"""

import copy

import torch

from cm import logger
from cm.karras_diffusion import KarrasDenoiser
from cm.sampling import karras_sample
from cm.schedules import create_ema_and_scales_fn
from cm.train_util import CMTrainLoop, TrainLoop

CENTERS = torch.tensor([[0.6, 0.6], [-0.6, 0.6], [-0.6, -0.6], [0.6, -0.6]])
WEIGHTS = torch.tensor([0.4, 0.3, 0.2, 0.1])
STD = 0.05


class Mixture:
    """Endless batches from the mixture (no labels)."""

    def __init__(self, batch_size, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.batch_size = batch_size

    def __next__(self):
        k = torch.multinomial(WEIGHTS, self.batch_size, replacement=True, generator=self.g)
        return CENTERS[k] + STD * torch.randn(self.batch_size, 2, generator=self.g), {}


class MLP(torch.nn.Module):
    """net(x, rescaled_t): an MLP on x and sinusoidal features of log sigma = rescaled_t / 250."""

    def __init__(self, width=128):
        super().__init__()
        self.register_buffer("freqs", 0.25 * 2.0 ** torch.arange(6))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2 + 13, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, 2),
        )

    def forward(self, x, rescaled_t, **kwargs):
        log_sigma = rescaled_t[:, None] / 250
        a = log_sigma * self.freqs[None]
        return self.net(torch.cat([x, log_sigma, torch.cos(a), torch.sin(a)], dim=1))


def mode_statistics(samples):
    """Fraction of samples nearest to each center, and each group's mean distance from its center."""
    nearest = torch.cdist(samples, CENTERS).argmin(dim=1)
    weights = torch.bincount(nearest, minlength=4).float() / len(samples)
    offsets = torch.stack([(samples[nearest == i].mean(0) - CENTERS[i]).norm() for i in range(4)])
    return weights, offsets


def train(loop_cls, steps, diffusion, **kwargs):
    logger.configure(dir=kwargs.pop("log_dir"), format_strs=[])
    torch.manual_seed(0)
    model = MLP(width=64)  # CT's mode weights and offsets as with width 128 (within 0.03), at about 1.5x the speed
    if "target_model" in kwargs:
        kwargs["target_model"] = copy.deepcopy(model)
    loop = loop_cls(model=model, diffusion=diffusion, data=Mixture(256), batch_size=256, microbatch=-1, lr=1e-3,
                    ema_rate="0.999", log_interval=10**9, save_interval=-1, resume_checkpoint="", optimizer="adam",
                    total_training_steps=steps, progress=False, channels_last=False, **kwargs)
    loop.run_loop()
    ema = copy.deepcopy(model)
    ema.load_state_dict(loop.mp_trainer.master_params_to_state_dict(loop.ema_params[0]))
    return ema


def sample(diffusion, model, **kwargs):
    torch.manual_seed(123)
    return karras_sample(diffusion, model, (4000, 2), clip_denoised=False, sigma_max=diffusion.sigma_max, **kwargs)


def test_consistency_training_from_scratch_recovers_the_modes(tmp_path):
    """iCT recipe: pseudo-Huber, lognormal indices, 1/(t_n - t_(n+1)) weights, doubling N, mu = 0."""
    diffusion = KarrasDenoiser(sigma_max=10.0, distillation=True, loss_norm="pseudo-huber", weight_schedule="ict",
                               index_sampler="lognormal")
    schedule = create_ema_and_scales_fn("fixed", 0.0, "exponential", 10, 320, 6000, 0)
    model = train(CMTrainLoop, 6000, diffusion, log_dir=str(tmp_path), target_model=True, teacher_model=None,
                  teacher_diffusion=None, training_mode="consistency_training", ema_scale_fn=schedule)
    weights, offsets = mode_statistics(sample(diffusion, model, steps=40, sampler="onestep"))
    assert torch.allclose(weights, WEIGHTS, atol=0.06), weights
    assert (offsets < 0.25).all(), offsets
    weights, offsets = mode_statistics(sample(diffusion, model, steps=40, sampler="multistep", ts=(0, 20, 39)))
    assert torch.allclose(weights, WEIGHTS, atol=0.06), weights
    assert (offsets < 0.12).all(), offsets


def test_consistency_distillation_from_an_edm_teacher_recovers_the_modes(tmp_path):
    teacher_diffusion = KarrasDenoiser(weight_schedule="karras")
    teacher = train(TrainLoop, 3000, teacher_diffusion, log_dir=str(tmp_path / "edm"))
    teacher_weights, _ = mode_statistics(sample(teacher_diffusion, teacher, steps=18, sampler="heun"))
    assert torch.allclose(teacher_weights, WEIGHTS, atol=0.04), teacher_weights

    diffusion = KarrasDenoiser(distillation=True, loss_norm="l2", weight_schedule="uniform")
    schedule = create_ema_and_scales_fn("fixed", 0.95, "fixed", 18, 18, 3000, 0)
    model = train(CMTrainLoop, 3000, diffusion, log_dir=str(tmp_path / "cd"), target_model=True,
                  teacher_model=teacher, teacher_diffusion=teacher_diffusion,
                  training_mode="consistency_distillation", ema_scale_fn=schedule)
    weights, offsets = mode_statistics(sample(diffusion, model, steps=18, sampler="onestep"))
    assert torch.allclose(weights, WEIGHTS, atol=0.04), weights
    assert (offsets < 0.08).all(), offsets
