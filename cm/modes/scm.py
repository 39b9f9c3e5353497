"""Continuous-time consistency models, sCT and sCD (sCM: Lu & Song 2024, "Simplifying, stabilizing and scaling
continuous-time consistency models"), on TrigFlow (cm.trigflow: x_t = cos(t) x_0 + sin(t) z, z ~ N(0, sigma_d^2),
f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, c_noise(t))).

The objective (Sec. 4.2) trains F_theta against its own stop-gradient copy F_theta- with the tangent
g = cos(t) df_theta-/dt, normalised, under a learned adaptive weighting:

    loss = exp(-u(t)) / D ||F_theta - F_theta- - g / (||g|| + c)||^2 + u(t),
    g = -cos^2(t) (sigma_d F_theta- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF_theta-/dt),

with dx_t/dt = cos(t) z - sin(t) x_0 from the data (sCT) or an EDM teacher's PF-ODE (sCD), dF_theta-/dt one JVP
through the network (cm.nn.network_jvp), r the tangent warm-up factor (the schedule's value "tangent_warmup",
r(k) = min(1, k / H)), t from the lognormal proposal tan(t) sigma_d ~ lognormal(P_mean, P_std), and u(t) the
log-variance head (cm.networks.LogVarianceHead, the network's optional submodule `logvar_head`, so the model's
optimizer trains it, every checkpoint and EMA holds it, and DistributedDataParallel averages its gradients).
There is no target network: the JVP pass is the online network under stop-gradient with the same dropout masks.
"""

import torch

from ..flags import SHARED_FLAGS, flag_rows
from ..guidance import with_guidance
from ..nn import JVP_METHODS, mean_flat, network_jvp
from ..random_util import DeviceRNG
from ..trigflow import (
    TIME_CONDITIONINGS,
    TrigFlowDenoiser,
    per_sample,
    t_to_sigma,
    trigflow_c_noise,
    trigflow_velocity,
    trigflow_x_t,
    velocity_from_denoiser,
)
from .base import QuickstartPlan, TrainingMode, consistency_pair, teacher_guidance_scale, unweighted, unwrap_ddp


# ----- the sCM objective ---------------------------------------------------------------------------


def trigflow_t_lognormal(batch_size, p_mean=-1.0, p_std=1.4, sigma_data=0.5, generator=None, device="cpu"):
    """sCM's proposal: tau = exp(P_mean + P_std n), n ~ N(0, 1), t = arctan(tau / sigma_d); float64 [B]."""
    n = torch.randn(batch_size, dtype=torch.float64, generator=generator).to(device)
    return torch.atan(torch.exp(p_mean + p_std * n) / sigma_data)


def tangent_warmup(step, warmup_steps):
    """Tangent warm-up factor r = min(1, step / warmup_steps) on the sin(t)(x_t + sigma_d dF/dt) term (sCM Sec. 4.2)."""
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    return 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)


def trigflow_jvp(model, x_t, t, dxt_dt, sigma_data=0.5, c_noise_scale=1.0, model_kwargs=None, jvp_fn=network_jvp):
    """(F(x_t / sigma_d, c_noise(t)), cos(t) sin(t) dF/dt) along dx_t/dt by one JVP whose tangents are scaled by
    cos(t) sin(t) (sCM Sec. 5, "JVP rearrangement": keeps the tangent's size bounded, which bf16 needs).

    The scaling is per sample, so F must treat samples independently (GroupNorm, not BatchNorm), as our networks do.
    """
    model_kwargs = model_kwargs or {}
    scale = torch.cos(t) * torch.sin(t)

    def network(x, s):
        return model(x / sigma_data, trigflow_c_noise(s, c_noise_scale), **model_kwargs)

    return jvp_fn(network, (x_t, t), (per_sample(scale, dxt_dt) * dxt_dt, scale))


