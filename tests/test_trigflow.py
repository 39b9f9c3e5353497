"""TrigFlow and the sCM objective (Lu & Song 2024): EDM conversions, the boundary condition, the tangent against
finite differences, the loss's gradient, samplers, and sCT / sCD on a 2-D mixture of Gaussians."""

import copy
import math

import pytest
import torch

from cm.karras_diffusion import KarrasDenoiser
from cm.nn import mean_flat
from cm.sampling import karras_sample
from cm.modes.scm import (
    normalize_tangent,
    scm_losses,
    scm_tangent,
    tangent_warmup,
    trigflow_jvp,
    trigflow_t_lognormal,
)
from cm.networks import LogVarianceHead
from cm.trigflow import (
    T_MID,
    TrigFlowDenoiser,
    edm_to_trigflow,
    output_from_denoised,
    sample_trigflow,
    sample_trigflow_onestep,
    sample_trigflow_twostep,
    sigma_to_t,
    t_to_sigma,
    trigflow_f,
    trigflow_sigmas,
    trigflow_to_edm,
    trigflow_velocity,
    trigflow_x_t,
    velocity_from_denoiser,
)
from cm.unet import UNetModel

SIGMA_DATA = 0.5
CENTERS = torch.tensor([[0.6, 0.6], [-0.6, 0.6], [-0.6, -0.6], [0.6, -0.6]])
WEIGHTS = torch.tensor([0.4, 0.3, 0.2, 0.1])
STD = 0.05


class MLP(torch.nn.Module):
    """F(x, c_noise) for 2-D data: an MLP on x, t and sinusoidal features of t."""

    def __init__(self, width=128):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(4))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2 + 9, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, 2),
        )  # fmt: skip

    def forward(self, x, c_noise):
        a = c_noise[:, None] * self.freqs.to(x.dtype)
        return self.net(torch.cat([x, c_noise[:, None], torch.cos(a), torch.sin(a)], dim=1))


def toy_network(x, c_noise):
    """An analytic per-sample F(x, t) with x-t coupling, for exact derivatives."""
    a = torch.arange(1, x[0].numel() + 1, dtype=x.dtype).reshape(x.shape[1:])
    scale = 1 + x.square().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.tanh(0.7 * x + a * c_noise.reshape(-1, *[1] * (x.ndim - 1))) * scale


def mixture_batch(n, generator):
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=generator)
    return CENTERS[k] + STD * torch.randn(n, 2, generator=generator)


def mixture_denoiser(x, sigma, **model_kwargs):
    """The exact EDM denoiser E[x_0 | x_0 + sigma eps = x] of the mixture."""
    var = STD**2 + sigma[:, None, None] ** 2
    offsets = x[:, None, :] - CENTERS[None]
    logits = torch.log(WEIGHTS)[None, :, None] - offsets.square().sum(-1, keepdim=True) / (2 * var)
    return (torch.softmax(logits, dim=1) * (CENTERS[None] + STD**2 / var * offsets)).sum(1)


def mode_statistics(samples):
    """Fraction of samples nearest to each center, each group's mean distance from its center, median distance."""
    distances = torch.cdist(samples, CENTERS)
    nearest = distances.argmin(dim=1)
    weights = torch.bincount(nearest, minlength=4).float() / len(samples)
    offsets = torch.stack([(samples[nearest == i].mean(0) - CENTERS[i]).norm() for i in range(4)])
    return weights, offsets, distances.min(dim=1).values.median()


# ----- TrigFlow <-> EDM ----------------------------------------------------------------------------


def test_edm_conversions_round_trip_and_match_the_edm_process():
    sigma = torch.logspace(-3, math.log10(80), 50, dtype=torch.float64)
    t = sigma_to_t(sigma, SIGMA_DATA)
    assert ((t_to_sigma(t, SIGMA_DATA) - sigma).abs() / sigma).max() < 1e-6
    assert ((sigma_to_t(t_to_sigma(t, SIGMA_DATA), SIGMA_DATA) - t).abs()).max() < 1e-6
    assert t.min() > 0 and t.max() < math.pi / 2
    assert abs(sigma_to_t(torch.tensor(80.0, dtype=torch.float64)).item() - 1.56454) < 1e-5  # sCM's T

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 50, 3, 4, 4, dtype=torch.float64, generator=g)
    x = x0 + sigma[:, None, None, None] * eps
    x_t, t2 = edm_to_trigflow(x, sigma, SIGMA_DATA)
    back, sigma2 = trigflow_to_edm(x_t, t2, SIGMA_DATA)
    assert (back - x).abs().max() < 1e-6 * x.abs().max()
    assert ((sigma2 - sigma).abs() / sigma).max() < 1e-6
    # the same process: x_t = cos(t) x_0 + sin(t) z with z = sigma_d eps
    torch.testing.assert_close(x_t, trigflow_x_t(x0, SIGMA_DATA * eps, t2), rtol=1e-12, atol=1e-12)
    # the network input x_t / sigma_d is EDM's c_in(sigma) x
    _, _, c_in = KarrasDenoiser(sigma_data=SIGMA_DATA).get_scalings(sigma)
    torch.testing.assert_close(x_t / SIGMA_DATA, c_in[:, None, None, None] * x, rtol=1e-12, atol=1e-12)


