"""MeanFlow (Geng, Deng, Bai, Kolter & He 2025, "Mean flows for one-step generative modeling"; code Gsunshine/meanflow
in JAX, Gsunshine/py-meanflow in PyTorch): a flow map trained from scratch, sampled in one or a few jumps.

On the linear path of cm.flowmap (z_t = (1 - t) x + t e, v = e - x, flow time t in [0, 1]) the network gives the
average velocity u_theta(z_t, r, t) over [r, t]. Differentiating (t - r) u = int_r^t v ds in t gives the MeanFlow
identity (Eq. 6), which is the training target:

    u(z_t, r, t) = v(z_t, t) - (t - r) du/dt,     du/dt = v d_z u + d_t u       (total derivative along the path),
    loss = w ||u_theta(z_t, r, t) - sg(u_tgt)||^2,  u_tgt = v - clip(t - r, 0, 1) (v d_z u_theta + d_t u_theta),
    w = 1 / sg((||u_theta - u_tgt||^2 + eps)^p)                                  (adaptive weighting, Sec. 4.3),

with du/dt one JVP of (z, r, t) -> u_theta along the tangent (v, 0, 1) (Eq. 8), run in float32 outside autocast on
the unwrapped network without gradients and with the online pass's dropout masks replayed
(cm.modes.base.consistency_pair); the online pass is a plain forward, so DistributedDataParallel synchronises the
gradients as usual. Times: t and r both from a logit-normal, t = max, r = min, and r = t except on a share `ratio`
of the samples (Sec. 4.3; where r = t the loss is flow matching). There is no target network and no curriculum.

Classifier-free guidance trained into the flow map (MeanFlow's guided target, with its mixing scale kappa): on
labelled samples with t in [t_min, t_max], v is replaced by v_g = w v + k u(z_t, t, t | c) + (1 - w - k)
u(z_t, t, t | null), both u's from the network without gradients; label dropout (--class_dropout_prob, the null
class) trains u(. | null).
"""

import torch

from ..flags import SHARED_FLAGS, flag_rows
from ..guidance import null_label
from ..flowmap import FlowMapDenoiser, flow_interpolate, flow_time_to_sigma, per_sample_time
from ..nn import JVP_METHODS, network_jvp
from ..random_util import DeviceRNG
from .base import QuickstartPlan, TrainingMode, consistency_pair, unweighted, unwrap_ddp


# ----- times -------------------------------------------------------------------------------------------------------


def logit_normal(batch_size, mean, std, device="cpu"):
    """t = sigmoid(mean + std n), n ~ N(0, 1) (MeanFlow's lognorm(mean, std) time sampler) [B]."""
    return torch.sigmoid(mean + std * torch.randn(batch_size, device=device))