def scm_tangent(model_output, output_jvp, x_t, dxt_dt, t, sigma_data=0.5, warmup=1.0):
    """g = cos(t) df/dt = -cos^2(t) (sigma_d F - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF/dt) (sCM Sec. 4.2).

    `output_jvp` is cos(t) sin(t) dF/dt (`trigflow_jvp`); r = `warmup` is the tangent warm-up factor (1: the exact
    tangent). cos(t) is the weighting w(t) = 1 / (sigma_d tan t) times the sigma_d sin(t) of f's gradient.
    """
    cos, sin = per_sample(torch.cos(t), x_t), per_sample(torch.sin(t), x_t)
    return -cos * cos * (sigma_data * model_output - dxt_dt) - warmup * (cos * sin * x_t + sigma_data * output_jvp)


def normalize_tangent(g, c=0.1):
    """Tangent normalisation g / (||g||_2 + c) per sample (sCM Sec. 4.2, c = 0.1)."""
    norm = torch.linalg.vector_norm(g, dim=tuple(range(1, g.ndim)), keepdim=True)
    return g / (norm + c)


def scm_losses(
    model,
    x_start,
    t=None,
    noise=None,
    teacher=None,
    model_kwargs=None,
    logvar_head=None,
    sigma_data=0.5,
    c_noise_scale=1.0,
    warmup=1.0,
    tangent_norm_c=0.1,
    scm_p_mean=-1.0,
    scm_p_std=1.4,
    rng=None,
    target_model=None,
    jvp_fn=network_jvp,
):
    """The sCM loss per sample: sCT (teacher None: dx_t/dt = cos(t) z - sin(t) x_0) or sCD (dx_t/dt = teacher(x_t, t)).

    exp(-u(t)) mean((F_theta - F_theta- - g / (||g|| + c))^2) + u(t) with g = cos(t) df_theta-/dt (sCM Sec. 4.2).

    :param model: the network F(x_in, c_noise, **model_kwargs); F_theta- is its stop-gradient value.
    :param x_start: data x_0 [B, ...].
    :param t: TrigFlow times [B] in (0, pi/2) (default: the lognormal proposal with scm_p_mean, scm_p_std).
    :param noise: eps ~ N(0, I) like x_start; z = sigma_d eps (default: drawn).
    :param teacher: sCD's PF-ODE v(x_t, t, **model_kwargs), e.g. `velocity_from_denoiser` of an EDM teacher; None: sCT.
    :param logvar_head: the adaptive weighting's u(t) (a LogVarianceHead trained with the model), or None (u = 0).
    :param warmup: tangent warm-up factor r in [0, 1] (`tangent_warmup(step, warmup_steps)`).
    :param tangent_norm_c: c of the tangent normalisation (0.1); None leaves the tangent unnormalised.
    :param rng: a cm.random_util.DeviceRNG; the JVP pass replays the online pass's dropout.
    :param target_model: the network the JVP pass runs (default `model`): the same weights, e.g. the module inside a
        DistributedDataParallel `model`, so the no-gradient pass skips its hooks.
    :param jvp_fn: how the tangent's dF/dt is taken (--jvp): cm.nn.network_jvp (exact) or cm.nn.finite_difference_jvp.
    :return: {"loss": [B], "mse": [B] (unweighted), "logvar": [B], "t": t, "sigma": sigma_d tan(t)}.
    """
    model_kwargs = model_kwargs or {}
    if t is None:
        t = trigflow_t_lognormal(x_start.shape[0], scm_p_mean, scm_p_std, sigma_data, device=x_start.device)
    t = t.to(device=x_start.device, dtype=x_start.dtype)
    noise = torch.randn_like(x_start) if noise is None else noise

    # noise the data to t; the PF-ODE direction from the data (sCT) or the teacher (sCD)
    z = noise * sigma_data
    x_t = trigflow_x_t(x_start, z, t)
    if teacher is None:
        dxt_dt = trigflow_velocity(x_start, z, t)
    else:
        with torch.no_grad():
            dxt_dt = teacher(x_t, t, **model_kwargs).to(x_t.dtype)

    # the online network F_theta; then F_theta- and its time derivative by one JVP, with the same dropout masks
    target_model = model if target_model is None else target_model
    model_output, (target_output, output_jvp) = consistency_pair(
        rng or DeviceRNG(x_start.device),
        online=lambda: model(x_t / sigma_data, trigflow_c_noise(t, c_noise_scale), **model_kwargs),
        target=lambda: trigflow_jvp(target_model, x_t, t, dxt_dt, sigma_data, c_noise_scale, model_kwargs, jvp_fn),
    )
    with torch.no_grad():
        g = scm_tangent(target_output.to(x_t.dtype), output_jvp.to(x_t.dtype), x_t, dxt_dt, t, sigma_data, warmup)
        if tangent_norm_c is not None:
            g = normalize_tangent(g, tangent_norm_c)

    mse = mean_flat((model_output.to(x_t.dtype) - model_output.detach().to(x_t.dtype) - g) ** 2)
    logvar = logvar_head(t).to(mse.dtype) if logvar_head is not None else torch.zeros_like(mse)
    loss = torch.exp(-logvar) * mse + logvar
    return {"loss": loss, "mse": mse, "logvar": logvar, "t": t, "sigma": t_to_sigma(t, sigma_data)}