def test_f_at_time_zero_is_the_identity_exactly():
    x = torch.randn(3, 3, 8, 8)
    huge = torch.full_like(x, 1e6)
    assert torch.equal(trigflow_f(huge, x, torch.zeros(3)), x)
    denoiser = TrigFlowDenoiser(sigma_data=SIGMA_DATA)
    _, denoised = denoiser.denoise(lambda x_in, c: x_in * 1e6 + c[:, None, None, None], x, torch.zeros(3))
    assert torch.equal(denoised, x)


def test_trigflow_denoiser_is_edm_preconditioning_with_F_negated():
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)
    _, got = TrigFlowDenoiser(sigma_data=SIGMA_DATA).denoise(toy_network, x, sigma)
    c_skip, c_out, c_in = KarrasDenoiser(sigma_data=SIGMA_DATA).get_scalings(sigma[:, None])
    want = c_skip * x - c_out * toy_network(c_in * x, sigma_to_t(sigma, SIGMA_DATA))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_edm_teacher_velocity():
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(2, 5, 2, dtype=torch.float64, generator=g)
    t = torch.tensor([0.01, 0.3, 0.8, 1.2, 1.56], dtype=torch.float64)
    x_t = trigflow_x_t(x0, z, t)
    # one data point: D = x_0, and the PF-ODE is the straight-in-TrigFlow path cos(t) z - sin(t) x_0
    velocity = velocity_from_denoiser(lambda x, sigma: x0, SIGMA_DATA)
    torch.testing.assert_close(velocity(x_t, t), trigflow_velocity(x0, z, t), rtol=1e-9, atol=1e-9)
    # Gaussian data N(0, sigma_d^2): TrigFlow preserves the variance and the PF-ODE stands still
    gaussian = velocity_from_denoiser(lambda x, s: x * SIGMA_DATA**2 / (SIGMA_DATA**2 + s[:, None] ** 2), SIGMA_DATA)
    assert gaussian(x_t, t).abs().max() < 1e-12
    # F from a denoised value gives that value back through f
    torch.testing.assert_close(trigflow_f(output_from_denoised(x_t, t, x0, SIGMA_DATA), x_t, t, SIGMA_DATA), x0)


# ----- the sCM objective ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["data", "curved"])
def test_tangent_is_the_derivative_of_f_along_the_trajectory(path):
    """scm_tangent / cos(t) from one JVP equals d/dt f(x(t), t) by central differences, along the sCT trajectory
    x(t) = cos(t) x_0 + sin(t) z and along a curve with another direction."""
    g = torch.Generator().manual_seed(0)
    x0, z, a = torch.randn(3, 4, 3, 2, 2, dtype=torch.float64, generator=g) * 0.5
    t = torch.tensor([0.05, 0.4, 0.9, 1.4], dtype=torch.float64)

    def trajectory(s):
        x = trigflow_x_t(x0, z, s)
        return x if path == "data" else x + s[:, None, None, None] ** 2 * a

    dxt_dt = trigflow_velocity(x0, z, t)
    if path == "curved":
        dxt_dt = dxt_dt + 2 * t[:, None, None, None] * a

    def f(s):
        x = trajectory(s)
        return trigflow_f(toy_network(x / SIGMA_DATA, s), x, s, SIGMA_DATA)

    h = 1e-6
    want = (f(t + h) - f(t - h)) / (2 * h)
    x_t = trajectory(t)
    value, output_jvp = trigflow_jvp(toy_network, x_t, t, dxt_dt, SIGMA_DATA)
    torch.testing.assert_close(value, toy_network(x_t / SIGMA_DATA, t))
    g_tangent = scm_tangent(value, output_jvp, x_t, dxt_dt, t, SIGMA_DATA)
    torch.testing.assert_close(g_tangent / torch.cos(t)[:, None, None, None], want, rtol=1e-7, atol=1e-7)
    # warm-up r scales the sin(t) (x_t + sigma_d dF/dt) part only
    cos = torch.cos(t)[:, None, None, None]
    warm = scm_tangent(value, output_jvp, x_t, dxt_dt, t, SIGMA_DATA, warmup=0.0)
    torch.testing.assert_close(warm, -cos**2 * (SIGMA_DATA * value - dxt_dt))


