"""Consistency mid-training (CMT: Hu et al., "Consistency mid-training", ICLR 2026; code sony/cmt).

A cheap stage between a diffusion teacher and consistency post-training (ECT, cm.modes.ect). The frozen EDM teacher
D_phi (which also initialises the student) solves the PF ODE from pure noise with a multistep solver,

    x_(t_0) = x + t_0 z,   x_(t_(i+1)) = DPM-Solver++(2M) step of D_phi,   t_i equally spaced in log-SNR from
    t_0 = sigma_max (80) to t_N = sigma_min (0.002), N = cmt_solver_steps (sony/cmt: 16),

and the student f_theta (the consistency scalings, f(x, sigma_min) = x) regresses every point of that trajectory
onto its end, x0_hat = x_(t_N):

    loss = (1 / N) sum_(i < N) d(f_theta(x_(t_i), t_i), x0_hat),

with d the denoiser's distance (--loss_norm; sony/cmt: LPIPS on CIFAR-10). There is no stop-gradient target and no
target network: the target is the teacher's ODE solution, fixed for the whole step. As in sony/cmt, a batch of B
images gives max(1, B // N) trajectories, so the student sees N points of each (about B points per step).
The mid-trained checkpoint then starts ECT (training_mode consistency_tuning) with a fixed small dt (large --ect_q).
"""

import torch

from ..flags import flag_rows
from ..nn import append_dims
from ..sampling import dpmpp_2m_states, logsnr_sigmas, make_denoiser
from .base import QuickstartPlan, TrainingMode, unweighted


def create_cmt_schedule(cmt_solver_steps, total_steps=0):
    """step -> {"solver_steps": N}: the teacher's number of DPM-Solver++ steps, fixed over the run."""
    if int(cmt_solver_steps) != cmt_solver_steps or cmt_solver_steps < 1:
        raise ValueError(f"cmt_solver_steps must be an integer >= 1, got {cmt_solver_steps}")
    return lambda step: {"solver_steps": int(cmt_solver_steps)}


def teacher_trajectory(denoiser, x_T, sigmas, lower_order_final=True):
    """(the states at sigmas[0..N-1] stacked time-major as [N * B, ...], the end x_(t_N) [B, ...]): the teacher's
    DPM-Solver++(2M) trajectory from x_T, the same states cm.sampling.sample_dpmpp_2m walks."""
    with torch.no_grad():
        states = list(dpmpp_2m_states(denoiser, x_T, sigmas, lower_order_final))
    return torch.cat(states[:-1]), states[-1]


def repeat_batch(value, times):
    """A per-sample tensor tiled `times` times along the batch (the label of trajectory point k * B + b is b's)."""
    return value.repeat(times, *([1] * (value.ndim - 1)))


def cmt_losses(diffusion, model, x_start, solver_steps, teacher_model, teacher_diffusion, model_kwargs=None,
               lower_order_final=True, noise=None):
    """CMT's loss (1 / N) sum_i d(f_theta(x_(t_i), t_i), x0_hat) over the teacher's trajectory (sony/cmt's
    DPMSolverLoss). Returns {"loss", "sigma"} per trajectory point: N points of each of max(1, B // N) images."""
    model_kwargs = {} if model_kwargs is None else model_kwargs
    n = solver_steps
    images = max(1, x_start.shape[0] // n)
    x = x_start[:images]
    kwargs = {k: v[:images] for k, v in model_kwargs.items()}
    noise = torch.randn_like(x) if noise is None else noise
    sigmas = logsnr_sigmas(n, diffusion.sigma_min, diffusion.sigma_max, device=x.device)

    # the teacher solves the PF ODE from x + sigma_max z (no clamping: the solver's own result)
    teacher = make_denoiser(teacher_diffusion, teacher_model, clip_denoised=False, model_kwargs=kwargs)
    points, end = teacher_trajectory(teacher, x + sigmas[0].item() * noise, sigmas, lower_order_final)

    # the student maps every point of the trajectory onto its end
    t = sigmas[:-1].repeat_interleave(images).to(x.dtype)
    student = diffusion.denoise(model, points, t, **{k: repeat_batch(v, n) for k, v in kwargs.items()})[1]
    loss = diffusion.distance(student, repeat_batch(end, n).to(student.dtype))
    return {"loss": loss, "sigma": t}


def check_cmt_config(config):
    """One-line errors, at resolve time, for CMT options that cannot train."""
    create_cmt_schedule(**config["schedule"])
    if config["teacher"] is not None and config["teacher"]["stochastic"]:
        raise ValueError("CMT's teacher solves the PF ODE deterministically: leave --teacher_stochastic false")


def bind_cmt_loss(diffusion, context):
    """CMT bound to the loop's frozen teacher and the "cmt" flag group."""
    lower_order_final = context.options["cmt_lower_order_final"]

    def loss(model, x_start, model_kwargs, schedule):
        terms = cmt_losses(diffusion, model, x_start, schedule["solver_steps"], context.teacher_model,
                           context.teacher_diffusion, model_kwargs, lower_order_final)
        return unweighted(terms)

    return loss


# ----- flags and the mode ------------------------------------------------------------------------------------------

FLAGS = (
    *flag_rows(
        "cmt_schedule",
        ("cmt_solver_steps", 16, "CMT: DPM-Solver++(2M) steps of the teacher's trajectory, log-SNR spaced from "
         "sigma_max to sigma_min (sony/cmt: 16); a batch of B images gives B // N trajectories of N points", None),
    ),
    *flag_rows(
        "cmt",
        ("cmt_lower_order_final", True, "CMT: the teacher solver's last step is first order (sony/cmt's DPM-Solver++)",
         None),
    ),
)

MODES = (
    TrainingMode(
        name="cmt",
        description="consistency mid-training (CMT, Hu et al. 2026): the student maps every point of the EDM "
        "teacher's DPM-Solver++ trajectory onto its end; then ECT (cm.modes.cmt)",
        bind_loss=bind_cmt_loss,
        loss_groups=("cmt",),
        teacher="required",  # the EDM checkpoint: it solves the ODE and initialises the student
        teacher_in_loss=True,
        teacher_ode_steps=False,  # its solver is DPM-Solver++(2M) (--cmt_solver_steps), not --teacher_solver
        boundary_condition=True,  # the scalings of the consistency model ECT then tunes
        schedule_groups=("cmt_schedule",),
        make_schedule=create_cmt_schedule,
        check_config=check_cmt_config,
        flag_defaults=dict(  # sony/cmt run_cmt_cifar.sh: RAdam, lr 2e-4, batch 128, EMA 0.999, LPIPS
            global_batch_size=128,
            lr=2e-4,
            ema_rate="0.999",
            loss_norm="lpips",
            total_training_steps=300000,  # 38.4M images
        ),
        quickstart=QuickstartPlan("cmt", (("EDM", "digits_edm.yaml", "edm"), ("CMT", "digits_cmt.yaml", "cmt"),
                                          ("ECT", "digits_cmt_ect.yaml", "consistency_tuning"))),
    ),
)
