"""Easy consistency tuning (ECT: Geng et al., "Consistency models made easy", ICLR 2025; code locuslab/ect).

A pretrained EDM network becomes a consistency model f(x, t) (the boundary-condition scalings, f(x, sigma_min) = x)
by tuning it against itself at a nearby earlier time r < t on the same noise direction:

    t ~ lognormal(P_mean, P_std),   r = max(t (1 - n(t) / N), 0),   n(t) = 1 + k sigmoid(-b t),   N = q^(stage + 1),
    loss = w(t, r) d(f_theta(x + t z, t), sg[f_theta(x + r z, r)]),    f(x, r) = x when r <= sigma_min,

with w(t, r) = 1 / (t - r) (weight_schedule ict) and d the adaptive-weighting distance of ECT's code
(pseudo-Huber with constant c). There is no target network: the r pass is the online network under
stop-gradient with the online pass's dropout masks. Stages advance every so many images or steps, each
shrinking dt / t by q, so the objective moves from diffusion-like (large dt) to consistency (dt -> 0).
The schedule's values are the stage and N(k) = q^(stage + 1), the factor by which dt / t has shrunk.
With --ct_target stf the r pass sees the Euler step from x + t z with the batch's stable target field instead of
x + r z, and the boundary value is that field's x0 (SCT: Wang et al. 2024, ECT with this variance reduction;
cm.modes.consistency).
"""

import torch

from ..flags import flag_rows
from ..nn import append_dims
from ..random_util import DeviceRNG
from ..sampling import euler_step
from .base import QuickstartPlan, TrainingMode, consistency_pair, unweighted, unwrap_ddp
from .consistency import batch_x0_estimate

MAPPINGS = ("sigmoid", "const")


# ----- the mapping r(t) and the stages ----------------------------------------------------------


