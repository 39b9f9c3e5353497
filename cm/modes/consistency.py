"""Consistency distillation and training (CM paper: Song, Dhariwal, Chen & Sutskever 2023, Alg. 2 and 3) and
progressive distillation (Salimans & Ho 2022) on the Karras grid.

Notation: the N-point grid t_0 = sigma_max > ... > t_(N-1) = sigma_min, x_t = x + t z, and the consistency
function f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t)) with f(x, sigma_min) = x. One step:

    n ~ U{0..N-2} (or iCT's lognormal over the grid),   x_n = x + t_n z,
    CD: x_hat = one Heun (or Euler) step of the teacher's PF-ODE from (x_n, t_n) to t_(n+1)
    CT: x_hat = x + t_(n+1) z                              (the exact step for the same z)
    loss = lambda(t_n) d(f_theta(x_n, t_n), f_theta-(x_hat, t_(n+1))),

CT's x_hat is an Euler step whose x0-estimate is the one data point x that made x_n. With --ct_target stf it is
an Euler step with the stable target field instead (STF: Xu et al. 2023, Eq. 5; SCT: Wang et al. 2024), the
posterior mean of x0 over the batch's data points x_j (of the same class, for a class-conditional model):

    x0_hat(x_n, t_n) = sum_j w_j x_j,   w = softmax_j(-||x_n - x_j||^2 / (2 t_n^2)),
    x_hat = x_n + (t_(n+1) - t_n) (x_n - x0_hat) / t_n,

which is CT's x_hat when all the weight is on x (small t_n) and has less variance where it is not.

with theta- the target network, an EMA of theta with decay mu(k), and N(k), mu(k) from cm.schedules (the CM
paper's fixed / progressive / adaptive schedules, iCT's exponential curriculum). Progressive distillation
trains one student step t -> t_next to land where two teacher Euler steps land, halving N each stage.
"""

from functools import partial

import torch

from ..errors import check_choice
from ..guidance import guided_denoiser
from ..nn import append_dims
from ..random_util import DeviceRNG
from ..sampling import euler_step, heun_step
from ..schedules import create_ema_and_scales_fn
from .base import QuickstartPlan, TrainingMode, consistency_pair, teacher_guidance_scale, unweighted, unwrap_ddp

TEACHER_SOLVERS = {"heun": heun_step, "euler": euler_step}
DEFAULT_TEACHER_SOLVER = "heun"  # the --teacher_solver default: the CM paper's Heun step
CT_TARGETS = ("sample", "stf")  # --ct_target: the CM paper's one-sample x0, or the batch's stable target field


# ----- the schedule ---------------------------------------------------------------------------------------------


def named_schedule(ema_scale_fn):
    """The reference's step -> (mu(k), N(k)) as named values, {"target_ema": mu(k), "num_scales": N(k)}."""

    def values(step):
        target_ema, num_scales = ema_scale_fn(step)
        return {"target_ema": target_ema, "num_scales": num_scales}

    return values


def consistency_schedule(**schedule):
    """step -> {"target_ema": mu(k), "num_scales": N(k)} (cm.schedules.create_ema_and_scales_fn's arguments)."""
    return named_schedule(create_ema_and_scales_fn(**schedule))


# ----- the stable target field ----------------------------------------------------------------------------------


def stable_target_x0(x_t, t, x_ref, labels=None, ref_labels=None, null_label=None):
    """STF's x0-estimate (Xu et al. 2023, Eq. 5): sum_j w_j x_ref_j with w = softmax_j(-||x_t - x_ref_j||^2 / (2 t^2))
    per row of x_t, over the references of the row's class when labels are given (all of them for rows whose label
    is null_label, the unconditional model's). Computed in float32 as softmax_j((x_t . x_j - ||x_j||^2 / 2) / t^2),
    the same weights without the ||x_t||^2 that every j shares.

    :param x_t: [B, ...] noised data; t: [B] its noise levels.
    :param x_ref: [R, ...] the data points (a row of x_t made from x_ref_i should find it among them).
    :param labels, ref_labels: [B] and [R] integer classes, or None for an unconditional model; every row needs a
        reference of its class (its own data point does), else its weights are undefined (NaN).
    """
    with torch.autocast(x_t.device.type, enabled=False):  # float32 products: the logits' differences are small
        queries, refs = x_t.float().flatten(1), x_ref.float().flatten(1)
        logits = (queries @ refs.T - 0.5 * refs.pow(2).sum(dim=1)) / t.float().pow(2)[:, None]
        if labels is not None:
            allowed = labels[:, None] == ref_labels[None, :]
            if null_label is not None:
                allowed = allowed | (labels == null_label)[:, None]
            logits = logits.masked_fill(~allowed, float("-inf"))
        return (torch.softmax(logits, dim=1) @ refs).view_as(x_t).to(x_t.dtype)


