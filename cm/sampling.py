"""Samplers for Karras-style denoisers and consistency models.

Every `sample_*` function has the signature
``sample_x(denoiser, x, sigmas, generator=None, progress=False, callback=None, **options)``:
`denoiser(x, sigma_batch)` returns the denoised image, `x` starts at noise level `sigmas[0]`, and
the function walks the noise levels it is given. `karras_sample` turns flags into sigmas and
dispatches. Noise levels are float64; the denoiser sees them in the image dtype.
"""

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .flowmap import flow_grid, flow_map_options, flow_onestep_grid, sample_flow_map
from .guidance import guided_denoiser, takes_guidance
from .nn import append_dims, append_zero
from .random_util import get_generator
from .trigflow import T_MID, sample_trigflow_onestep, sample_trigflow_twostep


def karras_sigma(i, n, sigma_min, sigma_max, rho=7.0):
    """sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, i = 0..n-1 (CM paper Sec. 5, EDM Eq. 5).

    `i` may be a tensor (float64 result) or a number (float result), and may be fractional (progressive
    distillation); the ends i = 0 and i = n - 1 give sigma_max and sigma_min exactly.
    """
    max_inv_rho = sigma_max ** (1 / rho)
    min_inv_rho = sigma_min ** (1 / rho)
    if not torch.is_tensor(i):
        return karras_sigma(torch.tensor(float(i)), n, sigma_min, sigma_max, rho).item()
    i = i.to(torch.float64)
    sigma = (max_inv_rho + i / (n - 1) * (min_inv_rho - max_inv_rho)) ** rho
    # the grid ends are exact, so f(x, sigma_min) = x holds bit for bit
    sigma = torch.where(i == 0, torch.full_like(sigma, sigma_max), sigma)
    return torch.where(i == n - 1, torch.full_like(sigma, sigma_min), sigma)


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
    """The n-point Karras noise grid from sigma_max down to sigma_min, followed by a final 0."""
    sigmas = karras_sigma(torch.arange(n, dtype=torch.float64), n, sigma_min, sigma_max, rho)
    return append_zero(sigmas).to(device)


def sigmas_from_ts(ts, steps, sigma_min, sigma_max, rho=7.0, device="cpu"):
    """Noise levels at grid indices `ts` of the `steps`-point Karras grid (multistep consistency sampling)."""
    ts = [int(t) for t in ts]
    if len(ts) < 2 or any(t < 0 or t > steps - 1 for t in ts) or any(b <= a for a, b in zip(ts, ts[1:])):
        raise ValueError(
            f"ts must be at least two strictly increasing indices in [0, {steps - 1}] (steps={steps}), got {ts}"
        )
    return karras_sigma(torch.tensor(ts, dtype=torch.float64), steps, sigma_min, sigma_max, rho).to(device)


def _per_sample(t, x):
    """A per-sample [B] tensor reshaped to broadcast over x; numbers and 0-d tensors pass unchanged."""
    return append_dims(t, x.ndim) if torch.is_tensor(t) and t.ndim > 0 else t


def to_d(x, sigma, denoised):
    """PF-ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (EDM Eq. 3 with sigma(t) = t)."""
    return (x - denoised) / _per_sample(sigma, x)


def _batch_sigma(sigma, x):
    """A noise level (number or tensor) broadcast to the batch [B], in the image dtype and on its device."""
    if torch.is_tensor(sigma):
        return torch.as_tensor(sigma, device=x.device).to(x.dtype) * x.new_ones([x.shape[0]])
    return x.new_full((x.shape[0],), float(sigma))  # no host-to-device copy


def euler_step(denoiser, x, t_cur, t_next):
    """One Euler step of the PF-ODE from t_cur to t_next (t_* scalars or per-sample [B] tensors)."""
    d = to_d(x, t_cur, denoiser(x, t_cur))
    return x + d * _per_sample(t_next - t_cur, x)


def heun_step(denoiser, x, t_cur, t_next):
    """One Heun (2nd-order) step of the PF-ODE from t_cur to t_next > 0 (EDM Alg. 1, lines 5-8)."""
    dt = _per_sample(t_next - t_cur, x)
    d = to_d(x, t_cur, denoiser(x, t_cur))
    x_euler = x + d * dt
    d_next = to_d(x_euler, t_next, denoiser(x_euler, t_next))
    return x + (d + d_next) / 2 * dt


