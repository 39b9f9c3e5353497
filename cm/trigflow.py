"""TrigFlow and continuous-time consistency models, sCT and sCD (sCM: Lu & Song 2024, "Simplifying, stabilizing and
scaling continuous-time consistency models").

Notation (sCM Sec. 3): data x_0 with standard deviation sigma_d, noise z ~ N(0, sigma_d^2 I), time t in [0, pi/2],

    x_t = cos(t) x_0 + sin(t) z,          PF-ODE  dx_t/dt = sigma_d F(x_t / sigma_d, c_noise(t)),
    f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, c_noise(t))   (consistency model; f(x, 0) = x),

where F is the network (our UNet / NCSN++ called as ``F(x_in, c_noise, **model_kwargs)``; it never preconditions).
This is EDM's process x = x_0 + sigma eps (eps ~ N(0, I)) under sigma = sigma_d tan(t) and x_t = cos(t) x, so the
network input x_t / sigma_d equals EDM's c_in(sigma) x. In EDM coordinates f is EDM's preconditioning with F
negated: c_skip = sigma_d^2 / (sigma^2 + sigma_d^2), c_out = -sigma sigma_d / sqrt(sigma^2 + sigma_d^2),
c_in = 1 / sqrt(sigma^2 + sigma_d^2), c_noise = c_noise(arctan(sigma / sigma_d)); `TrigFlowDenoiser` exposes it
with KarrasDenoiser's `denoise` signature so cm.sampling's samplers and `karras_sample` run TrigFlow models.

The sCM objective that trains such models is the method module cm.modes.scm.
"""

import torch

from .nn import append_dims, noise_conditioning
from .random_util import get_generator

T_MID = 1.1  # sCM's intermediate time of two-step sampling
TIME_CONDITIONINGS = ("edm", "trigflow")  # what a TrigFlow model's network is fed (TrigFlowDenoiser)


def per_sample(v, x):
    """A number, a 0-d tensor or a per-sample [B] tensor, made to broadcast over x in x's dtype."""
    if not torch.is_tensor(v):
        return v
    v = v.to(device=x.device, dtype=x.dtype)
    return append_dims(v, x.ndim) if v.ndim > 0 else v


# ----- TrigFlow <-> EDM ----------------------------------------------------------------------------


def sigma_to_t(sigma, sigma_data=0.5):
    """TrigFlow time of an EDM noise level: t = arctan(sigma / sigma_d) (sCM Sec. 3)."""
    return torch.atan(torch.as_tensor(sigma) / sigma_data)


def t_to_sigma(t, sigma_data=0.5):
    """EDM noise level of a TrigFlow time: sigma = sigma_d tan(t) (sCM Sec. 3)."""
    return sigma_data * torch.tan(torch.as_tensor(t))


def edm_to_trigflow(x, sigma, sigma_data=0.5):
    """EDM x = x_0 + sigma eps at sigma -> (x_t, t) with x_t = cos(t) x = cos(t) x_0 + sin(t) sigma_d eps."""
    t = sigma_to_t(sigma, sigma_data)
    return x * per_sample(torch.cos(t), x), t


def trigflow_to_edm(x_t, t, sigma_data=0.5):
    """TrigFlow (x_t, t) -> (x, sigma) with x = x_t / cos(t) = x_0 + sigma (z / sigma_d), sigma = sigma_d tan(t)."""
    t = torch.as_tensor(t)
    return x_t / per_sample(torch.cos(t), x_t), t_to_sigma(t, sigma_data)


def trigflow_c_noise(t, scale=1.0):
    """The network's time input c_noise(t) = scale * t; sCM's identity time transformation is scale 1 (Sec. 4.1)."""
    return t * scale


# ----- the TrigFlow process and model --------------------------------------------------------------


def trigflow_x_t(x_start, z, t):
    """x_t = cos(t) x_0 + sin(t) z, z ~ N(0, sigma_d^2 I) (sCM Sec. 3)."""
    return per_sample(torch.cos(t), x_start) * x_start + per_sample(torch.sin(t), x_start) * z


