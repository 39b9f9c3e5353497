"""EDM denoiser training (Karras, Aittala, Aila & Laine 2022): the teacher of every distillation mode.

    sigma ~ p(sigma) (lognormal: log sigma ~ N(P_mean -1.2, P_std 1.2), cm.resample),  x_sigma = x + sigma z,
    loss = lambda(sigma) ||D_theta(x_sigma, sigma) - x||^2          (EDM Eq. 8; lambda: --weight_schedule)

with D_theta the EDM-preconditioned denoiser (KarrasDenoiser.denoise). The noise-level sampler is the mode's
schedule: it has no step schedule, its "schedule" group configures the sampler.
"""

import torch

from ..nn import append_dims, mean_flat
from .base import TrainingMode


def edm_losses(diffusion, model, x_start, sigmas, model_kwargs=None, noise=None):
    """EDM loss lambda(sigma) ||D(x + sigma z, sigma) - x||^2 (EDM Eq. 8); terms loss, mse, xs_mse per sample."""
    model_kwargs = {} if model_kwargs is None else model_kwargs
    noise = torch.randn_like(x_start) if noise is None else noise
    x_t = x_start + noise * append_dims(sigmas, x_start.ndim)
    _, denoised = diffusion.denoise(model, x_t, sigmas, **model_kwargs)
    weights = append_dims(diffusion.loss_weights(sigmas), x_start.ndim)
    mse = mean_flat(weights * (denoised - x_start) ** 2)
    return {"xs_mse": mean_flat((denoised - x_start) ** 2), "mse": mse, "loss": mse}


def bind_edm_loss(diffusion, context):
    """sigma from the noise-level sampler (with its importance weights), then the EDM loss through the denoiser's
    `training_losses` (the reference's method, which a subclass may override)."""

    def loss(model, x_start, model_kwargs, schedule=None):
        sigmas, weights = context.schedule_sampler.sample(x_start.shape[0], x_start.device)
        terms = diffusion.training_losses(model, x_start, sigmas, model_kwargs=model_kwargs)
        terms["sigma"] = sigmas
        return terms, weights

    return loss


FLAGS = ()  # the reference's flags configure it (cm.flags: denoiser, schedule_sampler)

MODES = (
    TrainingMode(
        name="edm",
        description="EDM denoiser (Karras et al. 2022): the teacher of distillation",
        bind_loss=bind_edm_loss,
        uses_distance=False,
        schedule_groups=("schedule_sampler",),
        flag_defaults=dict(total_training_steps=0),
    ),
)