def scm_schedule(tangent_warmup_steps, total_steps):
    """step k -> {"tangent_warmup": r(k)}, the tangent warm-up factor r(k) = min(1, k / H) (sCM Alg. 1).

    :param tangent_warmup_steps: H, steps over which r rises from 0 to 1 (0: r = 1 from the start).
    :param total_steps: K (the warm-up does not depend on it).
    """
    del total_steps
    if tangent_warmup_steps < 0:
        raise ValueError(f"tangent_warmup_steps must be >= 0, got {tangent_warmup_steps}")

    def schedule(step):
        return {"tangent_warmup": tangent_warmup(step, tangent_warmup_steps)}

    return schedule


def teacher_velocity(context, sigma_data):
    """sCD's teacher: the PF-ODE v(x_t, t) of the EDM teacher (TrigFlow coordinates; classifier-free guided at
    --teacher_guidance_scale), or None for sCT."""
    if context.teacher_model is None:
        return None
    teacher, edm = context.teacher_model, context.teacher_diffusion
    denoise = with_guidance(lambda x, sigma, **kw: edm.denoise(teacher, x, sigma, **kw)[1], teacher,
                            teacher_guidance_scale(context))
    return velocity_from_denoiser(denoise, sigma_data)


def bind_scm_loss(diffusion, context):
    """sCT / sCD (sCM Alg. 1) bound to a TrigFlowDenoiser and the loop's teacher; the schedule gives the tangent
    warm-up factor r(k). Options (flag group scm_loss): tangent_norm_c (negative: raw tangent), scm_p_mean, scm_p_std.
    """
    options = context.options
    teacher = teacher_velocity(context, diffusion.sigma_data)
    c = options["tangent_norm_c"]
    jvp_fn = JVP_METHODS[context.config.get("run", {}).get("jvp", SHARED_FLAGS["jvp"].default)]

    def loss(model, x_start, model_kwargs, schedule):
        network = unwrap_ddp(model)
        terms = scm_losses(
            diffusion.network(model),
            x_start,
            teacher=teacher,
            model_kwargs=model_kwargs,
            logvar_head=getattr(network, "logvar_head", None),
            sigma_data=diffusion.sigma_data,
            c_noise_scale=diffusion.c_noise_scale,
            warmup=schedule["tangent_warmup"],
            tangent_norm_c=c if c >= 0 else None,
            scm_p_mean=options["scm_p_mean"],
            scm_p_std=options["scm_p_std"],
            target_model=diffusion.network(network),
            jvp_fn=jvp_fn,
        )
        return unweighted(terms)

    return loss