def _steps(n, progress):
    indices = range(n)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices)
    return indices


def _churn(x, t_cur, n_steps, generator, s_churn, s_tmin, s_tmax, s_noise):
    """EDM Alg. 2, lines 4-6: raise the noise from t_cur to t_hat = (1 + gamma) t_cur with fresh noise,
    gamma = min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax], else 0. Returns (x_hat, t_hat).

    The noise is drawn at every step, also when gamma is 0, as the reference does, so a seeded
    generator gives the reference's samples and is left in the reference's state."""
    gamma = min(s_churn / n_steps, 2**0.5 - 1) if s_tmin <= t_cur <= s_tmax else 0.0
    eps = generator.randn_like(x) * s_noise
    t_hat = t_cur * (gamma + 1)
    if gamma > 0:
        x = x + eps * math.sqrt(t_hat**2 - t_cur**2)
    return x, t_hat


@torch.no_grad()
def sample_onestep(denoiser, x, sigmas, generator=None, progress=False, callback=None):
    """One-step consistency-model generation x_0 = f(x_T, T) (CM paper Alg. 1 with N = 1)."""
    return denoiser(x, _batch_sigma(sigmas[0], x))


@torch.no_grad()
def stochastic_iterative_sampler(
    denoiser,
    x,
    sigmas,
    generator=None,
    ts=None,
    progress=False,
    callback=None,
    t_min=0.002,
    t_max=80.0,
    rho=7.0,
    steps=40,
    ctm_gamma=1.0,
):
    """Multistep consistency sampling (CM paper Alg. 1): denoise, re-noise to the next level, repeat.

    With `ts`, the noise levels are the `steps`-point Karras grid at those indices; otherwise `sigmas`
    (a trailing 0 is ignored). The last level only sets the final re-noising, sqrt(t^2 - t_min^2),
    which is 0 when it is t_min. ctm_gamma < 1 re-noises along renoise_direction (CTM's gamma-sampling);
    1 is Alg. 1's fresh noise.
    """
    check_ctm_gamma("multistep", ctm_gamma)
    generator = generator or get_generator("dummy")
    if ts is not None:
        sigmas = sigmas_from_ts(ts, steps, t_min, t_max, rho, device=x.device)
    elif sigmas[-1] == 0:
        sigmas = sigmas[:-1]
    sigmas = sigmas.tolist()
    for i in _steps(len(sigmas) - 1, progress):
        t_cur, t_next = sigmas[i], min(max(sigmas[i + 1], t_min), t_max)
        # denoise to x0
        x0 = denoiser(x, _batch_sigma(t_cur, x))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": t_cur, "denoised": x0})
        # re-noise to t_next
        noise = renoise_direction(x, x0, t_cur, generator.randn_like(x), ctm_gamma)
        x = x0 + noise * math.sqrt(t_next**2 - t_min**2)
    return x


def check_ctm_gamma(sampler, gamma):
    """Refuse a CTM gamma outside [0, 1], or one other than 1 for a sampler that does not re-noise by it."""
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"--ctm_gamma must lie in [0, 1] (1: fresh noise, 0: deterministic), got {gamma}")
    if gamma != 1.0 and sampler != "multistep":
        raise ValueError(f"--ctm_gamma {gamma} applies to --sampler multistep only, not {sampler}")


def renoise_direction(x, x0, t, fresh, gamma):
    """The unit-variance noise multistep consistency sampling re-noises x0 with: sqrt(1 - gamma^2) eps_hat +
    gamma fresh, where eps_hat = (x - x0) / t is the noise the denoiser removed from x at level t.

    CTM's gamma-sampling (Kim et al., ICLR 2024) for a one-time consistency model: the jump G(x, t, s) along the
    trajectory is the Euler step x0 + s eps_hat, so re-noising x0 to s with this direction keeps a share of the
    trajectory's own noise. gamma = 1: fresh noise only (CM paper Alg. 1, the reference); gamma = 0: deterministic.
    """
    if gamma == 1.0:
        return fresh
    return math.sqrt(1.0 - gamma**2) * (x - x0) / t + gamma * fresh


def lcm_ts(num_steps, steps):
    """num_steps grid indices spread evenly from index 0 of the steps-point grid (LCM's evenly strided timesteps)."""
    if not 1 <= num_steps <= steps:
        raise ValueError(f"LCM sampling takes 1 to {steps} steps on a {steps}-point grid, got {num_steps}")
    return tuple(round(i * (steps - 1) / num_steps) for i in range(num_steps))


