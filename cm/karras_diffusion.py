"""The Karras/EDM denoiser wrapper, with the reference's loss methods (training_losses, consistency_losses,
progdist_losses) delegating to the method modules cm.modes.edm and cm.modes.consistency.

Notation (CM paper, Song et al. 2023): x_t = x + t z; the consistency function is
f(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t)) with c_skip(eps) = 1, c_out(eps) = 0.
"""

import torch

from .errors import check_choice
from .metrics import check_loss_norm, get_distance_fn
from .modes.consistency import DEFAULT_TEACHER_SOLVER
from .modes.consistency import TEACHER_SOLVERS as _SOLVER_STEPS
from .modes.consistency import consistency_losses, progdist_losses
from .modes.edm import edm_losses
from .nn import append_dims, noise_conditioning
from .sampling import karras_sample, karras_sigma  # noqa: F401  (karras_sample re-exported)

WEIGHT_SCHEDULES = ("snr", "snr+1", "karras", "truncated-snr", "uniform", "ict")
TEACHER_SOLVERS = tuple(_SOLVER_STEPS)
INDEX_SAMPLERS = ("uniform", "lognormal")
BOUNDARY_SCALINGS = ("cm", "lcm")


def get_weightings(weight_schedule, snrs, sigma_data):
    """Loss weight lambda(sigma) from snr = sigma^-2: snr, snr+1, karras (EDM: snr + 1/sigma_data^2), truncated-snr, uniform."""
    if weight_schedule == "snr":
        return snrs
    if weight_schedule == "snr+1":
        return snrs + 1
    if weight_schedule == "karras":
        return snrs + 1.0 / sigma_data**2
    if weight_schedule == "truncated-snr":
        return torch.clamp(snrs, min=1.0)
    if weight_schedule == "uniform":
        return torch.ones_like(snrs)
    allowed = ", ".join(s for s in WEIGHT_SCHEDULES if s != "ict")
    raise ValueError(f"unknown weight_schedule {weight_schedule!r} for a single noise level; allowed: {allowed}")


def lognormal_index_probs(sigmas, p_mean=-1.1, p_std=2.0):
    """iCT Eq. 10: p(n) ∝ erf((log s_n - P_mean) / (sqrt 2 P_std)) - erf((log s_(n+1) - P_mean) / (sqrt 2 P_std)).

    `sigmas` is a decreasing grid s_0 > ... > s_(N-1); returns N-1 probabilities for the pairs (s_n, s_(n+1)).
    """
    cdf = torch.erf((torch.log(sigmas) - p_mean) / (2**0.5 * p_std))
    probs = cdf[:-1] - cdf[1:]
    return probs / probs.sum()


