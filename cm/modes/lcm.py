"""Latent consistency models (Luo et al. 2023, "Latent Consistency Models: Synthesizing High-Resolution Images
with Few-Step Inference"), on our EDM noise levels.

LCM distils a classifier-free-guided teacher into a few-step consistency model:

* guidance-augmented PF-ODE: the teacher's denoiser is D_w = D_u + w (D_c - D_u) (cm.guidance; LCM's omega is
  w - 1), w ~ U[w_min, w_max] per sample, and the student f_theta(x, sigma, y, w) takes w through an embedding
  (the UNet's `guidance_embed`);
* skipping step k: on the N-point Karras grid the teacher jumps from t_n to t_(n+k) in one solver step (DDIM is
  the Euler step here), and the student is made consistent across that jump;
* LCM's boundary scalings f = c_skip x + c_out D_theta(x) (KarrasDenoiser boundary_scalings "lcm");
* Huber or l2 distance (loss_norm huber / pseudo-huber / l2), a target network updated by EMA (start_ema).

LCF (latent consistency fine-tuning) trains an LCM on new data with the same loss and no teacher: both ends of
the jump are the data noised with the same z, as in consistency training (CM paper Alg. 3).
"""

from functools import partial

import torch

from ..flags import flag_rows
from ..guidance import guided_denoiser, null_label, takes_guidance
from ..karras_diffusion import KarrasDenoiser
from ..nn import append_dims
from ..random_util import DeviceRNG
from .base import TrainingMode, consistency_pair
from .consistency import TEACHER_SOLVERS, consistency_schedule, grid_loss

LCM_TEACHER_SOLVER = "euler"  # LCM's DDIM step


def sample_skip_sigmas(diffusion, num_scales, skip, batch_size, device, dtype=torch.float32):
    """Draw n in {0..N-1-k} and return (t_n, t_(n+k)): grid points k apart with t_n > t_(n+k) (LCM's skipping step)."""
    if skip < 1 or num_scales < skip + 1:
        raise ValueError(f"the skipping step k must be >= 1 and fit the grid (N >= k + 1), got k={skip}, N={num_scales}")
    indices = torch.randint(0, num_scales - skip, (batch_size,), device=device)
    return diffusion.karras_sigmas(indices, num_scales).to(dtype), diffusion.karras_sigmas(indices + skip, num_scales).to(dtype)


def sample_guidance_scales(batch_size, w_min, w_max, device):
    """w ~ U[w_min, w_max] per sample (LCM Alg. 1); the number w_min when the range is a point."""
    if w_min == w_max:
        return float(w_min)
    return w_min + (w_max - w_min) * torch.rand(batch_size, device=device)


def teacher_jump(denoiser, x, t, t_next, solver=LCM_TEACHER_SOLVER):
    """One solver step of the (guided) PF-ODE from t_n to t_(n+k) (LCM's skipping-step teacher; euler = DDIM)."""
    return TEACHER_SOLVERS[solver](denoiser, x, t, t_next)


def lcm_losses(
    diffusion,
    model,
    x_start,
    num_scales,
    model_kwargs=None,
    target_model=None,
    teacher_model=None,
    teacher_diffusion=None,
    skip_steps=1,
    w_min=1.0,
    w_max=1.0,
    teacher_solver=LCM_TEACHER_SOLVER,
    noise=None,
    rng=None,
):
    """LCM distillation (Luo et al. 2023, Alg. 1) with a teacher; LCF without one.

    loss = lambda(t_n) d(f_theta(x_(t_n), t_n, w), f_theta-(x_hat_(t_(n+k)), t_(n+k), w)), where x_hat is one guided
    teacher step over k grid intervals from x_(t_n) (LCM), or x + t_(n+k) z (LCF). The target pass replays the
    online pass's dropout randomness. Returns {"loss": [B], "sigma": t_n}.
    """
    if target_model is None:
        raise ValueError("lcm_losses needs a target_model (the EMA network)")
    model_kwargs = {} if model_kwargs is None else model_kwargs
    noise = torch.randn_like(x_start) if noise is None else noise

    # noise levels k grid points apart, a guidance scale per sample, the data noised to t_n
    t, t_next = sample_skip_sigmas(diffusion, num_scales, skip_steps, x_start.shape[0], x_start.device, x_start.dtype)
    w = sample_guidance_scales(x_start.shape[0], w_min, w_max, x_start.device)
    student_kwargs = model_kwargs
    if takes_guidance(model):
        student_kwargs = {**model_kwargs, "guidance": w if torch.is_tensor(w) else x_start.new_full(t.shape, w)}
    x_t = x_start + noise * append_dims(t, x_start.ndim)

    def jump():
        # the guided teacher jumps k grid steps (LCM), or the same noise at t_(n+k) (LCF)
        if teacher_model is None:
            return x_start + noise * append_dims(t_next, x_start.ndim)
        teacher = teacher_diffusion or diffusion

        def denoise(x, sigma, **kwargs):
            return teacher.denoise(teacher_model, x, sigma, **kwargs)[1]

        return teacher_jump(guided_denoiser(denoise, teacher_model, model_kwargs, w), x_t, t, t_next, teacher_solver)

    # the consistency function at (x_(t_n), t_n, w) and the target at (x_next, t_(n+k), w), same dropout masks
    online, target = consistency_pair(
        rng or DeviceRNG(x_start.device),
        online=lambda: diffusion.denoise(model, x_t, t, **student_kwargs)[1],
        target=lambda x_next: diffusion.denoise(target_model, x_next, t_next, **student_kwargs)[1],
        target_input=jump,
    )
    loss = diffusion.distance(online, target) * diffusion.loss_weights(t, t_next)
    return {"loss": loss, "sigma": t}


