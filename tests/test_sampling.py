import math

import pytest
import torch

from cm.karras_diffusion import KarrasDenoiser
from cm.random_util import get_generator
from cm.sampling import (
    SAMPLER_NAMES,
    get_sigmas_karras,
    heun_step,
    karras_sample,
    karras_sigma,
    make_denoiser,
    sample_dpm,
    sample_euler,
    sample_heun,
)

SD = 0.5  # data ~ N(0, SD^2): the exact denoiser and PF-ODE flow are known in closed form


def gaussian_denoiser(x, sigma):
    """E[x0 | x_sigma] for x0 ~ N(0, SD^2)."""
    s = sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return x * SD**2 / (SD**2 + s**2)


def exact_flow(x_T, t_from, t_to):
    """PF-ODE solution for Gaussian data: x(t) scales with sqrt(SD^2 + t^2)."""
    return x_T * math.sqrt(SD**2 + t_to**2) / math.sqrt(SD**2 + t_from**2)


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.emb = torch.nn.Linear(1, 3)

    def forward(self, x, t, y=None):
        return self.conv(x) + self.emb(t[:, None] / 250).view(-1, 3, 1, 1)


def test_karras_grid_matches_the_paper_formula():
    n, smin, smax, rho = 40, 0.002, 80.0, 7.0
    sig = get_sigmas_karras(n, smin, smax, rho)
    assert sig.shape == (n + 1,) and sig[-1] == 0
    for i in (0, 1, 17, 22, 39):
        expect = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        assert sig[i].item() == pytest.approx(expect, rel=1e-12)
    assert sig[0].item() == pytest.approx(80.0) and sig[n - 1].item() == pytest.approx(0.002)
    assert (sig[:-1][1:] < sig[:-1][:-1]).all()


@pytest.mark.parametrize("sampler, order", [(sample_heun, 2), (sample_euler, 1), (sample_dpm, 2)])
def test_ode_samplers_converge_to_the_exact_flow_at_their_order(sampler, order):
    x_T = torch.randn(4, 3, 4, 4, dtype=torch.float64) * 80.0
    errors = []
    for steps in (32, 128):
        sigmas = get_sigmas_karras(steps, 0.002, 80.0)[:-1]  # stop at sigma_min, where the flow is known
        out = sampler(gaussian_denoiser, x_T, sigmas)
        errors.append((out - exact_flow(x_T, 80.0, 0.002)).abs().max().item())
    # 4x the steps divides the global error by ~4^order
    assert errors[0] / errors[1] > 0.75 * 4**order


def test_heun_step_is_second_order():
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64) * 10
    errs = []
    for h in (1.0, 0.5):
        t, t2 = torch.full((2,), 10.0, dtype=torch.float64), torch.full((2,), 10.0 - h, dtype=torch.float64)
        errs.append((heun_step(gaussian_denoiser, x, t, t2) - exact_flow(x, 10.0, 10.0 - h)).abs().max().item())
    assert errs[0] / errs[1] > 6  # ~8 for a 3rd-order local error


