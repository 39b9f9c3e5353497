"""Gaussian likelihood terms of DDPM (Ho et al. 2020), kept under the reference's names (it carries them unused)."""

import math

import torch


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, broadcasting; at least one argument is a tensor."""
    like = next((t for t in (mean1, logvar1, mean2, logvar2) if torch.is_tensor(t)), None)
    if like is None:
        raise ValueError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (v if torch.is_tensor(v) else torch.tensor(v).to(like) for v in (logvar1, logvar2))
    return 0.5 * (logvar2 - logvar1 - 1.0 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Phi(x) ~ (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) / 2, the tanh approximation of the normal CDF."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """log P(bin of x) under N(means, e^(2 log_scales)) for 8-bit images scaled to [-1, 1] (DDPM Eq. 13).

    Each pixel value owns the interval x +- 1/255; the lowest and highest values own everything below and
    above. Returns log-probabilities in nats, shaped like x.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(f"x, means and log_scales must have one shape, got {x.shape}, {means.shape}, {log_scales.shape}")
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (x - means + 1.0 / 255.0))
    cdf_lower = approx_standard_normal_cdf(inv_std * (x - means - 1.0 / 255.0))
    log_below_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_above_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_in_bin = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_below_upper, torch.where(x > 0.999, log_above_lower, log_in_bin))
