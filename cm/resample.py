"""Noise-level samplers for EDM denoiser training (the reference's `create_named_schedule_sampler`)."""

import torch

from .sampling import karras_sigma

SCHEDULE_SAMPLERS = ("lognormal", "uniform")


class LogNormalSampler:
    """EDM's training distribution ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1)."""

    def __init__(self, p_mean=-1.2, p_std=1.2):
        self.p_mean = p_mean
        self.p_std = p_std

    def sample(self, batch_size, device):
        """(sigmas, weights) with unit weights."""
        sigmas = torch.exp(self.p_mean + self.p_std * torch.randn(batch_size, device=device))
        return sigmas, torch.ones_like(sigmas)


class UniformSampler:
    """sigma uniform over the diffusion's num_timesteps-point Karras grid."""

    def __init__(self, diffusion):
        self.diffusion = diffusion

    def sample(self, batch_size, device):
        d = self.diffusion
        n = d.num_timesteps
        indices = torch.randint(0, n, (batch_size,), device=device)
        sigmas = karras_sigma(indices, n, d.sigma_min, d.sigma_max, d.rho).float()
        return sigmas, torch.ones_like(sigmas)


def create_named_schedule_sampler(name, diffusion):
    """The sigma sampler called `name`: lognormal (EDM, the reference's setting) or uniform."""
    if name == "lognormal":
        return LogNormalSampler()
    if name == "uniform":
        return UniformSampler(diffusion)
    raise ValueError(f"unknown schedule_sampler {name!r}; allowed: {', '.join(SCHEDULE_SAMPLERS)}")