def make(distillation=True):
    torch.manual_seed(0)
    return TinyNet(), KarrasDenoiser(distillation=distillation)


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_is_deterministic_under_a_seed(sampler):
    model, diffusion = make()
    kw = dict(steps=6, sampler=sampler, s_churn=1.0, ts=(0, 3, 5) if sampler == "multistep" else None)
    a = karras_sample(diffusion, model, (3, 3, 8, 8), generator=get_generator("determ", 3, 7), **kw)
    b = karras_sample(diffusion, model, (3, 3, 8, 8), generator=get_generator("determ", 3, 7), **kw)
    c = karras_sample(diffusion, model, (3, 3, 8, 8), generator=get_generator("determ", 3, 8), **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_onestep_is_the_denoiser_at_sigma_max():
    model, diffusion = make()
    g = get_generator("determ", 2, 0)
    x = karras_sample(diffusion, model, (2, 3, 8, 8), steps=40, sampler="onestep", generator=g, clip_denoised=False)
    x_T = get_generator("determ", 2, 0).randn(2, 3, 8, 8) * 80.0
    expect = diffusion.denoise(model, x_T, torch.full((2,), 80.0))[1].clamp(-1, 1)
    assert torch.equal(x, expect)


def test_multistep_visits_exactly_the_requested_grid_points():
    model, diffusion = make()
    seen = []
    karras_sample(
        diffusion, model, (2, 3, 8, 8), steps=40, sampler="multistep", ts=(0, 22, 39),
        callback=lambda info: seen.append(info["sigma"]),
    )
    expect = [karras_sigma(i, 40, 0.002, 80.0) for i in (0, 22)]
    assert seen == pytest.approx(expect, rel=1e-12)


def test_multistep_renoises_to_the_next_level():
    """Alg. 1: after denoising at tau_n the sample is x0 + sqrt(tau_(n+1)^2 - eps^2) z."""
    seen = []
    zero = lambda x, s: torch.zeros_like(x)  # noqa: E731
    from cm.sampling import stochastic_iterative_sampler

    x = torch.zeros(20000, 1, 1, 1)
    out = stochastic_iterative_sampler(zero, x, None, get_generator("dummy"), ts=(0, 10, 20), steps=21,
                                       callback=lambda info: seen.append(info["x"].std().item()))
    assert seen[1] == pytest.approx(math.sqrt(karras_sigma(10, 21, 0.002, 80.0) ** 2 - 0.002**2), rel=0.03)
    assert torch.equal(out, torch.zeros_like(out))  # last level eps: no noise added


def exact_consistency(x, sigma, t_min=0.002):
    """The exact consistency function of N(0, SD^2) data: the PF-ODE flow from sigma to t_min."""
    s = sigma.view(-1, *([1] * (x.ndim - 1))).to(torch.float64)
    return (x * math.sqrt(SD**2 + t_min**2) / torch.sqrt(SD**2 + s**2)).to(x.dtype)


@pytest.mark.parametrize("gamma", [1.0, 0.8, 0.5, 0.0])
def test_ctm_gamma_two_step_spread_on_gaussian_data_matches_its_closed_form(gamma):
    """Two steps T -> s of the exact consistency function k_sigma x (k_sigma = sqrt(SD^2 + t_min^2) / sqrt(SD^2 +
    sigma^2)) re-noised along sqrt(1 - gamma^2) eps_hat + gamma z: x1 = T k_T z, eps_hat = (1 - k_T) z, so the
    output has std k_s sqrt((T k_T + s' a (1 - k_T))^2 + s'^2 gamma^2), a = sqrt(1 - gamma^2), s' = sqrt(s^2 - t_min^2).
    gamma = 1 (the CM paper) keeps the data's spread; below 1 the Euler jump widens it."""
    from cm.sampling import stochastic_iterative_sampler

    t_max, t_min, steps, ts = 80.0, 0.002, 41, (0, 23, 40)
    s = karras_sigma(23, steps, t_min, t_max)
    k = lambda sigma: math.sqrt(SD**2 + t_min**2) / math.sqrt(SD**2 + sigma**2)  # noqa: E731
    a, s_renoise = math.sqrt(1 - gamma**2), math.sqrt(s**2 - t_min**2)
    expect = k(s) * math.sqrt((t_max * k(t_max) + s_renoise * a * (1 - k(t_max))) ** 2 + (s_renoise * gamma) ** 2)
    g = get_generator("determ", 200_000, 0)
    x_T = g.randn(200_000, 1, 1, 1, dtype=torch.float64) * t_max
    out = stochastic_iterative_sampler(exact_consistency, x_T, None, g, ts=ts, steps=steps, ctm_gamma=gamma)
    assert out.std().item() == pytest.approx(expect, rel=0.01)
    if gamma == 1.0:
        assert out.std().item() == pytest.approx(math.sqrt(SD**2 + t_min**2), rel=0.01)
    else:
        assert out.std().item() > 1.05 * SD


def test_ctm_gamma_one_is_the_cm_papers_multistep_and_zero_ignores_the_fresh_noise():
    from cm.sampling import renoise_direction, stochastic_iterative_sampler

    model, diffusion = make()
    kw = dict(steps=10, sampler="multistep", ts=(0, 4, 7, 9))
    plain = karras_sample(diffusion, model, (2, 3, 8, 8), generator=get_generator("determ", 2, 5), **kw)
    one = karras_sample(diffusion, model, (2, 3, 8, 8), generator=get_generator("determ", 2, 5), ctm_gamma=1.0, **kw)
    mixed = karras_sample(diffusion, model, (2, 3, 8, 8), generator=get_generator("determ", 2, 5), ctm_gamma=0.8, **kw)
    assert torch.equal(plain, one) and not torch.equal(plain, mixed)

    x, x0, fresh = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(renoise_direction(x, x0, 2.0, fresh, 1.0), fresh)
    assert torch.allclose(renoise_direction(x, x0, 2.0, fresh, 0.6), 0.8 * (x - x0) / 2.0 + 0.6 * fresh)

    def denoiser(x, sigma):
        return diffusion.denoise(model, x, sigma)[1].clamp(-1, 1)

    x_T = get_generator("determ", 2, 0).randn(2, 3, 8, 8) * 80.0
    runs = [stochastic_iterative_sampler(denoiser, x_T, None, get_generator("determ", 2, seed), ts=(0, 4, 9),
                                         steps=10, ctm_gamma=0.0) for seed in (1, 2)]
    assert torch.equal(runs[0], runs[1])  # gamma 0: deterministic given x_T


def test_determ_indiv_is_independent_of_batch_size():
    model, diffusion = make()
    kw = dict(steps=10, sampler="multistep", ts=(0, 5, 9))
    full = karras_sample(diffusion, model, (6, 3, 8, 8), generator=get_generator("determ-indiv", 6, 3), **kw)
    g = get_generator("determ-indiv", 6, 3)
    parts = []
    for start in range(0, 6, 2):
        g.set_done_samples(start)
        parts.append(karras_sample(diffusion, model, (2, 3, 8, 8), generator=g, **kw))
    assert torch.allclose(full, torch.cat(parts), atol=1e-6)


def test_determ_is_independent_of_batch_size():
    g1 = get_generator("determ", 6, 1)
    full = g1.randn(6, 3)
    g2 = get_generator("determ", 6, 1)
    parts = []
    for start in range(0, 6, 3):
        g2.set_done_samples(start)
        parts.append(g2.randn(3, 3))
    assert torch.equal(full, torch.cat(parts))


def test_model_kwargs_default_works():
    model, diffusion = make(distillation=False)
    out = karras_sample(diffusion, model, (1, 3, 8, 8), steps=3, sampler="heun", model_kwargs=None)
    assert out.shape == (1, 3, 8, 8)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(sampler="ddim"), "unknown sampler 'ddim'"),
        (dict(sampler="multistep", ts=(0, 50)), "ts must be"),
        (dict(sampler="multistep", ts=(5, 2)), "strictly increasing"),
        (dict(sampler="multistep", ts=(0, 20, 39), ctm_gamma=1.5), r"must lie in \[0, 1\]"),
        (dict(sampler="heun", ctm_gamma=0.5), "applies to --sampler multistep only"),
    ],
)
def test_bad_sampler_arguments(kwargs, needle):
    model, diffusion = make()
    with pytest.raises(ValueError, match=needle):
        karras_sample(diffusion, model, (1, 3, 8, 8), steps=40, **kwargs)


