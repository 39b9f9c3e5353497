"""Align Your Flow (Sabour, Fidler & Kreis 2025, "Align Your Flow: Scaling continuous-time flow map distillation",
arXiv 2506.14603): Eulerian map distillation, AYF-EMD, of a flow map from an EDM teacher.

On the linear path of cm.flowmap (z_t = (1 - t) x + t e, flow time t in [0, 1], t = 1 pure noise) AYF's flow map is

    f(z_t, t, s) = z_t + (s - t) F(z_t, t, s),   s <= t,

which is MeanFlow's z_s = z_t - (t - s) u(z_t, s, t) with F = u: the network, its FlowMapDenoiser (u = F(z, 1000 t,
second_time=1000 (t - s))) and the flow-map samplers (meanflow, meanflow_onestep) are MeanFlow's, unchanged; AYF's
(t, s) is the library's (t, r). The teacher is an EDM denoiser D(x, sigma), seen as the velocity of the same path,
v_phi(z_t, t) = (z_t - D(z_t / (1 - t), t / (1 - t))) / t (cm.flowmap.velocity_from_denoiser, sigma = t / (1 - t)).

EMD asks f(., t, s) to be constant along the teacher's ODE dz/dt = v_phi. Its tangent, with dF/dt = v_phi d_z F + d_t F
one JVP along (v_phi, 0, 1) of (z, s, t) through the student (float32, no gradients, the online dropout replayed), is

    df/dt = v_phi - F - (t - s) dF/dt,
    g = v_phi - sg(F) - w(k) (t - s) dF/dt                    (w(k) = min(1, k / H): the tangent warm-up, sCM's),
    loss = ||F_theta - sg(F_theta + g / (||g|| + c))||^2       (tangent normalisation, c = 0.1),

whose gradient -2 g / (||g|| + c) . dF_theta/dtheta is the AYF-EMD gradient, that of E[w(t, s) sign(t - s) f_theta^T
df_theta-/dt] (the tangent g = df/dt under stop-gradient, d f_theta = -(t - s) d F_theta), with the weighting
w(t, s) = 2 / (|t - s| (||g|| + c)); NVlabs/FastGen's "opt_grad" flow-map loss takes it the same way. At s = t (or
w(k) = 0) it is the flow-matching gradient towards the teacher, v_phi - F, normalised per sample; at s = 0, continuous-
time consistency distillation on this path. (t, s): two logit-normal draws, t the larger ("pair"), or a logit-normal
gap t - s above a uniform s ("gap"), both with AYF's location -0.8 and scale 1.0.

Autoguidance (AYF, after Karras et al. 2024): with a weaker EDM checkpoint of the same data, the teacher's velocity
is v_weak + w (v_strong - v_weak) (--weak_teacher_model_path, --ayf_guidance_w; off by default).
"""

import torch

from .. import dist_util
from ..checkpoint_io import load_fitting_state_dict
from ..flags import SHARED_FLAGS, flag_rows
from ..flowmap import flow_interpolate, flow_time_to_sigma, per_sample_time, velocity_from_denoiser
from ..networks import create_model
from ..nn import JVP_METHODS, network_jvp
from ..random_util import DeviceRNG
from .base import QuickstartPlan, TrainingMode, consistency_pair, unweighted, unwrap_ddp
from .meanflow import FLOW_MAP_ENTRY, average_velocity_jvp, logit_normal
from .scm import normalize_tangent, scm_schedule

TIME_SAMPLERS = ("pair", "gap")
T_MAX = 1 - 1e-5  # flow times stay below 1, where the teacher's sigma = t / (1 - t) is finite


# ----- times -------------------------------------------------------------------------------------------------------


def sample_times(batch_size, mean=-0.8, std=1.0, sampler="pair", device="cpu"):
    """(s, t), s <= t < 1 [B]: "pair" two logit-normal draws sigmoid(mean + std n), t the larger; "gap" the gap
    t - s logit-normal and s uniform on [0, 1 - gap]."""
    if sampler not in TIME_SAMPLERS:
        raise ValueError(f"ayf_time_sampler must be one of {', '.join(TIME_SAMPLERS)}, got {sampler!r}")
    if std <= 0:
        raise ValueError(f"ayf_time_std must be > 0, got {std}")
    a = logit_normal(batch_size, mean, std, device)
    if sampler == "pair":
        b = logit_normal(batch_size, mean, std, device)
        s, t = torch.minimum(a, b), torch.maximum(a, b)
    else:
        s = torch.rand(batch_size, device=device) * (1 - a)
        t = s + a
    return s.clamp(max=T_MAX), t.clamp(max=T_MAX)


# ----- the teacher -------------------------------------------------------------------------------------------------


def edm_teacher_velocity(teacher_model, teacher_diffusion):
    """v_phi(z_t, t) of an EDM teacher network under its KarrasDenoiser's preconditioning."""
    return velocity_from_denoiser(lambda x, sigma, **kw: teacher_diffusion.denoise(teacher_model, x, sigma, **kw)[1])