def sample_times(batch_size, mean=-0.4, std=1.0, ratio=0.25, device="cpu"):
    """(r, t) of MeanFlow Sec. 4.3: two logit-normal draws, t the larger, r the smaller, and r = t except on a share
    `ratio` of the samples (the ratio of r != t: 0.25 on ImageNet, 0.75 on CIFAR-10)."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"meanflow_ratio (the share of r != t) must lie in [0, 1], got {ratio}")
    a, b = logit_normal(batch_size, mean, std, device), logit_normal(batch_size, mean, std, device)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    distinct = torch.rand(batch_size, device=device) < ratio
    return torch.where(distinct, r, t), t


# ----- the loss ----------------------------------------------------------------------------------------------------


def guided_velocity(denoiser, model, z, t, v, y, null, w=1.0, k=0.0, t_min=0.0, t_max=1.0):
    """v_g = w v + k u(z, t, t | y) + (1 - w - k) u(z, t, t | null) on labelled samples (y != null) with t in
    [t_min, t_max], v elsewhere (MeanFlow's guided target); the u's without gradients."""
    with torch.no_grad():
        u_cond = denoiser.average_velocity(model, z, t, t, y=y).to(v.dtype)
        u_null = denoiser.average_velocity(model, z, t, t, y=torch.full_like(y, null)).to(v.dtype)
    guided = w * v + k * u_cond + (1 - w - k) * u_null
    inside = (y != null) & (t >= t_min) & (t <= t_max)
    return torch.where(per_sample_time(inside, v).bool(), guided, v)


def average_velocity_jvp(denoiser, model, z, r, t, v, model_kwargs=None, jvp_fn=network_jvp):
    """(u(z, r, t), du/dt = v d_z u + d_t u): one JVP along the tangent (v, 0, 1) of (z, r, t) (MeanFlow Eq. 8), in
    float32 outside autocast (a reduced-precision tangent of a 1000 t time input loses its digits); `jvp_fn` is how
    it is taken (--jvp: cm.nn.network_jvp, or cm.nn.finite_difference_jvp, whose step follows t, the last primal)."""
    model_kwargs = model_kwargs or {}

    def u(z_, r_, t_):
        return denoiser.average_velocity(model, z_, r_, t_, **model_kwargs)

    with torch.autocast(z.device.type, enabled=False):
        primals = (z.float(), r.float(), t.float())
        return jvp_fn(u, primals, (v.float(), torch.zeros_like(primals[1]), torch.ones_like(primals[2])))


def meanflow_target(v, du_dt, r, t):
    """u_tgt = v - clip(t - r, 0, 1) du/dt (MeanFlow Eq. 10, before the stop-gradient)."""
    return v - per_sample_time((t - r).clamp(0, 1), v) * du_dt


def adaptive_weighted(squared_error, p=1.0, eps=1e-3):
    """squared_error / sg((squared_error + eps)^p) (MeanFlow Sec. 4.3; p = 0 the plain squared l2 loss)."""
    if p < 0:
        raise ValueError(f"meanflow_adaptive_p must be >= 0, got {p}")
    return squared_error / (squared_error.detach() + eps) ** p


def meanflow_losses(denoiser, model, x_start, r=None, t=None, noise=None, model_kwargs=None, p=1.0, eps=1e-3,
                    time_mean=-0.4, time_std=1.0, ratio=0.25, rng=None, jvp_model=None, guidance=None,
                    jvp_fn=network_jvp):
    """The MeanFlow loss per sample: w ||u_theta(z_t, r, t) - sg(v - (t - r) du/dt)||^2 (Eq. 9-10).

    :param denoiser: a cm.flowmap.FlowMapDenoiser (u = F(z, c(t), second_time=c(t - r))).
    :param model: the two-time network (a DistributedDataParallel wrapper or the network); the online pass.
    :param x_start: data x [B, ...].
    :param r, t: flow times [B] with r <= t (default: `sample_times(time_mean, time_std, ratio)`).
    :param noise: e ~ N(0, I) like x (default: drawn).
    :param p, eps: the adaptive weighting 1 / sg((||.||^2 + eps)^p).
    :param rng: a cm.random_util.DeviceRNG; the JVP pass replays the online pass's dropout masks.
    :param jvp_model: the network of the no-gradient JVP pass (default: `model` unwrapped from DDP).
    :param guidance: None, or {"w", "k", "t_min", "t_max"} of the guided velocity (`guided_velocity`; needs labels y
        and a network with a null class).
    :param jvp_fn: how du/dt is taken (--jvp): cm.nn.network_jvp or cm.nn.finite_difference_jvp.
    :return: {"loss", "mse" (unweighted squared error), "sigma" (EDM level of t), "t", "r"}, per sample.
    """
    model_kwargs = model_kwargs or {}
    if t is None:
        r, t = sample_times(x_start.shape[0], time_mean, time_std, ratio, x_start.device)
    noise = torch.randn_like(x_start) if noise is None else noise
    z = flow_interpolate(x_start, noise, t)
    v = noise - x_start
    jvp_model = unwrap_ddp(model) if jvp_model is None else jvp_model
    if guidance is not None:
        v = guided_velocity(denoiser, jvp_model, z, t, v, model_kwargs["y"], null_label(jvp_model), **guidance)

    # the online u_theta, then du/dt by one JVP without gradients with the same dropout masks
    u, (_, du_dt) = consistency_pair(
        rng or DeviceRNG(x_start.device),
        online=lambda: denoiser.average_velocity(model, z, r, t, **model_kwargs),
        target=lambda: average_velocity_jvp(denoiser, jvp_model, z, r, t, v, model_kwargs, jvp_fn),
    )
    u_target = meanflow_target(v.float(), du_dt, r.float(), t.float()).detach()
    squared = (u.float() - u_target).pow(2).flatten(1).sum(dim=1)
    sigma = flow_time_to_sigma(t).clamp(denoiser.sigma_min, denoiser.sigma_max)  # the EDM level of t, for the logs
    return {"loss": adaptive_weighted(squared, p, eps), "mse": squared.detach(), "sigma": sigma, "t": t, "r": r}


def meanflow_schedule(total_steps):
    """step -> {}: MeanFlow has no curriculum (no target network, no stages, no warm-up of its target)."""
    del total_steps
    return lambda step: {}


def check_meanflow_config(config):
    """One-line errors, at resolve time (--dry_run too), for a MeanFlow run that cannot train: the network must take
    the second time, and the time sampler and weighting must be valid."""
    if not config["network"].get("second_time_embed"):
        raise ValueError("MeanFlow's network takes two times (t, t - r): pass --second_time_embed true")
    options = config["loss"]
    sample_times(1, options["meanflow_time_mean"], options["meanflow_time_std"], options["meanflow_ratio"])
    adaptive_weighted(torch.zeros(1), options["meanflow_adaptive_p"], options["meanflow_eps"])
    if guidance_options(options) is not None and not config["network"].get("null_class"):
        raise ValueError("MeanFlow's guided target (--meanflow_cfg_w / --meanflow_cfg_k) needs a class-conditional "
                         "network with a null class: --class_cond true --null_class true --class_dropout_prob 0.1")
    if options["meanflow_time_std"] <= 0 or options["meanflow_eps"] <= 0:
        raise ValueError("meanflow_time_std and meanflow_eps must be > 0, got "
                         f"{options['meanflow_time_std']} and {options['meanflow_eps']}")


def guidance_options(options):
    """The guided velocity's settings from the flag values, or None when w = 1 and k = 0 (no guidance)."""
    if (options["meanflow_cfg_w"], options["meanflow_cfg_k"]) == (1.0, 0.0):
        return None
    return dict(w=options["meanflow_cfg_w"], k=options["meanflow_cfg_k"], t_min=options["meanflow_cfg_t_min"],
                t_max=options["meanflow_cfg_t_max"])


def bind_meanflow_loss(diffusion, context):
    """MeanFlow bound to a FlowMapDenoiser and the mode's options (flag group "meanflow")."""
    options = context.options
    settings = dict(p=options["meanflow_adaptive_p"], eps=options["meanflow_eps"],
                    time_mean=options["meanflow_time_mean"], time_std=options["meanflow_time_std"],
                    ratio=options["meanflow_ratio"], guidance=guidance_options(options),
                    jvp_fn=JVP_METHODS[context.config.get("run", {}).get("jvp", SHARED_FLAGS["jvp"].default)])

    def loss(model, x_start, model_kwargs, schedule):
        return unweighted(meanflow_losses(diffusion, model, x_start, model_kwargs=model_kwargs, **settings))

    return loss


# ----- flags and the mode ------------------------------------------------------------------------------------------

FLAGS = (
    *flag_rows(
        "meanflow",
        ("meanflow_time_mean", -0.4, "MeanFlow: mean of the logit-normal time sampler, t = sigmoid(mean + std n) "
         "(ImageNet: -0.4; CIFAR-10: -2.0)", None),
        ("meanflow_time_std", 1.0, "MeanFlow: standard deviation of the logit-normal time sampler (ImageNet: 1.0; "
         "CIFAR-10: 2.0)", None),
        ("meanflow_ratio", 0.25, "MeanFlow: share of samples with r != t, the rest train flow matching (ImageNet: "
         "0.25; CIFAR-10: 0.75)", None),
        ("meanflow_adaptive_p", 1.0, "MeanFlow adaptive weighting 1 / sg((||u - u_tgt||^2 + eps)^p): p (ImageNet: 1; "
         "CIFAR-10: 0.75; 0: squared l2)", None),
        ("meanflow_eps", 1e-3, "MeanFlow adaptive weighting: eps", None),
        ("meanflow_cfg_w", 1.0, "MeanFlow guidance trained into the target, v_g = w v + k u(c) + (1 - w - k) "
         "u(null): w (1 with k 0: no guidance; needs --class_cond, --null_class, --class_dropout_prob)", None),
        ("meanflow_cfg_k", 0.0, "MeanFlow guidance: k, the weight of the network's own conditional velocity", None),
        ("meanflow_cfg_t_min", 0.0, "MeanFlow guidance: applied for t in [t_min, t_max]", None),
        ("meanflow_cfg_t_max", 1.0, "MeanFlow guidance: t_max", None),
    ),
)

# what every flow-map mode's entry shares (MeanFlow here, AYF in cm.modes.ayf)
FLOW_MAP_ENTRY = dict(uses_distance=False, denoiser_groups=(), make_denoiser=FlowMapDenoiser,
                      samplers=("meanflow_onestep", "meanflow"), takes_jvp=True)

MODES = (
    TrainingMode(
        name="meanflow",
        description="MeanFlow (Geng et al. 2025): a flow map u(z, r, t) from scratch by one JVP, sampled in one or "
        "a few jumps (cm.modes.meanflow)",
        bind_loss=bind_meanflow_loss,
        loss_groups=("meanflow",),
        schedule_groups=(),
        make_schedule=meanflow_schedule,
        check_config=check_meanflow_config,
        **FLOW_MAP_ENTRY,
        flag_defaults=dict(second_time_embed=True, optimizer="adam", lr=6e-4, ema_rate="0.9999",
                           total_training_steps=800000),
        quickstart=QuickstartPlan("meanflow", (("MeanFlow", "digits_meanflow.yaml", "meanflow"),)),
    ),
)