def ect_num_scales(stage, q):
    """N(k) = q^(stage + 1): the factor by which ECT's dt / t has shrunk at `stage` (dt = t n(t) / N)."""
    return q ** (stage + 1)


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
    """step -> {"ect_stage": stage, "num_scales": q^(stage + 1)}: dt / t shrinks by q each stage (there is no target
    network: the r pass is the online network under stop-gradient).

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

    def values(step):
        stage = stage_of_step(step)
        return {"ect_stage": stage, "num_scales": ect_num_scales(stage, int(ect_q))}

    return values


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


def ect_losses(diffusion, model, x_start, num_scales, model_kwargs=None, mapping="sigmoid", k=8.0, b=1.0, c=0.0, p=0.5,
               t=None, noise=None, rng=None, ct_target="sample"):
    """ECT's loss w(t, r) d(f_theta(x + t z, t), sg[f_theta(x + r z, r)]) with f(x, r) = x for r <= sigma_min.

    t ~ lognormal(diffusion.p_mean, diffusion.p_std) unless given; r = ect_r(t, num_scales, ...); w =
    diffusion.loss_weights(t, r) (ict: 1 / (t - r)); d = adaptive_distance(c, p). Both passes share the noise z and,
    through `rng` (default: the device's), the dropout masks. ct_target "stf" puts the batch's stable target field
    in place of the data point x in the r pass (the module's header). Returns {"loss", "sigma": t, "dt_over_t"},
    per sample.
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
    x_t = x_start + append_dims(t, dims) * noise

    def at_r():
        # the same network at (x + r z, r) with the same dropout masks, at the boundary the data itself; with the
        # stable target field at the Euler step to r from x_t with the field's x0, at the boundary that x0
        x0 = batch_x0_estimate(x_start, x_t, t, model, model_kwargs, ct_target)
        if ct_target == "sample":
            x_r = x_start + append_dims(r, dims) * noise
        else:
            x_r = euler_step(lambda x, sigma: x0, x_t, t, r)
        value = diffusion.denoise(unwrap_ddp(model), x_r, r.clamp(min=diffusion.sigma_min), **model_kwargs)[1]
        return torch.where(append_dims(boundary, dims), x0, value.to(x_start.dtype))

    online, target = consistency_pair(
        rng, online=lambda: diffusion.denoise(model, x_t, t, **model_kwargs)[1], target=at_r,
    )
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
    """ECT bound to the mode's options (flag groups "ect", "ect_schedule" and "ct_target")."""
    options = context.options
    settings = dict(mapping=options["ect_mapping"], k=options["ect_k"], b=options["ect_b"], c=options["ect_c"],
                    p=options["ect_adaptive_p"], ct_target=options.get("ct_target", "sample"))

    def loss(model, x_start, model_kwargs, schedule):
        terms = ect_losses(diffusion, model, x_start, schedule["num_scales"], model_kwargs, **settings)
        return unweighted(terms)

    return loss


# ----- flags and the mode ------------------------------------------------------------------------------------------

FLAGS = (
    *flag_rows(
        "ect",
        ("ect_mapping", "sigmoid", "ECT mapping r = t (1 - n(t) / q^(stage+1)): sigmoid n(t) = 1 + k sigmoid(-b t) "
         "(ECT's), const n(t) = 1; t ~ lognormal(--p_mean, --p_std)", MAPPINGS),
        ("ect_k", 8.0, "ECT sigmoid mapping: k (ECT: 8)", None),
        ("ect_b", 1.0, "ECT sigmoid mapping: b (ECT: 1)", None),
        ("ect_c", 0.0, "ECT distance sqrt(||f_t - f_r||^2 + c^2) - c (pseudo-Huber): c (0: the l2 norm, ECT's "
         "CIFAR-10 setting)", None),
        ("ect_adaptive_p", 0.5, "ECT adaptive weighting (||f_t - f_r||^2 + c^2)^-p: p in [0, 1] (0.5: the "
         "pseudo-Huber distance, ECT's; 0: squared l2; 1: Cauchy, needs ect_c > 0)", None),
    ),
    *flag_rows(
        "ect_schedule",
        ("ect_q", 2, "ECT: dt / t shrinks by this integer factor each stage, N(k) = q^(stage+1) (ECT: 2; its "
         "one-hour run 256)", None),
        ("ect_stage_images", 0, "ECT stage length in images over all ranks (ECT on CIFAR-10: 3200000; 0: not in "
         "images)", None),
        ("ect_stage_steps", 0, "ECT stage length in steps (0: not in steps)", None),
        ("ect_stages", 8, "ECT: number of stages over total_training_steps when no stage length is given", None),
    ),
)

# what every mode on ECT's staged schedule shares (ECT here, TCM's stage 2 in cm.modes.tcm)
ECT_SCHEDULE_ENTRY = dict(uses_distance=False, boundary_condition=True, schedule_groups=("ect_schedule",),
                          make_schedule=create_ect_schedule, schedule_in_images=True)

MODES = (
    TrainingMode(
        name="consistency_tuning",
        description="easy consistency tuning (ECT, Geng et al. 2025) of a pretrained EDM network (cm.modes.ect)",
        bind_loss=bind_ect_loss,
        loss_groups=("ect", "ect_schedule", "ct_target"),
        teacher="required",  # the EDM checkpoint the student starts from; no teacher network runs in the loss
        check_config=check_ect_config,
        **ECT_SCHEDULE_ENTRY,
        flag_defaults=dict(  # ECT's CIFAR-10 run (locuslab/ect run_ecm.sh): batch 128, 200k steps, and with
            weight_schedule="ict",  # the table's 8 stages over the run, 3.2M images per stage
            global_batch_size=128,
            lr=1e-4,
            total_training_steps=200000,
        ),
        quickstart=QuickstartPlan("ect", (("EDM", "digits_edm.yaml", "edm"), ("ECT", "digits_ect.yaml",
                                                                             "consistency_tuning"))),
    ),
)