def batch_x0_estimate(x_start, x_t, t, model, model_kwargs, ct_target):
    """The x0 that CT's target step uses: the data point itself ("sample", the CM paper's) or the stable target
    field over the batch ("stf", stable_target_x0 with the batch as references and its labels "y", if any)."""
    check_choice("ct_target", ct_target, CT_TARGETS)
    if ct_target == "sample":
        return x_start
    labels = model_kwargs.get("y")
    null_label = getattr(unwrap_ddp(model), "null_label", None)
    return stable_target_x0(x_t, t, x_start, labels, labels, null_label)


# ----- the losses -----------------------------------------------------------------------------------------------


def denoiser_of(diffusion, model, model_kwargs, guidance=1.0):
    """x -> D(x, sigma) of `model` under `diffusion`'s scalings, classifier-free guided at `guidance` (cm.guidance;
    1: the conditional model)."""
    return guided_denoiser(lambda x, t, **kw: diffusion.denoise(model, x, t, **kw)[1], model, model_kwargs, guidance)


def consistency_losses(diffusion, model, x_start, num_scales, model_kwargs=None, target_model=None, teacher_model=None,
                       teacher_diffusion=None, noise=None, teacher_solver=DEFAULT_TEACHER_SOLVER, rng=None,
                       teacher_guidance=1.0, ct_target="sample"):
    """CD (CM paper Alg. 2) with a teacher, CT (Alg. 3) without: lambda(t_n) d(f_theta(x_n, t_n),
    f_theta-(x_hat, t_(n+1))). The target pass replays the online pass's dropout randomness (`rng`, a
    cm.random_util.DeviceRNG; default the device's). CD's teacher step runs the classifier-free-guided teacher
    D_u + w (D_c - D_u) for teacher_guidance w != 1 (cm.guidance). CT's step takes the data point itself as x0
    (ct_target "sample") or the batch's stable target field ("stf"; the module's header).
    Returns {"loss": [B], "sigma": t_n}."""
    if target_model is None:
        raise ValueError("consistency_losses needs a target_model (the EMA / stop-gradient network)")
    check_choice("teacher_solver", teacher_solver, tuple(TEACHER_SOLVERS))
    check_choice("ct_target", ct_target, CT_TARGETS)
    model_kwargs = {} if model_kwargs is None else model_kwargs
    noise = torch.randn_like(x_start) if noise is None else noise
    dims = x_start.ndim

    # adjacent noise levels t_n > t_(n+1), the data noised to t_n
    t, t_next = diffusion.sample_adjacent_sigmas(num_scales, x_start.shape[0], x_start.device, x_start.dtype)
    x_t = x_start + noise * append_dims(t, dims)

    def step_to_t_next():
        # one ODE step to t_(n+1): the teacher's (CD), the exact one for the same noise (CT), or CT's with the
        # batch's stable target field
        if teacher_model is None and ct_target == "sample":
            return x_start + noise * append_dims(t_next, dims)
        if teacher_model is None:
            x0 = batch_x0_estimate(x_start, x_t, t, model, model_kwargs, ct_target)
            return euler_step(lambda x, sigma: x0, x_t, t, t_next)
        teacher = denoiser_of(teacher_diffusion or diffusion, teacher_model, model_kwargs, teacher_guidance)
        return TEACHER_SOLVERS[teacher_solver](teacher, x_t, t, t_next)

    online, target = consistency_pair(
        rng or DeviceRNG(x_start.device),
        online=lambda: diffusion.denoise(model, x_t, t, **model_kwargs)[1],
        target=lambda x_next: diffusion.denoise(target_model, x_next, t_next, **model_kwargs)[1],
        target_input=step_to_t_next,
    )
    loss = diffusion.distance(online, target) * diffusion.loss_weights(t, t_next)
    return {"loss": loss, "sigma": t}