class KarrasDenoiser:
    """EDM-preconditioned denoiser D(x, sigma) and the losses that train it.

    :param sigma_data: standard deviation of the data (0.5 for images in [-1, 1]).
    :param sigma_max: largest noise level T.
    :param sigma_min: smallest noise level eps; the consistency boundary condition holds there.
    :param rho: curvature of the Karras grid (7).
    :param weight_schedule: loss weighting: snr | snr+1 | karras | truncated-snr | uniform | ict
        (ict: 1 / (t_n - t_(n+1)), consistency losses only).
    :param distillation: True for consistency models: use the boundary-condition scalings.
    :param loss_norm: distance d for the consistency / progdist losses: l1 | l2 | l2-32 | lpips | pseudo-huber.
    :param index_sampler: how n is drawn in consistency losses: uniform (CM paper) or lognormal (iCT Eq. 10).
    :param p_mean, p_std: lognormal index sampler parameters (iCT: -1.1, 2.0).
    :param lpips_vgg_path: local torchvision VGG16 weights for loss_norm lpips.
    :param lpips_pretrained: False uses a random-init LPIPS backbone (tests only).
    :param boundary_scalings: with distillation, which f(x, sigma_min) = x scalings: cm (CM paper App. C) or lcm
        (LCM, Luo et al. 2023: c_skip x + c_out D(x, sigma) over the EDM denoiser D).
    :param lcm_timestep_scaling: LCM's timestep_scaling kappa, in units of sigma - sigma_min (lcm scalings only).
    """

    def __init__(
        self,
        sigma_data: float = 0.5,
        sigma_max=80.0,
        sigma_min=0.002,
        rho=7.0,
        weight_schedule="karras",
        distillation=False,
        loss_norm="lpips",
        index_sampler="uniform",
        p_mean=-1.1,
        p_std=2.0,
        lpips_vgg_path=None,
        lpips_pretrained=True,
        boundary_scalings="cm",
        lcm_timestep_scaling=10.0,
    ):
        check_choice("weight_schedule", weight_schedule, WEIGHT_SCHEDULES)
        check_choice("boundary_scalings", boundary_scalings, BOUNDARY_SCALINGS)
        check_loss_norm(loss_norm)
        check_choice("index_sampler", index_sampler, INDEX_SAMPLERS)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        self.sigma_data = sigma_data
        self.sigma_max = sigma_max
        self.sigma_min = sigma_min
        self.rho = rho
        self.weight_schedule = weight_schedule
        self.distillation = distillation
        self.loss_norm = loss_norm
        self.index_sampler = index_sampler
        self.p_mean = p_mean
        self.p_std = p_std
        self.lpips_vgg_path = lpips_vgg_path
        self.lpips_pretrained = lpips_pretrained
        self.boundary_scalings = boundary_scalings
        self.lcm_timestep_scaling = lcm_timestep_scaling
        self.num_timesteps = 40
        self._distance = None

    # ----- preconditioning -------------------------------------------------------------------
    def get_snr(self, sigmas):
        """Signal-to-noise ratio sigma^-2."""
        return sigmas**-2

    def get_sigmas(self, sigmas):
        """Identity: noise levels are the time variable (sigma(t) = t)."""
        return sigmas

    def get_scalings(self, sigma):
        """EDM Table 1: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2)."""
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2) ** 0.5
        c_in = 1 / (sigma**2 + self.sigma_data**2) ** 0.5
        return c_skip, c_out, c_in

    def get_scalings_for_boundary_condition(self, sigma):
        """CM paper App. C: c_skip = sd^2/((s-eps)^2+sd^2), c_out = (s-eps) sd/sqrt(s^2+sd^2): f(x, eps) = x."""
        c_skip = self.sigma_data**2 / ((sigma - self.sigma_min) ** 2 + self.sigma_data**2)
        c_out = (sigma - self.sigma_min) * self.sigma_data / (sigma**2 + self.sigma_data**2) ** 0.5
        c_in = 1 / (sigma**2 + self.sigma_data**2) ** 0.5
        return c_skip, c_out, c_in

    def get_scalings_for_lcm_boundary_condition(self, sigma):
        """LCM's f = c_skip x + c_out x0_pred (Luo et al. 2023, Sec. 4) over the EDM denoiser x0_pred = D(x):
        a = sd^2/(s^2+sd^2), b = s/sqrt(s^2+sd^2), s = kappa (sigma - eps), as one (c_skip, c_out, c_in) triple."""
        s = self.lcm_timestep_scaling * (sigma - self.sigma_min)
        a = self.sigma_data**2 / (s**2 + self.sigma_data**2)
        b = s / (s**2 + self.sigma_data**2) ** 0.5
        c_skip, c_out, c_in = self.get_scalings(sigma)
        return a + b * c_skip, b * c_out, c_in

    def denoise(self, model, x_t, sigmas, **model_kwargs):
        """D(x_t, sigma) = c_skip x_t + c_out F(c_in x_t, c_noise); returns (F's output, D)."""
        sigmas = sigmas.to(x_t.dtype)
        scalings = self.get_scalings
        if self.distillation:
            scalings = self.get_scalings_for_boundary_condition
            if self.boundary_scalings == "lcm":
                scalings = self.get_scalings_for_lcm_boundary_condition
        c_skip, c_out, c_in = [append_dims(c, x_t.ndim) for c in scalings(sigmas)]
        c_noise = noise_conditioning(sigmas)
        model_output = model(c_in * x_t, c_noise, **model_kwargs)
        denoised = c_out * model_output + c_skip * x_t
        return model_output, denoised

    # ----- shared loss pieces ----------------------------------------------------------------
    def karras_sigmas(self, indices, num_scales):
        """Noise levels at (possibly fractional) indices of the num_scales-point Karras grid."""
        return karras_sigma(indices, num_scales, self.sigma_min, self.sigma_max, self.rho)

    def sample_adjacent_sigmas(self, num_scales, batch_size, device, dtype=torch.float32):
        """Draw n in {0..N-2} and return (t_n, t_(n+1)), adjacent points of the N-point grid with t_n > t_(n+1)."""
        if num_scales < 2:
            raise ValueError(f"consistency losses need num_scales >= 2, got {num_scales}")
        if self.index_sampler == "uniform":
            indices = torch.randint(0, num_scales - 1, (batch_size,), device=device)
        else:
            grid = self.karras_sigmas(torch.arange(num_scales, device=device), num_scales)
            probs = lognormal_index_probs(grid, self.p_mean, self.p_std)
            indices = torch.multinomial(probs, batch_size, replacement=True)
        t = self.karras_sigmas(indices, num_scales).to(dtype)
        t2 = self.karras_sigmas(indices + 1, num_scales).to(dtype)
        return t, t2

    def loss_weights(self, t, t_next=None):
        """lambda(t_n): get_weightings on snr(t_n), or 1 / (t_n - t_(n+1)) for the iCT schedule."""
        if self.weight_schedule == "ict":
            if t_next is None:
                raise ValueError("weight_schedule 'ict' needs two adjacent noise levels (consistency losses only)")
            return 1.0 / (t - t_next)
        return get_weightings(self.weight_schedule, self.get_snr(t), self.sigma_data)

    def build_distance(self):
        """Build the loss_norm distance now (LPIPS loads its weights here, so missing files fail early)."""
        if self._distance is None:
            self._distance = get_distance_fn(self.loss_norm, self.lpips_vgg_path, self.lpips_pretrained)
        return self._distance

    def distance(self, x, y):
        """The loss_norm distance d(x, y) per sample (the LPIPS network is built on first use)."""
        self.build_distance()
        if isinstance(self._distance, torch.nn.Module):
            self._distance.to(x.device)
        return self._distance(x, y)

    # ----- losses ----------------------------------------------------------------------------
    def training_losses(self, model, x_start, sigmas, model_kwargs=None, noise=None):
        """EDM loss lambda(sigma) ||D(x + sigma z, sigma) - x||^2 (EDM Eq. 8; cm.modes.edm); terms loss, mse, xs_mse."""
        return edm_losses(self, model, x_start, sigmas, model_kwargs=model_kwargs, noise=noise)

    def consistency_losses(
        self,
        model,
        x_start,
        num_scales,
        model_kwargs=None,
        target_model=None,
        teacher_model=None,
        teacher_diffusion=None,
        noise=None,
        teacher_solver=DEFAULT_TEACHER_SOLVER,
        rng=None,
        teacher_guidance=1.0,
        ct_target="sample",
    ):
        """Consistency distillation (CM paper Alg. 2) with a teacher (classifier-free guided for teacher_guidance
        != 1), consistency training (Alg. 3) without, its target point from the data point (ct_target "sample") or
        the batch's stable target field ("stf") (cm.modes.consistency); returns {"loss": [B], "sigma": t_n}."""
        return consistency_losses(self, model, x_start, num_scales, model_kwargs=model_kwargs,
                                  target_model=target_model, teacher_model=teacher_model,
                                  teacher_diffusion=teacher_diffusion, noise=noise, teacher_solver=teacher_solver,
                                  rng=rng, teacher_guidance=teacher_guidance, ct_target=ct_target)

    def progdist_losses(
        self,
        model,
        x_start,
        num_scales,
        model_kwargs=None,
        teacher_model=None,
        teacher_diffusion=None,
        noise=None,
    ):
        """Progressive distillation (Salimans & Ho 2022) on the Karras grid (cm.modes.consistency); returns
        {"loss": [B], "sigma": t}."""
        return progdist_losses(self, model, x_start, num_scales, model_kwargs=model_kwargs, teacher_model=teacher_model,
                               teacher_diffusion=teacher_diffusion, noise=noise)


