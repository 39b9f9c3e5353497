"""Noise-level samplers for EDM denoiser training (the reference's `create_named_schedule_sampler`)."""

from abc import ABC, abstractmethod

import numpy as np
import torch

from . import dist_util
from .modes.base import unit_weights
from .sampling import karras_sigma

SCHEDULE_SAMPLERS = ("lognormal", "uniform")


class LogNormalSampler:
    """EDM's training distribution ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1).

    :param even: stratify over the global batch, as the reference: sample k of rank r takes ln(sigma) at the
        normal quantile of (r * bs + k + U(0, 1)) / (world_size * bs).
    """

    def __init__(self, p_mean=-1.2, p_std=1.2, even=False):
        self.p_mean = p_mean
        self.p_std = p_std
        self.even = even

    def sample(self, bs, device):
        """(sigmas, weights) with unit weights."""
        if self.even:
            rank, world = dist_util.get_rank(), dist_util.get_world_size()
            locs = (torch.arange(rank * bs, (rank + 1) * bs) + torch.rand(bs)) / (world * bs)
            log_sigmas = (self.p_mean + self.p_std * torch.special.ndtri(locs.double())).float().to(device)
        else:
            log_sigmas = self.p_mean + self.p_std * torch.randn(bs, device=device)
        sigmas = torch.exp(log_sigmas)
        return sigmas, unit_weights(sigmas)


class ScheduleSampler(ABC):
    """The reference's importance sampler over grid indices: index i with probability w_i / sum(w), loss weight
    1 / (N p_i) so the objective's mean is unchanged. Returns indices, not noise levels."""

    @abstractmethod
    def weights(self):
        """Positive numpy weights, one per index (need not be normalised)."""

    def sample(self, batch_size, device):
        """(indices [batch_size] long, importance weights [batch_size] float), drawn with numpy's global RNG."""
        w = self.weights()
        p = w / np.sum(w)
        indices = np.random.choice(len(p), size=(batch_size,), p=p)
        weights = 1 / (len(p) * p[indices])
        return torch.from_numpy(indices).long().to(device), torch.from_numpy(weights).float().to(device)


class LossAwareSampler(ScheduleSampler):
    """A ScheduleSampler whose weights follow the losses reported to it (identical on every rank)."""

    def update_with_local_losses(self, local_ts, local_losses):
        """Gather (index, loss) pairs of every rank's batch, then update_with_all_losses with all of them."""
        ts = [int(t) for part in dist_util.all_gather_object(local_ts.tolist()) for t in part]
        losses = [float(v) for part in dist_util.all_gather_object(local_losses.tolist()) for v in part]
        self.update_with_all_losses(ts, losses)

    @abstractmethod
    def update_with_all_losses(self, ts, losses):
        """Update the weights from lists of int indices and float losses (the same call on every rank)."""


class LossSecondMomentResampler(LossAwareSampler):
    """Indices weighted by the RMS of their last history_per_term losses, mixed with uniform_prob of uniform
    (Nichol & Dhariwal 2021, Sec. 3.3); uniform until every index has a full history."""

    def __init__(self, diffusion, history_per_term=10, uniform_prob=0.001):
        self.diffusion = diffusion
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self._loss_history = np.zeros([diffusion.num_timesteps, history_per_term], dtype=np.float64)
        self._loss_counts = np.zeros([diffusion.num_timesteps], dtype=np.int64)

    def weights(self):
        if not (self._loss_counts == self.history_per_term).all():
            return np.ones([self.diffusion.num_timesteps], dtype=np.float64)
        weights = np.sqrt(np.mean(self._loss_history**2, axis=-1))
        weights = weights / np.sum(weights) * (1 - self.uniform_prob)
        return weights + self.uniform_prob / len(weights)

    def update_with_all_losses(self, ts, losses):
        for t, loss in zip(ts, losses):
            if self._loss_counts[t] == self.history_per_term:
                self._loss_history[t] = np.roll(self._loss_history[t], -1)
                self._loss_history[t, -1] = loss
            else:
                self._loss_history[t, self._loss_counts[t]] = loss
                self._loss_counts[t] += 1


class UniformSampler(ScheduleSampler):
    """sigma uniform over the diffusion's num_timesteps-point Karras grid.

    The reference's UniformSampler returns grid indices (from guided-diffusion), which its KarrasDenoiser then
    takes as noise levels; this one returns the noise levels at those indices. weights() is the reference's.
    """

    def __init__(self, diffusion):
        self.diffusion = diffusion

    def weights(self):
        return np.ones([self.diffusion.num_timesteps])

    def sample(self, batch_size, device):
        d = self.diffusion
        n = d.num_timesteps
        indices = torch.randint(0, n, (batch_size,), device=device)
        sigmas = karras_sigma(indices, n, d.sigma_min, d.sigma_max, d.rho).float()
        return sigmas, unit_weights(sigmas)


def create_named_schedule_sampler(name, diffusion):
    """The sigma sampler called `name`: lognormal (EDM, the reference's setting) or uniform."""
    if name == "lognormal":
        return LogNormalSampler()
    if name == "uniform":
        return UniformSampler(diffusion)
    raise ValueError(f"unknown schedule_sampler {name!r}; allowed: {', '.join(SCHEDULE_SAMPLERS)}")
