"""Flow maps on the linear (rectified-flow) path, and their samplers (MeanFlow: Geng, Deng, Bai, Kolter & He 2025,
"Mean flows for one-step generative modeling").

Data x (images in [-1, 1]), noise e ~ N(0, I), flow time t in [0, 1] (t = 1 is pure noise):

    z_t = (1 - t) x + t e,                v = dz_t/dt = e - x                  (the conditional velocity),
    u(z_t, r, t) = 1 / (t - r) int_r^t v(z_s, s) ds,   u(z, t, t) = v(z, t)   (the average velocity, MeanFlow Eq. 3),
    z_r = z_t - (t - r) u(z_t, r, t)                                           (the flow map: one jump from t to r).

The network is a two-time network (cm.unet / cm.ncsnpp built with second_time_embed) called as
F(z_t, c(t), second_time=c(t - r)): MeanFlow's (t, t - r) conditioning, with c(t) = time_scale * t. We take
time_scale = 1000, the range of ADM's DDPM timesteps that its sinusoidal embedding was made for (NCSN++'s Fourier
embedding divides its input by 1000 again, so it sees t itself). The network never preconditions: u = F.

In EDM coordinates x_edm = x + sigma e, the point z_t is x_edm / (1 + sigma) at t = sigma / (1 + sigma).
`FlowMapDenoiser.denoise` gives, with KarrasDenoiser's signature, the one-jump estimate of the data
x_0 = z_t - t u(z_t, 0, t), so EDM samplers, ternary search and editing run flow-map checkpoints; `sample_flow_map`
walks a grid of times with the flow map itself, starting at t = 1 (sigma = inf) exactly.

Align Your Flow's flow map f(z_t, t, s) = z_t + (s - t) F(z_t, t, s) (Sabour et al. 2025) is this one with s = r and
F = u, so the samplers run its checkpoints too (cm.modes.ayf); `velocity_from_denoiser` turns an EDM teacher into the
velocity v(z_t, t) of this path.
"""

import torch

from .nn import append_dims

FLOW_TIME_SCALE = 1000.0  # c(t) = 1000 t: the network's time inputs