def lcm_sigmas(ts, steps, sigma_min, sigma_max, rho=7.0, device="cpu"):
    """Noise levels at increasing grid indices ts of the steps-point Karras grid, then a final 0 (LCM sampling)."""
    ts = [int(t) for t in ts]
    if not ts or any(t < 0 or t > steps - 1 for t in ts) or any(b <= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"ts must be one or more strictly increasing indices in [0, {steps - 1}] (steps={steps}), got {ts}")
    sigmas = karras_sigma(torch.tensor(ts, dtype=torch.float64), steps, sigma_min, sigma_max, rho)
    return append_zero(sigmas).to(device)


@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, generator=None, progress=False, callback=None):
    """LCM's multistep sampling (Luo et al. 2023): denoise to x0, re-noise to the next level with fresh noise
    (x0 + sigma_next z), repeat; the last denoised image is the sample."""
    generator = generator or get_generator("dummy")
    sigmas = sigmas.tolist()
    for i in _steps(len(sigmas) - 1, progress):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        # denoise to x0
        x0 = denoiser(x, _batch_sigma(t_cur, x))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": t_cur, "denoised": x0})
        # re-noise to t_next
        if t_next > 0:
            x = x0 + generator.randn_like(x) * t_next
    return x0


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, generator=None, progress=False, callback=None):
    """Euler solver of the PF-ODE over the given sigmas (EDM Alg. 1 without the Heun correction)."""
    sigmas = sigmas.tolist()
    for i in _steps(len(sigmas) - 1, progress):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _batch_sigma(t_cur, x))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": t_cur, "denoised": denoised})
        x = x + to_d(x, t_cur, denoised) * (t_next - t_cur)
    return x


def _churned_slope(denoiser, x, i, t_cur, n_steps, generator, callback, **churn):
    """Step i's start shared by Heun and DPM-2: churn to t_hat, denoise there, report it; (x_hat, t_hat, dx/dt)."""
    x, t_hat = _churn(x, t_cur, n_steps, generator, **churn)
    denoised = denoiser(x, _batch_sigma(t_hat, x))
    if callback is not None:
        callback({"x": x, "i": i, "sigma": t_cur, "sigma_hat": t_hat, "denoised": denoised})
    return x, t_hat, to_d(x, t_hat, denoised)