def check_lcm_options(config):
    """One-line errors for LCM / LCF options that cannot train, from the resolved configuration."""
    options, network = config["loss"], config["network"]
    if options["skip_steps"] < 1:
        raise ValueError(f"--skip_steps must be >= 1, got {options['skip_steps']}")
    if not 0 <= options["w_min"] <= options["w_max"]:
        raise ValueError(f"need 0 <= --w_min <= --w_max, got {options['w_min']} and {options['w_max']}")
    if options["w_min"] != options["w_max"] and not network.get("guidance_embed"):
        raise ValueError("a range of guidance scales (--w_min < --w_max) needs --guidance_embed true: the student "
                         "must be told w")
    guided = (options["w_min"], options["w_max"]) != (1.0, 1.0)
    teacher = config.get("teacher")
    if guided and teacher is not None and teacher["in_loss"] and not (network["class_cond"] and network.get("null_class")):
        raise ValueError("a guided teacher (--w_min/--w_max other than 1) needs a class-conditional teacher with a null "
                         "class: --class_cond true --null_class true")


def bind_lcm_loss(diffusion, context):
    """The LCM (teacher in the loss) or LCF (none) loss bound to the loop's networks and the lcm flag group."""
    options = context.options
    guided = (options["w_min"], options["w_max"]) != (1.0, 1.0)
    if guided and context.teacher_model is not None:
        null_label(context.teacher_model)  # a teacher without a null class stops here, in one line
    return grid_loss(partial(
        lcm_losses,
        diffusion,
        target_model=context.target_model,
        teacher_model=context.teacher_model,
        teacher_diffusion=context.teacher_diffusion,
        skip_steps=options["skip_steps"],
        w_min=options["w_min"],
        w_max=options["w_max"],
        teacher_solver=context.teacher_solver or LCM_TEACHER_SOLVER,
    ))


def lcm_denoiser(**denoiser_config):
    """KarrasDenoiser with LCM's boundary-condition scalings (c_skip x + c_out D(x), f(x, sigma_min) = x)."""
    return KarrasDenoiser(**denoiser_config, distillation=True, boundary_scalings="lcm")


# ----- flags and the modes ------------------------------------------------------------------------------------------

FLAGS = (
    *flag_rows(
        "lcm",
        ("skip_steps", 1, "LCM skipping step k: the teacher jumps from grid index n to n + k in one solver step", None),
        ("w_min", 1.0, "LCM: smallest guidance scale w drawn per sample (1 = conditional teacher, no guidance)", None),
        ("w_max", 1.0, "LCM: largest guidance scale w drawn per sample", None),
    ),
    # an option of KarrasDenoiser's "lcm" boundary scalings, which sampling needs as well
    *flag_rows(
        "denoiser",
        ("lcm_timestep_scaling", 10.0, "LCM boundary scalings: c_skip = sd^2/(s^2+sd^2), c_out = s/sqrt(s^2+sd^2) "
         "with s = this * (sigma - sigma_min) (LCM's timestep_scaling)", None),
        scripts=("train", "sample"),
    ),
)

LCM_ENTRY = dict(  # what lcm and lcf share
    bind_loss=bind_lcm_loss,
    loss_groups=("lcm",),
    teacher="required",
    target=True,
    boundary_condition=True,
    make_schedule=consistency_schedule,
    make_denoiser=lcm_denoiser,
    samplers=("onestep", "lcm"),
    check_config=check_lcm_options,
)

MODES = (
    TrainingMode(
        name="lcm",
        description="latent consistency distillation (Luo et al. 2023): a guided EDM teacher jumps k grid steps, "
        "the student takes the guidance scale w (cm.modes.lcm)",
        teacher_in_loss=True,
        teacher_network=dict(guidance_embed=False),
        flag_defaults=dict(start_ema=0.95, weight_schedule="uniform", loss_norm="huber",
                           teacher_solver=LCM_TEACHER_SOLVER),
        **LCM_ENTRY,
    ),
    TrainingMode(
        name="lcf",
        description="latent consistency fine-tuning (Luo et al. 2023): the LCM given as --teacher_model_path trained "
        "on new data by the same consistency loss, without a teacher (cm.modes.lcm)",
        flag_defaults=dict(start_ema=0.95, weight_schedule="uniform", loss_norm="huber"),
        **LCM_ENTRY,  # teacher: the trained LCM the student starts from; no teacher runs in the loss
    ),
)