def per_sample_time(t, x):
    """A number or a [B] tensor of times, broadcast over x [B, ...] in x's dtype."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype)
    return append_dims(t, x.ndim) if t.ndim > 0 else t


def flow_interpolate(x_start, noise, t):
    """z_t = (1 - t) x + t e (MeanFlow Sec. 3, the linear path)."""
    t = per_sample_time(t, x_start)
    return (1 - t) * x_start + t * noise


def sigma_to_flow_time(sigma):
    """Flow time of an EDM noise level: t = sigma / (1 + sigma), written 1 / (1 + 1 / sigma) so sigma = inf gives 1."""
    sigma = torch.as_tensor(sigma)
    return 1 / (1 + 1 / sigma)


def flow_time_to_sigma(t):
    """EDM noise level of a flow time: sigma = t / (1 - t) (inf at t = 1)."""
    t = torch.as_tensor(t)
    return t / (1 - t)


def velocity_from_denoiser(denoiser):
    """EDM denoiser D(x, sigma) -> the linear path's velocity v(z_t, t) = (z_t - D(z_t / (1 - t), t / (1 - t))) / t.

    z_t = (1 - t) x + t e is the EDM point x + sigma e scaled by 1 - t, at sigma = t / (1 - t); D is E[x | z_t], so
    E[e | z_t] = (z_t - (1 - t) D) / t and v = E[e - x | z_t] = (z_t - D) / t (the conversion of an EDM teacher to a
    flow teacher, as Align Your Flow distils EDM2 networks). t in (0, 1) [B]; model_kwargs (labels) pass through.
    """

    def velocity(z, t, **model_kwargs):
        t = torch.as_tensor(t, device=z.device, dtype=z.dtype)
        sigma = flow_time_to_sigma(t)
        denoised = denoiser(z / per_sample_time(1 - t, z), sigma, **model_kwargs).to(z.dtype)
        return (z - denoised) / per_sample_time(t, z)

    return velocity


class FlowMapDenoiser:
    """A two-time network as MeanFlow's average velocity u(z, r, t) = F(z, c(t), second_time=c(t - r)), with
    KarrasDenoiser's `denoise` for the samplers of cm.sampling.

    :param time_scale: c(t) = time_scale * t, the network's time inputs (1000).
    :param sigma_min: smallest EDM noise level (loss logging by quartile of log sigma; EDM samplers' grids).
    :param sigma_max: largest EDM noise level of EDM samplers' grids (the flow-map samplers start at t = 1).
    """

    def __init__(self, time_scale=FLOW_TIME_SCALE, sigma_min=0.002, sigma_max=80.0):
        if time_scale <= 0 or not 0 < sigma_min < sigma_max:
            raise ValueError(f"need time_scale > 0 and 0 < sigma_min < sigma_max, got {time_scale}, {sigma_min}, "
                             f"{sigma_max}")
        self.time_scale = time_scale
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def average_velocity(self, model, z, r, t, **model_kwargs):
        """u(z_t, r, t) = F(z_t, c(t), second_time=c(t - r)) for times r <= t [B] (MeanFlow's (t, t - r))."""
        scale = self.time_scale
        return model(z, scale * t, second_time=scale * (t - r), **model_kwargs)

    def flow_map(self, model, z, r, t, **model_kwargs):
        """z_r = z_t - (t - r) u(z_t, r, t) (MeanFlow Eq. 1 rearranged: one jump from t to r)."""
        u = self.average_velocity(model, z, r, t, **model_kwargs)
        return z - per_sample_time(t - r, z) * u.to(z.dtype)

    def denoise(self, model, x, sigmas, **model_kwargs):
        """(u(z_t, 0, t), x_0 = z_t - t u(z_t, 0, t)) for EDM x at noise levels sigmas [B] (z_t = x / (1 + sigma))."""
        t = sigma_to_flow_time(sigmas.to(x.dtype))
        z = x / per_sample_time(1 + sigmas.to(x.dtype), x)
        u = self.average_velocity(model, z, torch.zeros_like(t), t, **model_kwargs)
        return u, z - per_sample_time(t, z) * u.to(z.dtype)


# ----- samplers (cm.sampling's family: EDM levels in, the flow map jumps between them) --------------------------


def flow_grid(steps, ts=None, sigma_min=None, sigma_max=None, rho=None, device="cpu"):
    """EDM levels of flow times on a uniform grid: k = steps jumps 1, 1 - 1/k, ..., 0 (2 steps: t = 1, 0.5, 0), or
    the times 1 - i / steps at increasing indices ts (starting at 0), then 0; t = 1 is sigma = inf."""
    if steps < 1:
        raise ValueError(f"flow-map sampling needs steps >= 1, got {steps}")
    indices = range(steps) if ts is None else list(ts)
    if not indices or indices[0] != 0 or any(b <= a for a, b in zip(indices, indices[1:])) or indices[-1] >= steps:
        raise ValueError(f"flow-map ts must be increasing indices in [0, {steps}) starting at 0, got {tuple(ts)}")
    times = torch.tensor([1 - i / steps for i in indices] + [0.0], dtype=torch.float64)
    return flow_time_to_sigma(times).to(device)


def flow_onestep_grid(steps, ts=None, sigma_min=None, sigma_max=None, rho=None, device="cpu"):
    """One jump from t = 1 to 0, whatever steps is."""
    return flow_grid(1, device=device)


@torch.no_grad()
def sample_flow_map(denoiser, x, sigmas, generator=None, progress=False, callback=None, flow_map=None,
                    noise_level=80.0):
    """MeanFlow few-step sampling (MeanFlow Alg. 2): z = e at t = 1, then z_r = z_t - (t - r) u(z_t, r, t) over the
    flow times of `sigmas`; returns z_0.

    :param denoiser: unused (kept for the family's signature): every jump is one call of `flow_map`.
    :param x: the starting noise, noise_level * e (karras_sample's x_T at sigma_max).
    :param flow_map: (z, r [B], t [B]) -> z_r, the network's flow map (FlowMapDenoiser.flow_map).
    :param noise_level: the scale of x, so that e = x / noise_level.
    """
    if flow_map is None:
        raise ValueError("sample_flow_map needs the network's flow_map (a checkpoint of --training_mode meanflow "
                         "or ayf)")
    times = sigma_to_flow_time(sigmas.to(torch.float64)).tolist()
    z = x / noise_level
    indices = range(len(times) - 1)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices)
    for i in indices:
        t_cur, t_next = times[i], times[i + 1]
        # jump from t_cur to t_next in one evaluation
        z_next = flow_map(z, z.new_full((z.shape[0],), t_next), z.new_full((z.shape[0],), t_cur))
        if callback is not None:
            callback({"x": z, "i": i, "sigma": sigmas[i], "denoised": z_next})
        z = z_next
    return z


def flow_map_options(settings):
    """The network's flow map and the noise scale, from karras_sample's settings (a flow-map denoiser's)."""
    diffusion, model = settings["diffusion"], settings["model"]
    if not hasattr(diffusion, "flow_map"):
        raise ValueError("the meanflow samplers need a flow-map checkpoint (--training_mode meanflow or ayf)")
    if settings["guidance_scale"] != 1:
        raise ValueError("the meanflow samplers take no --guidance_scale (guidance is trained into the flow map)")
    model_kwargs = settings["model_kwargs"] or {}

    def flow_map(z, r, t):
        return diffusion.flow_map(model, z, r, t, **model_kwargs)

    return dict(flow_map=flow_map, noise_level=settings["sigma_max"])