@torch.no_grad()
def sample_heun(
    denoiser,
    x,
    sigmas,
    generator=None,
    progress=False,
    callback=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """EDM's stochastic Heun sampler (Karras et al. 2022, Alg. 2); deterministic when s_churn = 0."""
    generator = generator or get_generator("dummy")
    sigmas = sigmas.tolist()
    n = len(sigmas) - 1
    churn = dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    for i in _steps(n, progress):
        t_next = sigmas[i + 1]
        x, t_hat, d = _churned_slope(denoiser, x, i, sigmas[i], n, generator, callback, **churn)
        # Euler step from t_hat to t_next
        x_next = x + d * (t_next - t_hat)
        # 2nd-order correction unless t_next = 0
        if t_next > 0:
            d_next = to_d(x_next, t_next, denoiser(x_next, _batch_sigma(t_next, x)))
            x_next = x + (d + d_next) / 2 * (t_next - t_hat)
        x = x_next
    return x


@torch.no_grad()
def sample_dpm(
    denoiser,
    x,
    sigmas,
    generator=None,
    progress=False,
    callback=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """DPM-Solver-2-like midpoint sampler with EDM churn (k-diffusion's sample_dpm_2); midpoint on a rho=3 grid.

    Like the reference (unlike k-diffusion), the step to sigma = 0 is a midpoint step too."""
    generator = generator or get_generator("dummy")
    sigmas = sigmas.tolist()
    n = len(sigmas) - 1
    churn = dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    for i in _steps(n, progress):
        t_next = sigmas[i + 1]
        x, t_hat, d = _churned_slope(denoiser, x, i, sigmas[i], n, generator, callback, **churn)
        # midpoint step: evaluate at t_mid, move the whole way with that slope
        t_mid = ((t_hat ** (1 / 3) + t_next ** (1 / 3)) / 2) ** 3
        x_mid = x + d * (t_mid - t_hat)
        d_mid = to_d(x_mid, t_mid, denoiser(x_mid, _batch_sigma(t_mid, x)))
        x = x + d_mid * (t_next - t_hat)
    return x


def logsnr_sigmas(n, sigma_min, sigma_max, device="cpu"):
    """n + 1 noise levels from sigma_max down to sigma_min, equally spaced in log-SNR lambda = -log sigma
    (DPM-Solver's "logSNR" time steps for EDM's sigma(t) = t); no final 0."""
    if n < 1:
        raise ValueError(f"the log-SNR grid needs at least one step, got {n}")
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n + 1, dtype=torch.float64)
    sigmas = log_sigmas.exp()
    sigmas[0], sigmas[-1] = sigma_max, sigma_min  # the ends exact
    return sigmas.to(device)


def dpmpp_2m_states(denoiser, x, sigmas, lower_order_final=True, callback=None):
    """The states x_0, x_1, ..., x_N of DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2: data prediction,
    multistep, 2nd order) at the given noise levels, one per yield (x_0 = x itself).

    With h_i = log(sigma_i / sigma_(i+1)) and D_i = D(x_i, sigma_i):
        x_(i+1) = (sigma_(i+1) / sigma_i) x_i + (1 - sigma_(i+1) / sigma_i) (D_i + (D_i - D_(i-1)) / (2 r_i)),
    r_i = h_(i-1) / h_i; the first step is first order (DDIM), and so is the last with lower_order_final (as the
    solver in sony/cmt, at any number of steps). A step to sigma = 0 returns D_i.
    """
    sigmas = sigmas.tolist()
    n = len(sigmas) - 1
    yield x
    denoised_prev, h_prev = None, None
    for i in range(n):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _batch_sigma(t_cur, x))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": t_cur, "denoised": denoised})
        if t_next == 0:
            x = denoised
            yield x
            continue
        h = math.log(t_cur / t_next)
        first_order = denoised_prev is None or (lower_order_final and i == n - 1)
        # the data prediction of the step: D_i, or D_i plus half its backward difference scaled to this step
        target = denoised if first_order else denoised + (denoised - denoised_prev) * (h / h_prev / 2)
        x = x * (t_next / t_cur) + target * (1 - t_next / t_cur)
        denoised_prev, h_prev = denoised, h
        yield x


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, generator=None, progress=False, callback=None, lower_order_final=True):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) over the given sigmas; its last state is the sample."""
    states = dpmpp_2m_states(denoiser, x, sigmas, lower_order_final, callback)
    x = next(states)
    for _ in _steps(len(sigmas) - 1, progress):
        x = next(states)
    return x


def get_ancestral_step(sigma_from, sigma_to):
    """Split a step into a deterministic part down to sigma_down and fresh noise sigma_up (k-diffusion)."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, generator=None, progress=False, callback=None):
    """Ancestral sampling with Euler steps (k-diffusion's sample_euler_ancestral); draws noise at every step,
    the last (sigma_up = 0) included, as the reference does."""
    generator = generator or get_generator("dummy")
    sigmas = sigmas.tolist()
    for i in _steps(len(sigmas) - 1, progress):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, _batch_sigma(t_cur, x))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": t_cur, "sigma_hat": t_cur, "denoised": denoised})
        sigma_down, sigma_up = get_ancestral_step(t_cur, t_next)
        x = x + to_d(x, t_cur, denoised) * (sigma_down - t_cur)
        x = x + generator.randn_like(x) * sigma_up
    return x


@torch.no_grad()
def sample_progdist(denoiser, x, sigmas, generator=None, progress=False, callback=None):
    """Deterministic Euler (DDIM) steps over the given sigmas, stopping at the last nonzero level (PD models)."""
    if sigmas[-1] == 0:
        sigmas = sigmas[:-1]
    return sample_euler(denoiser, x, sigmas, generator, progress=progress, callback=callback)


def make_denoiser(diffusion, model, clip_denoised=True, model_kwargs=None, guidance_scale=1.0):
    """x0 = D(x, sigma [B]) of a network wrapped by a KarrasDenoiser, clamped to [-1, 1] when clip_denoised.

    guidance_scale w: the guidance input of a network built with guidance_embed (LCM students), else classifier-free
    guidance of a network with a null class (cm.guidance); w = 1 is the conditional model itself.
    """
    model_kwargs = model_kwargs or {}

    def denoise(x, sigma, **kwargs):
        return diffusion.denoise(model, x, sigma, **kwargs)[1]

    if takes_guidance(model):
        def base(x, sigma):
            return denoise(x, sigma, **model_kwargs, guidance=x.new_full((x.shape[0],), float(guidance_scale)))
    else:
        base = guided_denoiser(denoise, model, model_kwargs, guidance_scale)

    def denoiser(x, sigma):
        x0 = base(x, sigma)
        return x0.clamp(-1, 1) if clip_denoised else x0

    return denoiser


