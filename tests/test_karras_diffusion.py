import math

import pytest
import torch

from cm.karras_diffusion import KarrasDenoiser, get_weightings, lognormal_index_probs
from cm.random_util import DeviceRNG
from cm.sampling import get_sigmas_karras, karras_sigma


class Recorder(torch.nn.Module):
    """A fake network returning a fixed function of its inputs and recording them."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.w = torch.nn.Parameter(torch.tensor(1.0))

    def forward(self, x, t, **kwargs):
        self.calls.append((x.detach().clone(), t.detach().clone(), kwargs))
        return self.w * torch.tanh(x) + 0.1 * t.view(-1, *([1] * (x.ndim - 1))) / 1000


def test_boundary_condition_is_identity_at_sigma_min():
    d = KarrasDenoiser(distillation=True)
    sigma = torch.full((3,), d.sigma_min)
    c_skip, c_out, _ = d.get_scalings_for_boundary_condition(sigma)
    assert torch.equal(c_skip, torch.ones(3))
    assert torch.equal(c_out, torch.zeros(3))
    x = torch.randn(3, 3, 8, 8)
    _, denoised = d.denoise(Recorder(), x, sigma)
    assert torch.equal(denoised, x)


def test_boundary_condition_holds_at_the_end_of_the_karras_grid():
    d = KarrasDenoiser(distillation=True)
    for n in (2, 18, 40, 151, 201, 1281):
        last = karras_sigma(torch.tensor([n - 1]), n, d.sigma_min, d.sigma_max, d.rho).float()
        x = torch.randn(1, 3, 4, 4)
        assert torch.equal(d.denoise(Recorder(), x, last)[1], x), n


def test_edm_scalings_match_hand_computed_values():
    d = KarrasDenoiser(sigma_data=0.5)
    s = torch.tensor([0.5, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in = d.get_scalings(s)
    assert torch.allclose(c_skip, torch.tensor([0.5, 0.25 / 1.25, 0.25 / 6400.25], dtype=torch.float64))
    assert torch.allclose(c_out, torch.tensor([0.25 / math.sqrt(0.5), 0.5 / math.sqrt(1.25), 40 / math.sqrt(6400.25)], dtype=torch.float64))
    assert torch.allclose(c_in, torch.tensor([1 / math.sqrt(0.5), 1 / math.sqrt(1.25), 1 / math.sqrt(6400.25)], dtype=torch.float64))
    # EDM App. B.6: c_out^2 = c_skip^2 (s^2 + sd^2) - 2 c_skip sd^2 + sd^2 (unit-variance training target)
    assert torch.allclose(c_skip**2 * (s**2 + 0.25) - 2 * c_skip * 0.25 + 0.25, c_out**2, atol=1e-12)


def test_boundary_scalings_hand_computed():
    d = KarrasDenoiser(sigma_data=0.5, sigma_min=0.002)
    s = torch.tensor([1.0], dtype=torch.float64)
    c_skip, c_out, c_in = d.get_scalings_for_boundary_condition(s)
    assert c_skip.item() == pytest.approx(0.25 / (0.998**2 + 0.25))
    assert c_out.item() == pytest.approx(0.998 * 0.5 / math.sqrt(1.25))
    assert c_in.item() == pytest.approx(1 / math.sqrt(1.25))


def test_weightings_hand_computed():
    snr = torch.tensor([0.25, 4.0])
    assert torch.allclose(get_weightings("snr", snr, 0.5), snr)
    assert torch.allclose(get_weightings("snr+1", snr, 0.5), snr + 1)
    assert torch.allclose(get_weightings("karras", snr, 0.5), torch.tensor([4.25, 8.0]))
    assert torch.allclose(get_weightings("truncated-snr", snr, 0.5), torch.tensor([1.0, 4.0]))
    assert torch.allclose(get_weightings("uniform", snr, 0.5), torch.ones(2))
    d = KarrasDenoiser(weight_schedule="ict")
    assert torch.allclose(d.loss_weights(torch.tensor([3.0]), torch.tensor([1.0])), torch.tensor([0.5]))


def test_denoise_feeds_c_in_x_and_rescaled_t_exactly_like_the_reference():
    d = KarrasDenoiser(distillation=False)
    net = Recorder()
    x = torch.randn(2, 3, 4, 4)
    sigma = torch.tensor([0.3, 20.0])
    out, denoised = d.denoise(net, x, sigma, y=torch.tensor([1, 2]))
    seen_x, seen_t, kwargs = net.calls[0]
    c_skip, c_out, c_in = d.get_scalings(sigma)
    assert torch.equal(seen_x, c_in.view(-1, 1, 1, 1) * x)
    assert torch.equal(seen_t, 1000 * 0.25 * torch.log(sigma + 1e-44))
    assert torch.equal(kwargs["y"], torch.tensor([1, 2]))
    assert torch.allclose(denoised, c_out.view(-1, 1, 1, 1) * out + c_skip.view(-1, 1, 1, 1) * x)


def test_adjacent_sigmas_are_neighbours_on_the_grid():
    d = KarrasDenoiser()
    grid = get_sigmas_karras(18, d.sigma_min, d.sigma_max)[:-1].float()
    t, t2 = d.sample_adjacent_sigmas(18, 256, "cpu")
    idx = torch.searchsorted(-grid, -t)
    assert torch.equal(grid[idx], t)
    assert torch.equal(grid[idx + 1], t2)
    assert (t > t2).all()


def test_lognormal_index_probabilities_follow_ict():
    d = KarrasDenoiser(index_sampler="lognormal")
    grid = karras_sigma(torch.arange(11), 11, 0.002, 80.0)
    p = lognormal_index_probs(grid, -1.1, 2.0)
    assert p.shape == (10,) and torch.isclose(p.sum(), torch.tensor(1.0, dtype=p.dtype))
    phi = lambda s: 0.5 * (1 + math.erf((math.log(s) + 1.1) / (2.0 * math.sqrt(2))))  # noqa: E731
    raw = [phi(grid[i].item()) - phi(grid[i + 1].item()) for i in range(10)]
    assert torch.allclose(p, torch.tensor(raw, dtype=p.dtype) / sum(raw))
    t, _ = d.sample_adjacent_sigmas(11, 20000, "cpu")
    counts = torch.stack([(t == grid[i].float()).float().mean() for i in range(10)])
    assert torch.allclose(counts, p.float(), atol=0.02)


def test_target_pass_replays_the_online_dropout_mask():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Dropout(0.5))
    seen = []

    def model(x, t):
        out = net(x)
        seen.append(out.detach() != 0)
        return out

    d = KarrasDenoiser(distillation=True, loss_norm="l2")
    x = torch.ones(4, 3, 8, 8)
    d.consistency_losses(model, x, 10, target_model=model)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


def test_device_rng_roundtrip_on_cpu():
    rng = DeviceRNG("cpu")
    state = rng.get_state()
    a = torch.rand(3)
    rng.set_state(state)
    assert torch.equal(a, torch.rand(3))


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(weight_schedule="sqrt"), "weight_schedule 'sqrt'"),
        (dict(loss_norm="l3"), "loss_norm 'l3'"),
        (dict(index_sampler="beta"), "index_sampler 'beta'"),
        (dict(sigma_min=1.0, sigma_max=0.5), "sigma_min"),
    ],
)
def test_bad_options_give_one_clear_error(kwargs, needle):
    with pytest.raises(ValueError, match=needle) as info:
        KarrasDenoiser(**kwargs)
    assert "\n" not in str(info.value)


def test_consistency_losses_need_a_target():
    with pytest.raises(ValueError, match="target_model"):
        KarrasDenoiser().consistency_losses(Recorder(), torch.zeros(1, 3, 4, 4), 10)