# ----- the reference's module-level sampling and editing names --------------------------------------
# openai/consistency_models defines its samplers and zero-shot editing loops in this module; here they live
# in cm.sampling and cm.editing. The names below keep reference imports and keyword calls working: the
# first group has the reference's signatures already, the wrappers only rename arguments or follow the
# reference's editing demos on top of cm.editing's constraints.

from . import editing as _editing  # noqa: E402
from . import sampling as _sampling  # noqa: E402
from .sampling import (  # noqa: E402,F401  (re-exported under the reference's names)
    get_ancestral_step,
    get_sigmas_karras,
    sample_dpm,
    sample_euler,
    sample_heun,
    sample_progdist,
    to_d,
)


def sample_euler_ancestral(model, x, sigmas, generator, progress=False, callback=None):
    """cm.sampling.sample_euler_ancestral under the reference's argument names (`model` is the denoiser)."""
    return _sampling.sample_euler_ancestral(model, x, sigmas, generator, progress=progress, callback=callback)


def sample_onestep(distiller, x, sigmas, generator=None, progress=False, callback=None):
    """cm.sampling.sample_onestep under the reference's argument names: distiller(x, sigmas[0])."""
    return _sampling.sample_onestep(distiller, x, sigmas, generator, progress=progress, callback=callback)