# ----- the sampler table: karras_sample's dispatch -------------------------------------------------------------


def karras_grid(steps, ts, sigma_min, sigma_max, rho, device):
    """The steps-point Karras grid and a final 0 (EDM solvers, one-step and sCM samplers)."""
    return get_sigmas_karras(steps, sigma_min, sigma_max, rho, device=device)


def progdist_grid(steps, ts, sigma_min, sigma_max, rho, device):
    """steps + 1 Karras levels: a progressive-distillation model of N steps walks N intervals."""
    return get_sigmas_karras(steps + 1, sigma_min, sigma_max, rho, device=device)


def indexed_grid(steps, ts, sigma_min, sigma_max, rho, device):
    """The levels at grid indices ts (default every index) of the steps-point grid (multistep consistency)."""
    return sigmas_from_ts(range(steps) if ts is None else ts, steps, sigma_min, sigma_max, rho, device=device)


def lcm_grid(steps, ts, sigma_min, sigma_max, rho, device):
    """LCM's levels at indices ts of the steps-point grid, ending at 0."""
    return lcm_sigmas(range(steps) if ts is None else ts, steps, sigma_min, sigma_max, rho, device=device)


def logsnr_grid(steps, ts, sigma_min, sigma_max, rho, device):
    """steps + 1 levels from sigma_max to sigma_min equally spaced in log-SNR (DPM-Solver++ with steps steps)."""
    return logsnr_sigmas(steps, sigma_min, sigma_max, device=device)


def no_options(settings):
    """A sampler that takes nothing beyond the shared signature."""
    return {}


def churn_options(settings):
    """EDM's stochastic churn (heun, dpm)."""
    return {k: settings[k] for k in ("s_churn", "s_tmin", "s_tmax", "s_noise")}


def multistep_options(settings):
    """CM paper Alg. 1's grid (its re-noising subtracts sigma_min), and CTM's gamma."""
    return dict(t_min=settings["sigma_min"], t_max=settings["sigma_max"], rho=settings["rho"], steps=settings["steps"],
                ctm_gamma=settings["ctm_gamma"])


def trigflow_twostep_options(settings):
    """sCM two-step: the intermediate TrigFlow time, with the denoiser's sigma_data."""
    t_mid = T_MID if settings["t_mid"] is None else settings["t_mid"]
    return dict(t_mid=t_mid, sigma_data=settings["diffusion"].sigma_data)


@dataclass(frozen=True)
class Sampler:
    """One entry of the sampler table.

    :param fn: sample_x(denoiser, x, sigmas, generator, progress, callback, **options).
    :param grid: (steps, ts, sigma_min, sigma_max, rho, device) -> the noise levels it walks.
    :param options: karras_sample's settings (a dict of its arguments) -> the sampler's own keyword arguments.
    :param example_ts: for samplers whose levels `ts` (grid indices) select: N -> example indices on an N-point
        grid (None: the sampler takes no ts).
    :param any_denoiser: it runs on every denoiser (False: it needs the model's own network, e.g. a flow map's two
        time inputs).
    """

    fn: Callable
    grid: Callable = karras_grid
    options: Callable = no_options
    example_ts: Callable = None
    any_denoiser: bool = True


