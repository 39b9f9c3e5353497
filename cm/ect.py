"""Easy consistency tuning (ECT: Geng et al., "Consistency models made easy", ICLR 2025; code locuslab/ect).

A pretrained EDM network becomes a consistency model f(x, t) (the boundary-condition scalings, f(x, sigma_min) = x)
by tuning it against itself at a nearby earlier time r < t on the same noise direction:

    t ~ lognormal(P_mean, P_std),   r = max(t (1 - n(t) / N), 0),   n(t) = 1 + k sigmoid(-b t),   N = q^(stage + 1),
    loss = w(t, r) d(f_theta(x + t z, t), sg[f_theta(x + r z, r)]),    f(x, r) = x when r <= sigma_min,

with w(t, r) = 1 / (t - r) (weight_schedule ict) and d the adaptive-weighting distance of ECT's code
(pseudo-Huber with constant c). There is no target network: the r pass is the online network under
stop-gradient with the online pass's dropout masks. Stages advance every so many images or steps, each
shrinking dt / t by q, so the objective moves from diffusion-like (large dt) to consistency (dt -> 0).
The schedule hands the loss N(k) = q^(stage + 1) where the other modes get their discretisation N(k).
"""

import math

import torch
from torch.nn.parallel import DistributedDataParallel

from . import logger
from .nn import append_dims
from .random_util import DeviceRNG

MAPPINGS = ("sigmoid", "const")


# ----- the mapping r(t) and the stages ----------------------------------------------------------


def ect_num_scales(stage, q):
    """N(k) = q^(stage + 1): the factor by which ECT's dt / t has shrunk at `stage` (dt = t n(t) / N)."""
    return q ** (stage + 1)


def ect_stage_of(num_scales, q):
    """The stage whose N(k) is num_scales (inverse of ect_num_scales)."""
    return round(math.log(num_scales, q)) - 1


def ect_n(t, mapping="sigmoid", k=8.0, b=1.0):
    """ECT's mapping adjustment n(t) = 1 + k sigmoid(-b t) ("sigmoid": larger gaps at small t) or 1 ("const")."""
    if mapping == "sigmoid":
        return 1 + k * torch.sigmoid(-b * t)
    if mapping == "const":
        return torch.ones_like(t)
    raise ValueError(f"unknown ect_mapping {mapping!r}; allowed: {', '.join(MAPPINGS)}")


def ect_r(t, num_scales, mapping="sigmoid", k=8.0, b=1.0):
    """ECT's mapping function r(t) = max(t (1 - n(t) / N), 0), N = q^(stage + 1) (ECT: r / t = 1 - n(t) / q^a)."""
    return (t * (1 - ect_n(t, mapping, k, b) / num_scales)).clamp(min=0)


