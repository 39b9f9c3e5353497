"""Latent consistency models: the skipping-step teacher, LCM's boundary scalings, the guided LCM loss, LCF, LCM
sampling, and both modes from the command line with an exact resume."""

import math

import numpy as np
import pytest
import torch

from cm.karras_diffusion import KarrasDenoiser
from cm.modes.lcm import lcm_losses, sample_skip_sigmas, teacher_jump
from cm.nn import C_NOISE_SCALE
from cm.random_util import get_generator
from cm.sampling import euler_step, heun_step, karras_sigma, lcm_sigmas, lcm_ts, sample_lcm
from cm.train_cli import main

from helpers import CFG_FLAGS, TINY_MODEL, load_script, resumes_bit_exactly, tiny_argv, train_cfg_teacher

N = 10
LCM_FLAGS = dict(CFG_FLAGS, guidance_embed="true", w_min=1.0, w_max=3.0, skip_steps=3, start_scales=N)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return train_cfg_teacher(tmp_path_factory.mktemp("cfg_teacher"))


@pytest.fixture(scope="module")
def lcm_path(tmp_path_factory, teacher_path):
    log_dir = tmp_path_factory.mktemp("lcm")
    main("lcm", tiny_argv(log_dir=log_dir, total_training_steps=1, teacher_model_path=teacher_path, **LCM_FLAGS))
    return str(log_dir / "model000001.pt")


# ----- the skipping-step teacher on a toy ODE ----------------------------------------------------------------------


class PointMass:
    """A toy teacher: data concentrated at x_star, so D(x, sigma) = x_star and the PF-ODE path is a straight line."""

    def __init__(self, x_star):
        self.x_star = x_star

    def denoise(self, model, x, sigma, **kwargs):
        return None, self.x_star.expand_as(x)