def test_unknown_generator():
    with pytest.raises(ValueError, match="unknown generator 'seeded'"):
        get_generator("seeded")


# ----- the reference's noise-drawing order, replayed ----------------------------------------------
# The replay below is written from openai/consistency_models' cm/karras_diffusion.py: float32 Karras grid
# from linspace, x_T = generator.randn(shape) * sigma_max, and each sampler's loop with its draws where the
# reference makes them (heun / dpm: churn noise at every step, also when gamma is 0; euler_ancestral: at every
# step, the last included; multistep: after every denoising, the last included).


class CountingGenerator:
    """Wraps a cm.random_util generator and counts its draws."""

    def __init__(self, inner):
        self.inner, self.draws = inner, 0

    def randn(self, *size, **kwargs):
        self.draws += 1
        return self.inner.randn(*size, **kwargs)

    def randn_like(self, tensor):
        self.draws += 1
        return self.inner.randn_like(tensor)


def replay_grid(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def replay_churn_sampler(D, x, sigmas, g, midpoint, s_churn, s_tmin, s_tmax, s_noise):
    ones = x.new_ones([x.shape[0]])
    n = len(sigmas) - 1
    for i in range(n):
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
        eps = g.randn_like(x) * s_noise
        s_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (s_hat**2 - sigmas[i] ** 2) ** 0.5
        d = (x - D(x, s_hat * ones)) / s_hat
        if midpoint:
            s_mid = ((s_hat ** (1 / 3) + sigmas[i + 1] ** (1 / 3)) / 2) ** 3
            x_2 = x + d * (s_mid - s_hat)
            x = x + (x_2 - D(x_2, s_mid * ones)) / s_mid * (sigmas[i + 1] - s_hat)
        elif sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - s_hat)
        else:
            x_2 = x + d * (sigmas[i + 1] - s_hat)
            d_2 = (x_2 - D(x_2, sigmas[i + 1] * ones)) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * (sigmas[i + 1] - s_hat)
    return x