def stochastic_iterative_sampler(
    distiller, x, sigmas, generator, ts, progress=False, callback=None, t_min=0.002, t_max=80.0, rho=7.0, steps=40
):
    """cm.sampling.stochastic_iterative_sampler (CM paper Alg. 1) under the reference's argument names."""
    return _sampling.stochastic_iterative_sampler(
        distiller, x, sigmas, generator, ts=ts, progress=progress, callback=callback,
        t_min=t_min, t_max=t_max, rho=rho, steps=steps,
    )


@torch.no_grad()
def sample_midpoint_ancestral(model, x, ts, generator, progress=False, callback=None):
    """The reference's sample_midpoint_ancestral: for each t in ts one explicit midpoint step of size 1/len(ts)
    of dx/dt = model(x, t); despite the name it draws no noise (generator is unused, as in the reference)."""
    ones = x.new_ones([x.shape[0]])
    h = 1 / len(ts)
    times = ts
    if progress:
        from tqdm.auto import tqdm

        times = tqdm(ts)
    for t in times:
        slope = model(x, t * ones)
        slope_mid = model(x + (h / 2) * slope, (t + h / 2) * ones)
        x = x + h * slope_mid
        if callback is not None:
            callback({"x": x, "tn": t, "dn": slope, "dn_2": slope_mid})
    return x


def _reference_edit_loop(distiller, constraint, known, x, ts, t_min, t_max, rho, steps, generator):
    """The reference's iterative_* loop (CM paper Alg. 4): at each level of ts denoise, clamp to [-1, 1], put the
    known part back, re-noise to the next level; noise is drawn after every denoising, the last included."""
    put_back = constraint.replacer(known)

    def denoise_and_put_back(x_t, sigma):
        return put_back(distiller(x_t, sigma).clamp(-1.0, 1.0))

    return _sampling.stochastic_iterative_sampler(
        denoise_and_put_back, x, None, generator, ts=ts, t_min=t_min, t_max=t_max, rho=rho, steps=steps
    )


@torch.no_grad()
def iterative_colorization(distiller, images, x, ts, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None):
    """The reference's colorization from the start x: keeps the luminance of `images`; returns (x, gray known part)."""
    constraint = _editing.colorize_constraint(images)
    known = constraint.project(images)
    return _reference_edit_loop(distiller, constraint, known, x, ts, t_min, t_max, rho, steps, generator), known


def reference_letter_mask(batch, image_size, device="cpu"):
    """The reference's inpainting mask (1 = keep): an "S" drawn black at (50, 0) in 250-pt Arial on white; the
    batch is groups of 7, even groups keep the background (the letter is generated), odd groups the letter.

    The reference fails without arial.ttf; here PIL's default font stands in when Arial cannot be found.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    if batch % 7:
        raise ValueError(f"iterative_inpainting (the reference's demo) needs a batch that is a multiple of 7, got {batch}")
    try:
        font = ImageFont.truetype("arial.ttf", 250)
    except OSError:
        font = ImageFont.load_default(size=250)
    canvas = Image.new("RGB", (image_size, image_size), color="white")
    ImageDraw.Draw(canvas).text((50, 0), "S", font=font, fill=(0, 0, 0))
    light = torch.from_numpy(np.array(canvas)).permute(2, 0, 1).to(device) > 0.5  # [3, H, W]
    even = (torch.arange(batch // 7, device=device) % 2 == 0).view(-1, 1, 1, 1, 1)
    keep = torch.where(even, light, ~light).expand(-1, 7, -1, -1, -1)
    return keep.reshape(batch, 3, image_size, image_size).float()


@torch.no_grad()
def iterative_inpainting(distiller, images, x, ts, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None):
    """The reference's inpainting demo from the start x with reference_letter_mask; returns (x, images with the
    generated region set to -1)."""
    keep = reference_letter_mask(x.shape[0], x.shape[-1], x.device).to(images)
    constraint = _editing.inpaint_constraint(1 - keep)
    known = images * keep - (1 - keep)
    return _reference_edit_loop(distiller, constraint, known, x, ts, t_min, t_max, rho, steps, generator), known


@torch.no_grad()
def iterative_superres(distiller, images, x, ts, t_min=0.002, t_max=80.0, rho=7.0, steps=40, generator=None):
    """The reference's 8x super-resolution from the start x: keeps the 8x8 patch means of `images`; returns
    (x, images averaged over each patch)."""
    _editing.check_factor(8, x.shape[-1])
    constraint = _editing.superres_constraint(8, images)
    known = constraint.project(images)
    return _reference_edit_loop(distiller, constraint, known, x, ts, t_min, t_max, rho, steps, generator), known
