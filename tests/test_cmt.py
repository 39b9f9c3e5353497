"""Consistency mid-training (cm.modes.cmt) and the DPM-Solver++(2M) sampler it shares (cm.sampling): the solver's
steps and order, the trajectory the student regresses on, and exact resume from the command line, then ECT."""

import math

import pytest
import torch

from cm.config import resolve_training_config
from cm.karras_diffusion import KarrasDenoiser
from cm.modes.cmt import cmt_losses, teacher_trajectory
from cm.random_util import get_generator
from cm.sampling import dpmpp_2m_states, karras_sample, logsnr_sigmas, make_denoiser, sample_dpmpp_2m
from cm.train_cli import main

from helpers import load_script, read_progress, state_equal, tiny_argv, tiny_model_and_diffusion


# ----- the solver ------------------------------------------------------------------------------------------------


def test_the_log_snr_grid_is_uniform_in_log_sigma_with_exact_ends():
    sigmas = logsnr_sigmas(16, 0.002, 80.0)
    assert sigmas.shape == (17,) and sigmas[0].item() == 80.0 and sigmas[-1].item() == 0.002
    steps = sigmas.log().diff()
    assert torch.allclose(steps, torch.full_like(steps, math.log(0.002 / 80) / 16), rtol=1e-12)


def gaussian_denoiser(s):
    """The exact denoiser of data N(0, s^2 I): D(x, sigma) = s^2 / (s^2 + sigma^2) x."""
    return lambda x, sigma: x * (s**2 / (s**2 + sigma.view(-1, *[1] * (x.ndim - 1)).double() ** 2)).to(x.dtype)


def exact_ode_solution(x_T, s, sigma_T, sigma):
    """The PF ODE of N(0, s^2 I) data moves x along its ray: x(sigma) = x_T sqrt((s^2 + sigma^2) / (s^2 + sigma_T^2))."""
    return x_T * math.sqrt(s**2 + sigma**2) / math.sqrt(s**2 + sigma_T**2)


def test_two_steps_are_ddim_then_the_2m_update_written_out():
    denoiser = gaussian_denoiser(0.5)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 10
    sigmas = torch.tensor([10.0, 2.0, 0.5], dtype=torch.float64)
    states = list(dpmpp_2m_states(denoiser, x, sigmas, lower_order_final=False))
    d0 = denoiser(x, torch.full((2,), 10.0))
    x1 = 0.2 * x + 0.8 * d0  # DDIM: (s1 / s0) x + (1 - s1 / s0) D0
    d1 = denoiser(x1, torch.full((2,), 2.0))
    r = math.log(10 / 2) / math.log(2 / 0.5)
    x2 = 0.25 * x1 + 0.75 * (d1 + (d1 - d0) / (2 * r))
    assert torch.equal(states[0], x) and torch.allclose(states[1], x1) and torch.allclose(states[2], x2)
    # with lower_order_final the last step is DDIM again
    last = list(dpmpp_2m_states(denoiser, x, sigmas, lower_order_final=True))[-1]
    assert torch.allclose(last, 0.25 * x1 + 0.75 * d1)


def test_dpmpp_2m_is_second_order_on_gaussian_data():
    s, x_T = 0.5, torch.randn(4, 3, 4, 4, dtype=torch.float64) * 80
    exact = exact_ode_solution(x_T, s, 80.0, 0.002)

    def errors(n):
        """(DPM-Solver++(2M)'s error, DDIM's) with n steps: DDIM is the first-order step repeated."""
        sigmas = logsnr_sigmas(n, 0.002, 80.0)
        x = sample_dpmpp_2m(gaussian_denoiser(s), x_T, sigmas, lower_order_final=False)
        ddim, levels = x_T, sigmas.tolist()
        for t_cur, t_next in zip(levels, levels[1:]):
            denoised = gaussian_denoiser(s)(ddim, torch.full((4,), t_cur))
            ddim = ddim * (t_next / t_cur) + denoised * (1 - t_next / t_cur)
        return (x - exact).abs().max().item(), (ddim - exact).abs().max().item()

    (e32, ddim32), (e64, ddim64) = errors(32), errors(64)
    assert 3.5 < e32 / e64 < 4.5  # halving h divides the error by about 4: second order
    assert 1.8 < ddim32 / ddim64 < 2.2  # and DDIM's by about 2
    assert e32 < ddim32 / 10


# ----- the loss ----------------------------------------------------------------------------------------------------


def teacher_and_student():
    torch.manual_seed(0)
    teacher, _ = tiny_model_and_diffusion()
    student, _ = tiny_model_and_diffusion()
    return teacher.eval(), KarrasDenoiser(), student, KarrasDenoiser(distillation=True, loss_norm="l2")