def replay_ancestral(D, x, sigmas, g):
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
        down = (s_next**2 - up**2) ** 0.5
        x = x + (x - D(x, s * ones)) / s * (down - s)
        x = x + g.randn_like(x) * up
    return x


def replay_euler(D, x, sigmas):
    ones = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x = x + (x - D(x, sigmas[i] * ones)) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def replay_multistep(D, x, g, ts, steps, t_min=0.002, t_max=80.0, rho=7.0):
    ones = x.new_ones([x.shape[0]])
    hi, lo = t_max ** (1 / rho), t_min ** (1 / rho)
    for i in range(len(ts) - 1):
        t = (hi + ts[i] / (steps - 1) * (lo - hi)) ** rho
        x0 = D(x, t * ones)
        t_next = min(max((hi + ts[i + 1] / (steps - 1) * (lo - hi)) ** rho, t_min), t_max)
        x = x0 + g.randn_like(x) * math.sqrt(t_next**2 - t_min**2)
    return x


def replay_karras_sample(diffusion, model, shape, steps, sampler, g, ts=None, **churn):
    D = make_denoiser(diffusion, model)
    sigmas = replay_grid(steps + 1 if sampler == "progdist" else steps)
    x = g.randn(*shape) * 80.0
    if sampler in ("heun", "dpm"):
        x = replay_churn_sampler(D, x, sigmas, g, sampler == "dpm", **churn)
    elif sampler == "ancestral":
        x = replay_ancestral(D, x, sigmas, g)
    elif sampler == "euler":
        x = replay_euler(D, x, sigmas)
    elif sampler == "progdist":
        x = replay_euler(D, x, sigmas[:-1])
    elif sampler == "onestep":
        x = D(x, sigmas[0] * x.new_ones([x.shape[0]]))
    else:
        x = replay_multistep(D, x, g, ts, steps)
    return x.clamp(-1, 1)


CHURN_OFF = dict(s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0)
CHURN_WINDOW = dict(s_churn=3.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003)  # gamma > 0 only inside the window


@pytest.mark.parametrize(
    "sampler, churn",
    [
        ("heun", CHURN_OFF),
        ("heun", CHURN_WINDOW),
        ("dpm", CHURN_OFF),
        ("dpm", CHURN_WINDOW),
        ("ancestral", {}),
        ("euler", {}),
        ("progdist", {}),
        ("onestep", {}),
        ("multistep", {}),
    ],
)
def test_seeded_samples_and_generator_state_equal_the_reference(sampler, churn):
    """Same generator -> same images as the reference, and the generator is left where the reference leaves it
    (the next batch's noise is the reference's too)."""
    model, diffusion = make(distillation=sampler in ("onestep", "multistep"))
    steps, ts = 6, ((0, 2, 5) if sampler == "multistep" else None)
    ours_g = CountingGenerator(get_generator("determ", 2, 11))
    ref_g = CountingGenerator(get_generator("determ", 2, 11))
    ours = karras_sample(diffusion, model, (2, 3, 8, 8), steps=steps, sampler=sampler, generator=ours_g, ts=ts, **churn)
    with torch.no_grad():
        ref = replay_karras_sample(diffusion, model, (2, 3, 8, 8), steps, sampler, ref_g, ts=ts, **churn)
    assert ours_g.draws == ref_g.draws
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), (ours - ref).abs().max()
    assert torch.equal(ours_g.randn(2, 3), ref_g.randn(2, 3))