def trigflow_velocity(x_start, z, t):
    """dx_t/dt = cos(t) z - sin(t) x_0, the conditional velocity that sCT uses as the PF-ODE direction (sCM Sec. 3)."""
    return per_sample(torch.cos(t), z) * z - per_sample(torch.sin(t), z) * x_start


def trigflow_f(model_output, x_t, t, sigma_data=0.5):
    """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F (sCM Sec. 3): the consistency model, or a diffusion model's x_0."""
    return per_sample(torch.cos(t), x_t) * x_t - per_sample(torch.sin(t), x_t) * sigma_data * model_output


def output_from_denoised(x_t, t, denoised, sigma_data=0.5):
    """The F that gives x_0 = denoised at (x_t, t): F = (cos(t) x_t - x_0) / (sigma_d sin(t)), t > 0."""
    cos, sin = per_sample(torch.cos(t), x_t), per_sample(torch.sin(t), x_t)
    return (cos * x_t - denoised) / (sigma_data * sin)


def edm_conditioned(network, sigma_data=0.5, c_noise_scale=1.0):
    """An EDM-parameterised network as TrigFlow's F: F(x_in, c) = -F_edm(x_in, 250 log(sigma_d tan(c / scale))).

    EDM's c_in is TrigFlow's 1 / sigma_d on x_t and its c_out is TrigFlow's with F negated (module docstring), so
    with this F the TrigFlow model of an EDM checkpoint is that checkpoint's denoiser exactly.
    """

    def model(x_in, c_noise, **model_kwargs):
        sigma = t_to_sigma(c_noise / c_noise_scale, sigma_data)
        return -network(x_in, noise_conditioning(sigma), **model_kwargs)

    return model


def velocity_from_denoiser(denoiser, sigma_data=0.5):
    """EDM denoiser D(x, sigma) -> TrigFlow PF-ODE v(x_t, t) = (cos(t) x_t - D(x_t / cos t, sigma_d tan t)) / sin t.

    This is sCD's teacher, e.g. ``velocity_from_denoiser(lambda x, s, **kw: diffusion.denoise(teacher, x, s, **kw)[1])``
    with an EDM KarrasDenoiser; model_kwargs (labels) pass through. t must be positive (the proposal never draws 0).
    """

    def velocity(x_t, t, **model_kwargs):
        x, sigma = trigflow_to_edm(x_t, t, sigma_data)
        denoised = denoiser(x, sigma.to(x.dtype), **model_kwargs)
        return sigma_data * output_from_denoised(x_t, t, denoised, sigma_data)

    return velocity