def test_the_trajectory_ends_where_the_solvers_own_sampling_ends():
    teacher, edm, _, _ = teacher_and_student()
    x_T = get_generator("determ", 3, 5).randn(3, 3, 8, 8) * 80.0
    sampled = karras_sample(edm, teacher, (3, 3, 8, 8), steps=6, sampler="dpmpp_2m", x_T=x_T, clip_denoised=False,
                            clamp=False)
    teacher_denoiser = make_denoiser(edm, teacher, clip_denoised=False)
    points, end = teacher_trajectory(teacher_denoiser, x_T, logsnr_sigmas(6, 0.002, 80.0))
    assert torch.equal(end, sampled)
    assert points.shape == (18, 3, 8, 8) and torch.equal(points[:3], x_T)


def test_the_student_regresses_every_point_of_the_solvers_path_onto_its_end():
    teacher, edm, student, cm_denoiser = teacher_and_student()
    x_start = torch.rand(8, 3, 8, 8) * 2 - 1
    noise = torch.randn(2, 3, 8, 8)  # 8 images, 4 steps: 2 trajectories of 4 points
    terms = cmt_losses(cm_denoiser, student, x_start, 4, teacher, edm, noise=noise)

    visited = []  # the solver's own states, as karras_sample walks them from the same start
    end = karras_sample(edm, teacher, (2, 3, 8, 8), steps=4, sampler="dpmpp_2m", x_T=x_start[:2] + 80.0 * noise,
                        clip_denoised=False, clamp=False,
                        callback=lambda info: visited.append((info["x"], info["sigma"])))
    sigma = torch.tensor([s for _, s in visited]).repeat_interleave(2).float()
    assert torch.equal(terms["sigma"], sigma)
    online = cm_denoiser.denoise(student, torch.cat([x for x, _ in visited]), sigma)[1]
    assert torch.allclose(terms["loss"], cm_denoiser.distance(online, end.repeat(4, 1, 1, 1)), rtol=1e-5, atol=1e-7)
    # no stop-gradient target: the gradient reaches the student only, the teacher stays untouched
    terms["loss"].mean().backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())


# ----- the command line: CMT, exact resume, then ECT from it ------------------------------------------------------


def cmt_argv(log_dir, edm_teacher_path, steps, **extra):
    flags = dict(log_dir=log_dir, teacher_model_path=edm_teacher_path, total_training_steps=steps, save_interval=2,
                 cmt_solver_steps=2, loss_norm="l2", dropout=0.1, ema_rate="0.9")
    return tiny_argv(**{**flags, **extra})


def test_cmt_resumes_bit_exactly_and_ect_starts_from_it(tmp_path, edm_teacher_path):
    straight = main("cmt", cmt_argv(tmp_path / "a", edm_teacher_path, 4))
    assert straight.target_model is None and straight.diffusion.distillation
    assert straight.run_config["student_init"] == "teacher"
    main("cmt", cmt_argv(tmp_path / "b", edm_teacher_path, 2))
    torch.manual_seed(12345)  # a restarted process has other RNG states until resume restores them
    resumed = main("cmt", cmt_argv(tmp_path / "b", edm_teacher_path, 4))
    assert resumed.step == 4 and state_equal(straight.model.state_dict(), resumed.model.state_dict())
    rows_a, rows_b = read_progress(tmp_path / "a"), read_progress(tmp_path / "b")
    assert [r["loss"] for r in rows_a[2:]] == [r["loss"] for r in rows_b[-2:]]
    assert all(int(r["solver_steps"]) == 2 for r in rows_a)

    # ECT post-training from the mid-trained EMA, one fixed small dt (q 4096, one stage)
    ect = main("consistency_tuning", tiny_argv(log_dir=tmp_path / "ect", total_training_steps=2, ect_q=4096,
                                               ect_stages=1, teacher_model_path=tmp_path / "a" / "ema_0.9_000004.pt"))
    assert [int(r["num_scales"]) for r in read_progress(tmp_path / "ect")] == [4096, 4096]
    assert ect.step == 2


def test_a_stochastic_teacher_is_refused_in_one_line(tmp_path, edm_teacher_path, capsys):
    with pytest.raises(SystemExit):
        main("cmt", cmt_argv(tmp_path, edm_teacher_path, 1, teacher_stochastic=True))
    assert "leave --teacher_stochastic false" in capsys.readouterr().err


@pytest.mark.parametrize("plan", ["cmt", "tcm"])
def test_the_quickstart_stages_resolve_each_from_the_previous_stages_model(plan, tmp_path):
    quickstart = load_script("quickstart")
    opts = quickstart.parse_args(["--mode", plan, "--out", str(tmp_path)])
    stages = quickstart.PLANS[plan]
    assert [mode for _, _, mode in stages] == (["edm", "cmt", "consistency_tuning"] if plan == "cmt"
                                               else ["edm", "consistency_tuning", "tcm"])
    for k, (name, preset, mode) in enumerate(stages):
        extra = ["--teacher_model_path", str(tmp_path / "previous.pt")] if k else []
        config = resolve_training_config(quickstart.training_args(preset, mode, str(tmp_path / name), opts, extra))
        assert config["training_mode"] == mode and config["data"]["data_dir"] == "digits_train"
        assert config["student_init"] == ("teacher" if k else "random")