def progdist_losses(diffusion, model, x_start, num_scales, model_kwargs=None, teacher_model=None,
                    teacher_diffusion=None, noise=None):
    """Progressive distillation (Salimans & Ho 2022) on the Karras grid: with t, t_mid, t_next at grid indices n,
    n + 1/2, n + 1 of a num_scales-step grid, the teacher takes two Euler (DDIM) steps t -> t_mid -> t_next; the
    student's target is the x0 whose single Euler step from (x_t, t) lands on the same point.
    Returns {"loss": [B], "sigma": t}."""
    if teacher_model is None:
        raise ValueError("progdist_losses needs a teacher_model")
    model_kwargs = {} if model_kwargs is None else model_kwargs
    noise = torch.randn_like(x_start) if noise is None else noise
    dims = x_start.ndim

    indices = torch.randint(0, num_scales, (x_start.shape[0],), device=x_start.device)

    def grid(i):
        return diffusion.karras_sigmas(i, num_scales + 1).to(x_start.dtype)

    t, t_mid, t_next = grid(indices), grid(indices + 0.5), grid(indices + 1)
    x_t = x_start + noise * append_dims(t, dims)

    denoised = diffusion.denoise(model, x_t, t, **model_kwargs)[1]
    with torch.no_grad():
        # two teacher Euler steps, then the x0 that one step from (x_t, t) would need
        teacher = denoiser_of(teacher_diffusion or diffusion, teacher_model, model_kwargs)
        x_mid = euler_step(teacher, x_t, t, t_mid)
        x_next = euler_step(teacher, x_mid, t_mid, t_next)
        target = x_t - append_dims(t, dims) * (x_next - x_t) / append_dims(t_next - t, dims)

    loss = diffusion.distance(denoised, target) * diffusion.loss_weights(t)
    return {"loss": loss, "sigma": t}


# ----- binders and the modes ------------------------------------------------------------------------------------


def grid_loss(method):
    """A bound loss on the schedule's grid: method(model, x, N(k), model_kwargs=...) per micro-batch, weights one."""

    def loss(model, x_start, model_kwargs, schedule):
        return unweighted(method(model, x_start, schedule["num_scales"], model_kwargs=model_kwargs))

    return loss


def bind_consistency_loss(diffusion, context):
    """CD (the loop has a teacher) or CT (none), bound to the loop's target, teacher and solver, through the
    denoiser's `consistency_losses` (the reference's method, which a subclass may override)."""
    return grid_loss(partial(diffusion.consistency_losses, target_model=context.target_model,
                             teacher_model=context.teacher_model, teacher_diffusion=context.teacher_diffusion,
                             teacher_solver=context.teacher_solver or DEFAULT_TEACHER_SOLVER,
                             teacher_guidance=teacher_guidance_scale(context),
                             ct_target=context.options.get("ct_target", "sample")))


def bind_progdist_loss(diffusion, context):
    """Progressive distillation bound to the loop's teacher (the previous stage's student), through the denoiser's
    `progdist_losses`."""
    return grid_loss(partial(diffusion.progdist_losses, teacher_model=context.teacher_model,
                             teacher_diffusion=context.teacher_diffusion))


# the reference's flags configure these modes (cm.flags: denoiser, schedule, teacher groups), and CT's --ct_target,
# which cm.flags declares from CT_TARGETS (cm.flags imports this module, so the row cannot live here)
FLAGS = ()

# what CD and CT share: the loss, a target network, the boundary-condition scalings, the mu(k) / N(k) schedule
CONSISTENCY_ENTRY = dict(bind_loss=bind_consistency_loss, target=True, boundary_condition=True,
                         make_schedule=consistency_schedule)

MODES = (
    TrainingMode(
        name="consistency_distillation",
        description="consistency distillation from an EDM teacher (CM paper Alg. 2)",
        teacher="required",
        teacher_in_loss=True,
        guided_teacher=True,
        **CONSISTENCY_ENTRY,
        quickstart=QuickstartPlan("cd", (("EDM", "digits_edm.yaml", "edm"),
                                         ("CD", "digits_cd.yaml", "consistency_distillation"))),
    ),
    TrainingMode(
        name="consistency_training",
        description="consistency training from data alone (CM paper Alg. 3)",
        teacher="optional",
        loss_groups=("ct_target",),
        **CONSISTENCY_ENTRY,
        flag_defaults=dict(target_ema_mode="adaptive", scale_mode="progressive", start_ema=0.95, start_scales=2,
                           end_scales=200, total_training_steps=800000),
        quickstart=QuickstartPlan("ct", (("CT", "digits_ct.yaml", "consistency_training"),)),
    ),
    TrainingMode(
        name="progdist",
        description="progressive distillation (Salimans & Ho 2022) on the Karras grid",
        bind_loss=bind_progdist_loss,
        teacher="required",
        teacher_in_loss=True,
        promotes_student=True,
        make_schedule=consistency_schedule,
    ),
)