def ect_stage_fn(ect_stage_images=0, ect_stage_steps=0, ect_stages=8, total_steps=0, images_per_step=1):
    """step -> stage: one stage every ect_stage_images images, or every ect_stage_steps steps, or ect_stages equal
    parts of total_steps (which follow the run's length when a time budget re-plans it)."""
    if ect_stage_images < 0 or ect_stage_steps < 0:
        raise ValueError(f"ect_stage_images and ect_stage_steps must be >= 0, got {ect_stage_images}, {ect_stage_steps}")
    if ect_stage_images and ect_stage_steps:
        raise ValueError("give ECT's stage length as --ect_stage_images or --ect_stage_steps, not both")
    if ect_stage_images:
        return lambda step: step * images_per_step // ect_stage_images
    if ect_stage_steps:
        return lambda step: step // ect_stage_steps
    if ect_stages < 1 or total_steps <= 0:
        raise ValueError(
            f"ECT stages over the run need --ect_stages >= 1 and total_training_steps > 0 (got {ect_stages}, "
            f"{total_steps}); or set --ect_stage_images / --ect_stage_steps"
        )
    return lambda step: min(step * ect_stages // total_steps, ect_stages - 1)


def create_ect_schedule(ect_q, ect_stage_images=0, ect_stage_steps=0, ect_stages=8, total_steps=0, images_per_step=1):
    """step -> (mu(k), N(k)) = (0, q^(stage + 1)): no target network (stop-gradient of the online one), dt / t shrinking
    by q each stage.

    :param ect_q: q, the integer factor by which dt shrinks each stage (ECT: 2; its one-hour run 256).
    :param ect_stage_images: images per stage over all ranks (0: not in images).
    :param ect_stage_steps: steps per stage (0: not in steps).
    :param ect_stages: stages over total_steps, when neither length is given.
    :param total_steps: K, the run's length in steps.
    :param images_per_step: images of one step over all ranks (the global batch).
    """
    if int(ect_q) != ect_q or ect_q < 2:
        raise ValueError(f"ect_q must be an integer >= 2, got {ect_q}")
    stage_of_step = ect_stage_fn(ect_stage_images, ect_stage_steps, ect_stages, total_steps, images_per_step)
    return lambda step: (0.0, ect_num_scales(stage_of_step(step), int(ect_q)))


# ----- the loss ----------------------------------------------------------------------------------


def ect_sample_t(batch_size, p_mean, p_std, sigma_min, sigma_max, device, dtype=torch.float32):
    """t with log t ~ N(P_mean, P_std^2) (ECT's p(t), as iCT's), kept in the model's range [sigma_min, sigma_max]."""
    log_t = p_mean + p_std * torch.randn(batch_size, device=device)
    return log_t.exp().clamp(sigma_min, sigma_max).to(dtype)


def adaptive_distance(x, y, c=0.0, p=0.5):
    """ECT's adaptive weighting w = (||x - y||^2 + c^2)^-p as a distance whose gradient is w grad ||x - y||^2 / 2:
    p = 0.5 the pseudo-Huber distance sqrt(||x - y||^2 + c^2) - c, p = 0 half the squared l2 distance, p = 1 Cauchy."""
    if not 0 <= p <= 1:
        raise ValueError(f"ect_adaptive_p must lie in [0, 1], got {p}")
    if p == 1 and c <= 0:
        raise ValueError("ect_adaptive_p 1 (the Cauchy loss) needs ect_c > 0")
    squared = (x - y).float().flatten(1).pow(2).sum(dim=1)
    if p == 1:
        return 0.5 * torch.log1p(squared / c**2)
    power = 1 - p
    return ((squared + c**2) ** power - c ** (2 * power)) / (2 * power)


def _without_ddp(model):
    """The module inside a DistributedDataParallel wrapper (the no-gradient pass needs no gradient sync)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def ect_losses(diffusion, model, x_start, num_scales, model_kwargs=None, mapping="sigmoid", k=8.0, b=1.0, c=0.0, p=0.5,
               t=None, noise=None, rng=None):
    """ECT's loss w(t, r) d(f_theta(x + t z, t), sg[f_theta(x + r z, r)]) with f(x, r) = x for r <= sigma_min.

    t ~ lognormal(diffusion.p_mean, diffusion.p_std) unless given; r = ect_r(t, num_scales, ...); w =
    diffusion.loss_weights(t, r) (ict: 1 / (t - r)); d = adaptive_distance(c, p). Both passes share the noise z and,
    through `rng` (default: the device's), the dropout masks. Returns {"loss", "sigma": t, "dt_over_t"}, per sample.
    """
    model_kwargs = {} if model_kwargs is None else model_kwargs
    noise = torch.randn_like(x_start) if noise is None else noise
    rng = rng or DeviceRNG(x_start.device)
    dims = x_start.ndim
    if t is None:
        t = ect_sample_t(x_start.shape[0], diffusion.p_mean, diffusion.p_std, diffusion.sigma_min, diffusion.sigma_max,
                         x_start.device, x_start.dtype)
    r = ect_r(t, num_scales, mapping, k, b)
    boundary = r <= diffusion.sigma_min

    # online pass at (x + t z, t), remembering the dropout randomness
    rng_state = rng.get_state()
    online = diffusion.denoise(model, x_start + append_dims(t, dims) * noise, t, **model_kwargs)[1]

    with torch.no_grad():
        # the same network at (x + r z, r) with the same dropout masks; at the boundary the data itself
        x_r = x_start + append_dims(r, dims) * noise
        with rng.replaying(rng_state):
            at_r = diffusion.denoise(_without_ddp(model), x_r, r.clamp(min=diffusion.sigma_min), **model_kwargs)[1]
        target = torch.where(append_dims(boundary, dims), x_start, at_r.to(x_start.dtype))

    loss = adaptive_distance(online, target, c, p) * diffusion.loss_weights(t, r)
    return {"loss": loss, "sigma": t, "dt_over_t": (t - r) / t}


def check_ect_config(config):
    """One-line errors, at resolve time (--dry_run too), for ECT options that cannot train: the stage schedule, the
    mapping and the adaptive weighting are built once from the resolved configuration."""
    create_ect_schedule(**config["schedule"])
    options = config["loss"]
    ect_n(torch.zeros(1), options["ect_mapping"])
    adaptive_distance(torch.zeros(1, 1), torch.zeros(1, 1), options["ect_c"], options["ect_adaptive_p"])


def bind_ect_loss(diffusion, context):
    """ECT (consistency_tuning) bound to the mode's options (cm.flags groups "ect" and "ect_schedule"); logs the stage."""
    options = context.options
    q = int(options["ect_q"])
    settings = dict(mapping=options["ect_mapping"], k=options["ect_k"], b=options["ect_b"], c=options["ect_c"],
                    p=options["ect_adaptive_p"])

    def loss(model, x_start, model_kwargs, num_scales):
        logger.logkv("ect_stage", ect_stage_of(num_scales, q))
        terms = ect_losses(diffusion, model, x_start, num_scales, model_kwargs, **settings)
        return terms, torch.ones_like(terms["loss"])

    return loss