class TrigFlowDenoiser:
    """A TrigFlow network seen in EDM coordinates: D(x, sigma) = f(cos(t) x, t), t = arctan(sigma / sigma_d).

    Same `denoise` signature as KarrasDenoiser, so `cm.sampling.make_denoiser` and `karras_sample` sample
    sCM checkpoints (samplers trigflow_onestep / trigflow_twostep) and TrigFlow diffusion models (heun, euler).

    :param sigma_data: standard deviation of the data sigma_d (0.5 for images in [-1, 1]).
    :param sigma_max: largest EDM noise level; sampling starts at t = arctan(sigma_max / sigma_d) (80: 1.56454).
    :param sigma_min: smallest EDM noise level of the Karras grids (f(x, 0) = x holds at sigma = 0).
    :param c_noise_scale: the network sees c_noise(t) = c_noise_scale * t (sCM: 1).
    :param time_conditioning: "trigflow": the network is F(x_t / sigma_d, c_noise(t)) (sCM); "edm": it is an
        EDM-parameterised network, fed EDM's 250 log(sigma) and negated (`edm_conditioned`), so an EDM checkpoint
        is an exact TrigFlow model.
    """

    def __init__(
        self, sigma_data=0.5, sigma_max=80.0, sigma_min=0.002, c_noise_scale=1.0, time_conditioning="trigflow"
    ):
        if sigma_data <= 0 or not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"need sigma_data > 0 and 0 < sigma_min < sigma_max, got {sigma_data}, {sigma_min}, {sigma_max}"
            )
        if time_conditioning not in TIME_CONDITIONINGS:
            allowed = ", ".join(TIME_CONDITIONINGS)
            raise ValueError(f"unknown time_conditioning {time_conditioning!r}; allowed: {allowed}")
        self.sigma_data = sigma_data
        self.sigma_max = sigma_max
        self.sigma_min = sigma_min
        self.c_noise_scale = c_noise_scale
        self.time_conditioning = time_conditioning

    def network(self, model):
        """TrigFlow's F(x_in, c_noise, **model_kwargs) of a network (itself, or `edm_conditioned` for "edm")."""
        if self.time_conditioning == "edm":
            return edm_conditioned(model, self.sigma_data, self.c_noise_scale)
        return model

    def denoise(self, model, x, sigmas, **model_kwargs):
        """(F's output, f(x_t, t)) for EDM x at noise levels sigmas [B]."""
        x_t, t = edm_to_trigflow(x, sigmas.to(x.dtype), self.sigma_data)
        network = self.network(model)
        model_output = network(x_t / self.sigma_data, trigflow_c_noise(t, self.c_noise_scale), **model_kwargs)
        return model_output, trigflow_f(model_output, x_t, t, self.sigma_data)


# ----- samplers (cm.sampling's family: EDM coordinates, denoiser(x, sigma [B])) ---------------------


def trigflow_sigmas(ts, sigma_data=0.5, device="cpu"):
    """EDM noise levels sigma_d tan(t) of TrigFlow times `ts` (float64), e.g. (arctan(80 / 0.5), 1.1)."""
    return t_to_sigma(torch.as_tensor(ts, dtype=torch.float64), sigma_data).to(device)


@torch.no_grad()
def sample_trigflow(denoiser, x, sigmas, generator=None, progress=False, callback=None):
    """sCM few-step sampling: denoise x_0 = f(x, sigma_i), re-noise x = x_0 + sigma_(i+1) z; returns the last x_0.

    TrigFlow's re-noising x_t = cos(t) x_0 + sin(t) z is exact (f(x, 0) = x), so no sigma_min is subtracted as in
    CM Alg. 1. A trailing 0 in `sigmas` is ignored.
    """
    generator = generator or get_generator("dummy")
    if sigmas[-1] == 0:
        sigmas = sigmas[:-1]
    sigmas = sigmas.tolist()
    indices = range(len(sigmas))
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices)
    for i in indices:
        # denoise to x0
        x0 = denoiser(x, x.new_full((x.shape[0],), sigmas[i]))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": x0})
        # re-noise to the next level
        if i + 1 < len(sigmas):
            x = x0 + generator.randn_like(x) * sigmas[i + 1]
    return x0


@torch.no_grad()
def sample_trigflow_onestep(denoiser, x, sigmas, generator=None, progress=False, callback=None):
    """sCM one-step sampling x_0 = f(sigma_d z, T) with T = arctan(sigmas[0] / sigma_d), given x = sigmas[0] z."""
    return sample_trigflow(denoiser, x, sigmas[:1], generator, progress=progress, callback=callback)


@torch.no_grad()
def sample_trigflow_twostep(
    denoiser, x, sigmas, generator=None, progress=False, callback=None, t_mid=T_MID, sigma_data=0.5
):
    """sCM two-step sampling: f at T = arctan(sigmas[0] / sigma_d), re-noise to t_mid (sCM: 1.1), f again."""
    levels = torch.stack([sigmas[0].to(torch.float64), trigflow_sigmas(t_mid, sigma_data, sigmas.device)])
    return sample_trigflow(denoiser, x, levels, generator, progress=progress, callback=callback)