class Recorder(torch.nn.Module):
    """A network that outputs zeros and remembers its inputs (c_in x, c_noise)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, c_noise, **kwargs):
        self.calls.append((x.detach().clone(), c_noise.detach().clone()))
        return x * self.weight


def grid(n):
    return karras_sigma(torch.arange(n, dtype=torch.float64), n, 0.002, 80.0)


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_one_jump_of_k_grid_steps_equals_k_single_teacher_steps_on_a_toy_ode(solver):
    x_star = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    teacher = lambda x, sigma: x_star.expand_as(x)  # noqa: E731
    sigmas, k, n = grid(40), 5, 12
    x = x_star + sigmas[n] * torch.randn(2, 3, 4, 4, dtype=torch.float64)
    chained = x
    step = {"euler": euler_step, "heun": heun_step}[solver]
    for i in range(n, n + k):
        chained = step(teacher, chained, sigmas[i], sigmas[i + 1])
    jumped = teacher_jump(teacher, x, sigmas[n], sigmas[n + k], solver)
    assert torch.allclose(jumped, chained, rtol=1e-12, atol=1e-12)
    assert torch.allclose(jumped, x_star + (x - x_star) * sigmas[n + k] / sigmas[n], atol=1e-12)  # the exact path


def test_skip_sigmas_are_grid_points_k_apart():
    diffusion = KarrasDenoiser()
    t, t_next = sample_skip_sigmas(diffusion, 12, 4, 500, "cpu", torch.float64)
    points = grid(12)
    index = [int((points - v).abs().argmin()) for v in t]
    assert torch.equal(t, points[index]) and torch.equal(t_next, points[[i + 4 for i in index]])
    assert max(index) == 7 and min(index) == 0
    with pytest.raises(ValueError, match="skipping step"):
        sample_skip_sigmas(diffusion, 4, 4, 1, "cpu")


def test_the_lcm_loss_targets_the_teachers_k_step_jump():
    """Inside the LCM loss: the target network sees the point the toy teacher reaches after k grid steps from x_t."""
    torch.manual_seed(3)
    n_grid, k = 12, 3
    x_star = torch.randn(1, 3, 4, 4)
    diffusion = KarrasDenoiser(distillation=True, boundary_scalings="lcm", loss_norm="l2")
    online, target = Recorder(), Recorder()
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    lcm_losses(diffusion, online, x0, n_grid, target_model=target, teacher_model=torch.nn.Identity(),
               teacher_diffusion=PointMass(x_star), skip_steps=k, teacher_solver="euler", noise=noise)
    (x_in, c_noise), (x_in_next, c_noise_next) = online.calls[0], target.calls[0]
    t = torch.exp(c_noise.double() / (0.25 * C_NOISE_SCALE)).float()
    t_next = torch.exp(c_noise_next.double() / (0.25 * C_NOISE_SCALE)).float()
    points = grid(n_grid).float()
    for b in range(2):
        i = int((points - t[b]).abs().argmin())
        assert torch.isclose(points[i + k], t_next[b], rtol=1e-5)
        x = x0[b : b + 1] + points[i] * noise[b : b + 1]
        for j in range(i, i + k):  # k single teacher steps
            x = euler_step(lambda z, s: x_star.expand_as(z), x, points[j], points[j + 1])
        c_in = 1 / (t_next[b] ** 2 + 0.25) ** 0.5
        assert torch.allclose(x_in_next[b : b + 1] / c_in, x, rtol=1e-4, atol=1e-4)


# ----- LCM's boundary scalings -------------------------------------------------------------------------------------


def test_lcm_scalings_meet_the_boundary_condition_and_approach_the_denoiser():
    diffusion = KarrasDenoiser(distillation=True, boundary_scalings="lcm", lcm_timestep_scaling=10.0)
    edm = KarrasDenoiser()
    c_skip, c_out, _ = diffusion.get_scalings_for_lcm_boundary_condition(torch.tensor([0.002], dtype=torch.float64))
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    sigma = torch.tensor([20.0], dtype=torch.float64)
    s = 10.0 * (20.0 - 0.002)
    a, b = 0.25 / (s**2 + 0.25), s / math.sqrt(s**2 + 0.25)
    e_skip, e_out, _ = edm.get_scalings(sigma)
    c_skip, c_out, _ = diffusion.get_scalings_for_lcm_boundary_condition(sigma)
    assert torch.allclose(c_skip, a + b * e_skip) and torch.allclose(c_out, b * e_out)
    x = torch.randn(2, 3, 8, 8)
    f = diffusion.denoise(Recorder(), x, torch.full((2,), 0.002))[1]
    assert torch.equal(f, x)


# ----- LCM sampling ------------------------------------------------------------------------------------------------


def test_lcm_sampler_denoises_at_each_level_and_renoises_in_between():
    levels = []

    def denoiser(x, sigma):
        levels.append(float(sigma[0]))
        return torch.full_like(x, 0.25)

    ts = lcm_ts(4, 40)
    assert ts == (0, 10, 20, 29)
    sigmas = lcm_sigmas(ts, 40, 0.002, 80.0)
    out = sample_lcm(denoiser, torch.randn(2, 3, 4, 4) * 80, sigmas, get_generator("determ", 2, 0))
    assert torch.equal(out, torch.full_like(out, 0.25))
    assert levels == pytest.approx(grid(40)[list(ts)].tolist(), rel=1e-6)
    assert lcm_ts(1, 40) == (0,)
    with pytest.raises(ValueError, match="strictly increasing"):
        lcm_sigmas((3, 3), 40, 0.002, 80.0)


# ----- the modes from the command line -----------------------------------------------------------------------------


def test_lcm_trains_from_the_command_line_and_resumes_bit_exactly(tmp_path, teacher_path):
    same, names = resumes_bit_exactly("lcm", tmp_path, teacher_model_path=teacher_path, **LCM_FLAGS)
    assert "target_model000002.pt" in names and same


def test_lcf_fine_tunes_an_lcm_without_teacher_and_resumes_bit_exactly(tmp_path, lcm_path):
    flags = dict(LCM_FLAGS, w_min=2.0, w_max=2.0, teacher_model_path=lcm_path)
    same, names = resumes_bit_exactly("lcf", tmp_path, **flags)
    assert "target_model000002.pt" in names and same
    loop = main("lcf", tiny_argv(log_dir=tmp_path / "again", total_training_steps=1, **flags))
    assert loop.teacher_model is None and loop.diffusion.boundary_scalings == "lcm"


@pytest.mark.parametrize(
    "flags, needle",
    [
        (dict(guidance_embed="false"), "needs --guidance_embed true"),
        (dict(null_class="false"), "null class"),
        (dict(skip_steps=0), "--skip_steps must be >= 1"),
    ],
)
def test_impossible_lcm_configurations_stop_with_one_line(tmp_path, capsys, flags, needle):
    with pytest.raises(SystemExit):
        main("lcm", tiny_argv(log_dir=tmp_path, total_training_steps=1, teacher_model_path="t.pt",
                              **{**LCM_FLAGS, **flags}))
    assert needle in capsys.readouterr().err


def test_an_lcm_samples_in_one_and_two_steps_with_a_guidance_scale(tmp_path, lcm_path):
    image_sample = load_script("image_sample")
    flags = [f"--{k}={v}" for k, v in {**TINY_MODEL, **CFG_FLAGS, "guidance_embed": "true"}.items()]
    common = flags + ["--model_path", lcm_path, "--training_mode", "lcm", "--steps", str(N), "--num_samples", "4",
                      "--batch_size", "4", "--guidance_scale", "2"]
    one = image_sample.main(common + ["--log_dir", str(tmp_path / "one"), "--sampler", "onestep"])
    two = image_sample.main(common + ["--log_dir", str(tmp_path / "two"), "--sampler", "lcm", "--ts", "0,5"])
    with np.load(one) as a, np.load(two) as b:
        assert a["arr_0"].shape == b["arr_0"].shape == (4, 8, 8, 3)
        assert np.array_equal(a["arr_1"], b["arr_1"])