def autoguided(strong, weak, w):
    """v = v_weak + w (v_strong - v_weak) (autoguidance; w = 1 is the strong teacher alone)."""

    def velocity(z, t, **model_kwargs):
        v_weak = weak(z, t, **model_kwargs)
        return v_weak + w * (strong(z, t, **model_kwargs) - v_weak)

    return velocity


# ----- the loss ----------------------------------------------------------------------------------------------------


def emd_tangent(v, u, du_dt, s, t, warmup=1.0):
    """g = v - F - w (t - s) dF/dt, the tangent df/dt of the flow map along the teacher's ODE (AYF Sec. 3.1) with the
    warm-up factor w on its JVP term."""
    return v - u - warmup * per_sample_time(t - s, v) * du_dt


def ayf_losses(denoiser, model, x_start, teacher, s=None, t=None, noise=None, model_kwargs=None, warmup=1.0,
               tangent_norm_c=0.1, time_mean=-0.8, time_std=1.0, time_sampler="pair", rng=None, jvp_model=None,
               jvp_fn=network_jvp):
    """The AYF-EMD loss per sample, ||F_theta - sg(F_theta + g / (||g|| + c))||^2 (see the module's header).

    :param denoiser: a cm.flowmap.FlowMapDenoiser (F(z, t, s) = u(z, s, t)).
    :param model: the two-time network (a DistributedDataParallel wrapper or the network); the online pass.
    :param x_start: data x [B, ...].
    :param teacher: v_phi(z, t, **model_kwargs), the teacher's velocity (`edm_teacher_velocity`, `autoguided`).
    :param s, t: flow times [B] with s <= t < 1 (default: `sample_times(time_mean, time_std, time_sampler)`).
    :param noise: e ~ N(0, I) like x (default: drawn).
    :param warmup: the tangent warm-up factor w(k) in [0, 1] on the (t - s) dF/dt term.
    :param tangent_norm_c: c of g / (||g|| + c); None leaves the tangent unnormalised.
    :param rng: a cm.random_util.DeviceRNG; the JVP pass replays the online pass's dropout masks.
    :param jvp_model: the network of the no-gradient JVP pass (default: `model` unwrapped from DDP).
    :param jvp_fn: how dF/dt is taken (--jvp): cm.nn.network_jvp or cm.nn.finite_difference_jvp.
    :return: {"loss", "tangent_norm" (||g||), "sigma" (EDM level of t), "t", "s"}, per sample.
    """
    model_kwargs = model_kwargs or {}
    if t is None:
        s, t = sample_times(x_start.shape[0], time_mean, time_std, time_sampler, x_start.device)
    noise = torch.randn_like(x_start) if noise is None else noise
    z = flow_interpolate(x_start, noise, t)
    with torch.no_grad():
        v = teacher(z, t, **model_kwargs).float()
    jvp_model = unwrap_ddp(model) if jvp_model is None else jvp_model

    # the online F_theta, then dF/dt by one JVP along the teacher's velocity with the same dropout masks
    u, (u_stopped, du_dt) = consistency_pair(
        rng or DeviceRNG(x_start.device),
        online=lambda: denoiser.average_velocity(model, z, s, t, **model_kwargs),
        target=lambda: average_velocity_jvp(denoiser, jvp_model, z, s, t, v, model_kwargs, jvp_fn),
    )
    with torch.no_grad():
        g = emd_tangent(v, u_stopped.float(), du_dt.float(), s.float(), t.float(), warmup)
        tangent_norm = torch.linalg.vector_norm(g.flatten(1), dim=1)
        if tangent_norm_c is not None:
            g = normalize_tangent(g, tangent_norm_c)
    u = u.float()
    loss = (u - (u.detach() + g)).pow(2).flatten(1).sum(dim=1)
    sigma = flow_time_to_sigma(t).clamp(denoiser.sigma_min, denoiser.sigma_max)  # the EDM level of t, for the logs
    return {"loss": loss, "tangent_norm": tangent_norm, "sigma": sigma, "t": t, "s": s}


# ----- the weak teacher, the check and the binder ------------------------------------------------------------------


def load_weak_teacher(path, network_config, device, stochastic=False):
    """The autoguidance's weak EDM network: the teacher's architecture, frozen, on `device`, in eval mode (train mode,
    its dropout active, with a stochastic teacher: --teacher_stochastic)."""
    with torch.random.fork_rng(devices=[]):  # its random initialisation leaves the run's draws as they were
        weak = create_model(**network_config)
    try:
        state_dict = dist_util.load_state_dict(path, map_location="cpu")
    except FileNotFoundError:
        raise FileNotFoundError(f"weak teacher checkpoint {path} does not exist; pass --weak_teacher_model_path "
                                "an EDM checkpoint of the same data (a weaker one than the teacher)") from None
    load_fitting_state_dict(weak, state_dict, path, "weak teacher checkpoint")
    return weak.to(device).train(stochastic).requires_grad_(False)