def test_tangent_normalisation_and_warmup():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    torch.testing.assert_close(normalize_tangent(g, 0.1), torch.tensor([[3 / 5.1, 4 / 5.1], [0.0, 0.0]]))
    assert [tangent_warmup(s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert tangent_warmup(0, 0) == 1.0
    with pytest.raises(ValueError, match="warmup_steps"):
        tangent_warmup(1, -1)


def test_lognormal_proposal():
    t = trigflow_t_lognormal(20000, p_mean=-1.0, p_std=1.4, sigma_data=SIGMA_DATA,
                             generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert t.dtype == torch.float64 and t.min() > 0 and t.max() < math.pi / 2
    log_tau = torch.log(SIGMA_DATA * torch.tan(t))
    assert abs(log_tau.mean().item() + 1.0) < 0.03 and abs(log_tau.std().item() - 1.4) < 0.03


def test_loss_value_gradient_and_adaptive_weighting():
    """loss = exp(-u) mean(g_n^2) + u in value; its gradient is -2 exp(-u) mean(g_n . dF/dtheta) (sCM Sec. 4.2)."""
    model, head = MLP(), LogVarianceHead(16)
    with torch.no_grad():
        head.linear.bias.fill_(0.3)
    x0 = mixture_batch(64, torch.Generator().manual_seed(0))
    t = trigflow_t_lognormal(64, generator=torch.Generator().manual_seed(1)).float()
    noise = torch.randn(64, 2)
    terms = scm_losses(model, x0, t=t, noise=noise, logvar_head=head)
    assert terms["loss"].shape == terms["mse"].shape == terms["logvar"].shape == (64,)
    torch.testing.assert_close(terms["logvar"], torch.full((64,), 0.3))
    torch.testing.assert_close(terms["sigma"], SIGMA_DATA * torch.tan(t))

    # the tangent the loss used, recomputed
    z = noise * SIGMA_DATA
    x_t, dxt_dt = trigflow_x_t(x0, z, t), trigflow_velocity(x0, z, t)
    value, output_jvp = trigflow_jvp(model, x_t, t, dxt_dt)
    g_n = normalize_tangent(scm_tangent(value.detach(), output_jvp.detach(), x_t, dxt_dt, t))
    torch.testing.assert_close(terms["mse"], mean_flat(g_n**2))
    torch.testing.assert_close(terms["loss"], math.exp(-0.3) * mean_flat(g_n**2) + 0.3)

    grads = torch.autograd.grad(terms["loss"].mean(), list(model.parameters()), retain_graph=True)
    surrogate = (-2 * math.exp(-0.3) * mean_flat(model(x_t / SIGMA_DATA, t) * g_n)).mean()
    for got, want in zip(grads, torch.autograd.grad(surrogate, list(model.parameters()))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # the head learns toward u = log mse
    (terms["loss"].mean()).backward()
    assert head.linear.bias.grad.item() == pytest.approx((1 - (math.exp(-0.3) * terms["mse"]).mean()).item())


def test_exact_consistency_model_of_gaussian_data_is_a_fixed_point_of_scd():
    """Data N(0, sigma_d^2 I): the PF-ODE stands still, f(x, t) = x, i.e. F = -tan(t / 2) x / sigma_d; its tangent
    is zero, so the sCD loss is zero (and a wrong F is not)."""
    x0 = torch.randn(8, 3, 4, 4, dtype=torch.float64) * SIGMA_DATA
    t = torch.linspace(0.05, 1.5, 8, dtype=torch.float64)
    teacher = velocity_from_denoiser(lambda x, s: x * SIGMA_DATA**2 / (SIGMA_DATA**2 + s.view(-1, 1, 1, 1) ** 2))

    def exact(x_in, c_noise):
        return -torch.tan(c_noise / 2).view(-1, 1, 1, 1) * x_in

    terms = scm_losses(exact, x0, t=t, teacher=teacher)
    assert terms["mse"].max() < 1e-20 and terms["loss"].max() < 1e-20
    assert scm_losses(lambda x_in, c: 0.9 * exact(x_in, c), x0, t=t, teacher=teacher)["mse"].min() > 1e-4


@pytest.mark.parametrize("distill", [False, True])
def test_scm_loss_on_a_unet_with_attention_and_dropout(distill):
    torch.manual_seed(0)
    model = UNetModel(8, 3, 32, 3, 1, (1, 2), dropout=0.1, channel_mult=(1, 2), num_classes=3,
                      num_head_channels=16).train()  # fmt: skip
    teacher = None
    if distill:
        edm, teacher_net = KarrasDenoiser(sigma_data=SIGMA_DATA), copy.deepcopy(model).eval()
        teacher = velocity_from_denoiser(lambda x, s, **kw: edm.denoise(teacher_net, x, s, **kw)[1], SIGMA_DATA)
    head = LogVarianceHead(32)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    labels = {"y": torch.tensor([0, 1, 2, 1])}  # reach the student and the teacher alike
    terms = scm_losses(model, x0, teacher=teacher, model_kwargs=labels, logvar_head=head, warmup=0.5)
    terms["loss"].mean().backward()
    assert torch.isfinite(terms["loss"]).all() and terms["loss"].shape == (4,)
    assert ((terms["t"] > 0) & (terms["t"] < math.pi / 2)).all()
    # the normalised tangent has norm < 1: mse < 1 / D
    assert (terms["mse"] < 1 / x0[0].numel()).all()
    assert model.out[-1].weight.grad.abs().sum() > 0 and head.linear.weight.grad is not None


# ----- samplers ------------------------------------------------------------------------------------


def test_samplers_walk_trigflow_times():
    seen = []
    x = torch.randn(5, 2) * 80

    def denoiser(x, sigma):
        return torch.full_like(x, sigma[0].item())

    callback = lambda d: seen.append(d["sigma"])  # noqa: E731
    sigmas = torch.tensor([80.0, 3.0, 0.0], dtype=torch.float64)
    out = sample_trigflow_onestep(denoiser, x, sigmas, callback=callback)
    assert seen == [80.0] and torch.equal(out, torch.full_like(x, 80.0))
    seen.clear()
    sample_trigflow_twostep(denoiser, x, sigmas, callback=callback)
    assert seen == pytest.approx([80.0, SIGMA_DATA * math.tan(T_MID)])
    seen.clear()
    sample_trigflow(denoiser, x, sigmas, callback=callback)
    assert seen == [80.0, 3.0]
    torch.testing.assert_close(trigflow_sigmas([1.1], SIGMA_DATA), torch.tensor([SIGMA_DATA * math.tan(1.1)],
                                                                                dtype=torch.float64))  # fmt: skip


def test_karras_sample_runs_a_trigflow_checkpoint():
    model = MLP()
    diffusion = TrigFlowDenoiser(sigma_data=SIGMA_DATA)
    torch.manual_seed(1)
    samples = karras_sample(diffusion, model, (16, 2), steps=2, sampler="trigflow_twostep", clip_denoised=False)
    assert samples.shape == (16, 2) and torch.isfinite(samples).all()


# ----- sCT and sCD on a 2-D mixture --------------------------------------------------------------


def train_scm(steps, teacher=None, warmup_steps=100, batch_size=256):
    """Adam (beta2 0.99, lr 1e-3 decaying linearly to 1e-4) on the sCM loss with the adaptive weighting; returns the
    EMA (0.99) of the network."""
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(0)
    model, head = MLP(), LogVarianceHead(32)
    ema = copy.deepcopy(model)
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=1e-3, betas=(0.9, 0.99), foreach=True)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - 0.9 * step / steps)
    for step in range(steps):
        terms = scm_losses(model, mixture_batch(batch_size, data), teacher=teacher, logvar_head=head,
                           warmup=tangent_warmup(step, warmup_steps))  # fmt: skip
        opt.zero_grad()
        terms["loss"].mean().backward()
        opt.step()
        decay.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 0.01)
    return ema


def sample_modes(model, sampler):
    torch.manual_seed(123)
    x_T = torch.randn(4000, 2) * 80.0
    denoiser = TrigFlowDenoiser(sigma_data=SIGMA_DATA)
    samples = sampler(lambda x, s: denoiser.denoise(model, x, s)[1], x_T, torch.tensor([80.0, 0.0]))
    return mode_statistics(samples)


def test_sct_recovers_the_modes_in_one_and_two_steps():
    model = train_scm(1000)
    for sampler in (sample_trigflow_onestep, sample_trigflow_twostep):
        weights, offsets, median = sample_modes(model, sampler)
        assert torch.allclose(weights, WEIGHTS, atol=0.08), (sampler.__name__, weights)
        assert (offsets < 0.2).all(), (sampler.__name__, offsets)
        assert median < 0.25, (sampler.__name__, median)  # samples blurred over the modes would be ~0.8 away


def test_scd_from_the_exact_mixture_denoiser_recovers_the_modes():
    model = train_scm(1000, teacher=velocity_from_denoiser(mixture_denoiser, SIGMA_DATA))
    for sampler in (sample_trigflow_onestep, sample_trigflow_twostep):
        weights, offsets, median = sample_modes(model, sampler)
        assert torch.allclose(weights, WEIGHTS, atol=0.04), (sampler.__name__, weights)
        assert (offsets < 0.2).all(), (sampler.__name__, offsets)
        assert median < 0.25, (sampler.__name__, median)