def check_scm_config(config):
    """One line for an sCM configuration that cannot train as meant: a student started from an EDM checkpoint
    needs EDM's time conditioning (the weights expect its c_noise and output sign)."""
    if config["student_init"] == "teacher" and config["denoiser"]["time_conditioning"] != "edm":
        raise ValueError(
            "the student starts from an EDM checkpoint, whose weights expect EDM's time conditioning: pass "
            "--time_conditioning edm, or --init_from_teacher false to train from scratch"
        )


# ----- flags and the modes ------------------------------------------------------------------------------------------

FLAGS = (
    *flag_rows(
        "trigflow",
        ("sigma_data", 0.5, "sCM: data standard deviation sigma_d; x_t = cos(t) x_0 + sin(t) z, z ~ N(0, sigma_d^2), "
         "sigma = sigma_d tan(t)", None),
        ("time_conditioning", "trigflow", "sCM: what the network is fed: trigflow (c_noise(t) = c_noise_scale t, "
         "the paper's) or edm (250 log sigma, its output negated: an EDM checkpoint is an exact TrigFlow model, "
         "to start from; its time derivative is large, as sCM Fig. 4 warns)", TIME_CONDITIONINGS),
        ("c_noise_scale", 1.0, "sCM with time_conditioning trigflow: c_noise(t) = c_noise_scale t (paper: 1)", None),
        scripts=("train", "sample", "edit", "search"),  # TrigFlowDenoiser: every script that loads a model
    ),
    *flag_rows(
        "scm_schedule",
        ("tangent_warmup_steps", 10000, "sCM: steps over which the factor r of the tangent's sin(t) (x_t + "
         "sigma_d dF/dt) term rises from 0 to 1 (0: r = 1)", None),
    ),
    *flag_rows(
        "scm_loss",
        ("tangent_norm_c", 0.1, "sCM: c of the tangent normalisation g / (||g|| + c) (negative: raw tangent)", None),
        ("scm_p_mean", -1.0, "sCM: mean of log(sigma_d tan t) of the lognormal time proposal", None),
        ("scm_p_std", 1.4, "sCM: standard deviation of log(sigma_d tan t) of the time proposal", None),
    ),
)

SCM_ENTRY = dict(  # what sct and scd share: the loss, TrigFlow's denoiser and samplers, the tangent warm-up
    bind_loss=bind_scm_loss,
    loss_groups=("scm_loss",),
    uses_distance=False,
    schedule_groups=("scm_schedule",),
    make_schedule=scm_schedule,
    denoiser_groups=("trigflow",),
    make_denoiser=TrigFlowDenoiser,
    samplers=("trigflow_onestep", "trigflow_twostep"),
    check_config=check_scm_config,
    takes_jvp=True,
)

MODES = (
    TrainingMode(
        name="sct",
        description="continuous-time consistency training, sCT (Lu & Song 2024): TrigFlow, the tangent by one JVP",
        teacher="optional",
        flag_defaults=dict(adaptive_double_norm=True, logvar_channels=128, fp32_time_embedding=True,
                           total_training_steps=400000),
        quickstart=QuickstartPlan("sct", (("sCT", "digits_sct.yaml", "sct"),)),
        **SCM_ENTRY,
    ),
    TrainingMode(
        name="scd",
        description="continuous-time consistency distillation, sCD (Lu & Song 2024), from an EDM teacher",
        teacher="required",
        teacher_in_loss=True,
        guided_teacher=True,
        teacher_ode_steps=False,  # the tangent reads the teacher's velocity; no solver steps
        # the student from scratch: the EDM teacher's weights expect its time input (--time_conditioning edm)
        flag_defaults=dict(init_from_teacher="false", logvar_channels=128, fp32_time_embedding=True,
                           total_training_steps=400000),
        quickstart=QuickstartPlan("scd", (("EDM", "digits_edm.yaml", "edm"), ("sCD", "digits_scd.yaml", "scd"))),
        **SCM_ENTRY,
    ),
)