def check_ayf_config(config):
    """One-line errors, at resolve time (--dry_run too), for an AYF run that cannot train as meant."""
    if not config["network"].get("second_time_embed"):
        raise ValueError("AYF's flow map takes two times (t, t - s): pass --second_time_embed true")
    if config["student_init"] == "teacher":
        raise ValueError("AYF's student outputs a velocity, not the EDM teacher's preconditioned output: it cannot "
                         "start from the teacher's weights; pass --init_from_teacher false")
    options = config["loss"]
    sample_times(1, options["ayf_time_mean"], options["ayf_time_std"], options["ayf_time_sampler"])
    guided, weak = options["ayf_guidance_w"] != 1.0, bool(options["weak_teacher_model_path"])
    if guided != weak:
        raise ValueError("autoguidance needs both --weak_teacher_model_path (a weaker EDM checkpoint of the same "
                         f"data) and --ayf_guidance_w other than 1; got {options['weak_teacher_model_path']!r} and "
                         f"{options['ayf_guidance_w']}")


def bind_ayf_loss(diffusion, context):
    """AYF-EMD bound to a FlowMapDenoiser, the loop's EDM teacher (autoguided by the weak one when given) and the
    "ayf" flags; the schedule gives the tangent warm-up factor w(k) ("tangent_warmup")."""
    options = context.options
    teacher = edm_teacher_velocity(context.teacher_model, context.teacher_diffusion)
    if options["weak_teacher_model_path"]:
        device = next(context.teacher_model.parameters()).device
        teacher_config = context.config["teacher"]
        weak = load_weak_teacher(options["weak_teacher_model_path"], teacher_config["network"], device,
                                 teacher_config["stochastic"])
        teacher = autoguided(teacher, edm_teacher_velocity(weak, context.teacher_diffusion), options["ayf_guidance_w"])
    c = options["ayf_tangent_norm_c"]
    settings = dict(tangent_norm_c=c if c >= 0 else None, time_mean=options["ayf_time_mean"],
                    time_std=options["ayf_time_std"], time_sampler=options["ayf_time_sampler"],
                    jvp_fn=JVP_METHODS[context.config.get("run", {}).get("jvp", SHARED_FLAGS["jvp"].default)])

    def loss(model, x_start, model_kwargs, schedule):
        return unweighted(ayf_losses(diffusion, model, x_start, teacher, model_kwargs=model_kwargs,
                                     warmup=schedule["tangent_warmup"], **settings))

    return loss


# ----- flags and the mode ------------------------------------------------------------------------------------------

FLAGS = (
    *flag_rows(
        "ayf",
        ("ayf_time_sampler", "pair", "AYF (t, s): pair (two logit-normal draws, t the larger) or gap (the gap t - s "
         "logit-normal, s uniform below 1 - gap)", TIME_SAMPLERS),
        ("ayf_time_mean", -0.8, "AYF: location of the logit-normal time sampler, sigmoid(mean + std n) (AYF: -0.8)",
         None),
        ("ayf_time_std", 1.0, "AYF: scale of the logit-normal time sampler (AYF: 1.0)", None),
        ("ayf_tangent_norm_c", 0.1, "AYF: c of the tangent normalisation g / (||g|| + c) (AYF: 0.1; negative: raw "
         "tangent)", None),
        ("weak_teacher_model_path", "", "AYF autoguidance: a weaker EDM checkpoint of the same data, the teacher's "
         "architecture (empty: no autoguidance)", None),
        ("ayf_guidance_w", 1.0, "AYF autoguidance weight w, v = v_weak + w (v_teacher - v_weak) (1: off; needs "
         "--weak_teacher_model_path)", None),
    ),
)

MODES = (
    TrainingMode(
        name="ayf",
        description="Align Your Flow (Sabour et al. 2025): Eulerian flow-map distillation from an EDM teacher by "
        "one JVP, sampled in one or a few jumps (cm.modes.ayf)",
        bind_loss=bind_ayf_loss,
        loss_groups=("ayf",),
        teacher="required",
        teacher_in_loss=True,
        teacher_ode_steps=False,  # the tangent reads the teacher's velocity; no solver steps
        teacher_network=dict(second_time_embed=False),  # the EDM teacher is a one-time network
        schedule_groups=("scm_schedule",),  # the tangent warm-up w(k) = min(1, k / H), --tangent_warmup_steps
        make_schedule=scm_schedule,
        check_config=check_ayf_config,
        **FLOW_MAP_ENTRY,
        flag_defaults=dict(second_time_embed=True, init_from_teacher="false", optimizer="adam", lr=1e-4,
                           ema_rate="0.9999", total_training_steps=400000),
        quickstart=QuickstartPlan("ayf", (("EDM", "digits_edm.yaml", "edm"), ("AYF", "digits_ayf.yaml", "ayf"))),
    ),
)