SAMPLERS = {
    "onestep": Sampler(sample_onestep),
    "multistep": Sampler(stochastic_iterative_sampler, indexed_grid, multistep_options,
                         example_ts=lambda n: (0, round(0.55 * (n - 1)), n - 1)),
    "heun": Sampler(sample_heun, options=churn_options),
    "euler": Sampler(sample_euler),
    "euler_ancestral": Sampler(sample_euler_ancestral),
    "ancestral": Sampler(sample_euler_ancestral),
    "dpm": Sampler(sample_dpm, options=churn_options),
    "progdist": Sampler(sample_progdist, progdist_grid),
    "trigflow_onestep": Sampler(sample_trigflow_onestep),
    "trigflow_twostep": Sampler(sample_trigflow_twostep, options=trigflow_twostep_options),
    "lcm": Sampler(sample_lcm, lcm_grid, example_ts=lambda n: lcm_ts(2, n)),
    "meanflow": Sampler(sample_flow_map, flow_grid, flow_map_options, any_denoiser=False),
    "meanflow_onestep": Sampler(sample_flow_map, flow_onestep_grid, flow_map_options, any_denoiser=False),
    "dpmpp_2m": Sampler(sample_dpmpp_2m, logsnr_grid),
}
# the samplers of every denoiser, less the alias "ancestral"
SAMPLER_NAMES = tuple(name for name, s in SAMPLERS.items() if name != "ancestral" and s.any_denoiser)


def register_sampler(name, sampler):
    """Add a Sampler to the table (a training method's own sampler); its name becomes a --sampler choice."""
    if name in SAMPLERS:
        raise ValueError(f"sampler {name!r} is registered already")
    SAMPLERS[name] = sampler


def karras_sample(
    diffusion,
    model,
    shape,
    steps,
    clip_denoised=True,
    progress=False,
    callback=None,
    model_kwargs=None,
    device=None,
    sigma_min=0.002,
    sigma_max=80,
    rho=7.0,
    sampler="heun",
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
    generator=None,
    ts=None,
    x_T=None,
    guidance_scale=1.0,
    clamp=True,
    t_mid=None,
    ctm_gamma=1.0,
):
    """Draw samples of `shape` from `model` wrapped by `diffusion` (a KarrasDenoiser) with the named sampler.

    :param steps: grid size N (multistep, lcm: the grid `ts` indexes; progdist: N + 1 levels).
    :param ts: multistep / lcm grid indices, e.g. (0, 22, 39); default: every index of the grid.
    :param generator: a cm.random_util generator (default: the global torch RNG).
    :param x_T: starting noise at sigma_max (default: generator.randn(shape) * sigma_max).
    :param guidance_scale: w of classifier-free guidance, or the guidance input of LCM students (1: none).
    :param clamp: clamp the result to [-1, 1] (images; latents are left as they are).
    :param t_mid: the intermediate time of the two-step samplers that take one: trigflow_twostep's TrigFlow time
        (default sCM's 1.1, with the denoiser's sigma_data), tcm_twostep's noise level (default the pair's t').
    :param ctm_gamma: multistep's re-noising, CTM's gamma (renoise_direction): 1 fresh noise (CM paper Alg. 1),
        below 1 a share of the noise each step removed.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}")
    check_ctm_gamma(sampler, ctm_gamma)
    settings = dict(locals())
    entry = SAMPLERS[sampler]
    generator = generator or get_generator("dummy")
    if device is None:
        device = next(model.parameters()).device

    sigmas = entry.grid(steps, ts, sigma_min, sigma_max, rho, device)
    if x_T is None:
        x_T = generator.randn(*shape, device=device) * sigma_max
    denoiser = make_denoiser(diffusion, model, clip_denoised, model_kwargs, guidance_scale)
    x_0 = entry.fn(denoiser, x_T, sigmas, generator, progress=progress, callback=callback, **entry.options(settings))
    return x_0.clamp(-1, 1) if clamp else x_0


def ternary_search(objective, lo, hi):
    """Minimise a unimodal objective over the integers lo..hi (inclusive) by ternary search.

    Each index is evaluated at most once. While more than three candidates remain, the thirds m1 < m2 are
    compared and the side that cannot hold the minimum is dropped; the last two or three are all evaluated.
    Used to pick the intermediate grid index of few-step consistency sampling (CM paper Sec. 6).

    :param objective: callable index -> value to minimise.
    :param lo: smallest candidate index.
    :param hi: largest candidate index (>= lo).
    :return: (index with the lowest value among those evaluated, {index: value} in evaluation order).
    """
    if hi < lo:
        raise ValueError(f"empty search range [{lo}, {hi}]")
    values = {}

    def f(i):
        if i not in values:
            values[i] = objective(i)
        return values[i]

    while hi - lo > 2:
        third = (hi - lo) // 3
        m1, m2 = lo + third, hi - third
        if f(m1) < f(m2):
            hi = m2 - 1
        else:
            lo = m1 + 1
    for i in range(lo, hi + 1):
        f(i)
    return min(values, key=values.get), values
