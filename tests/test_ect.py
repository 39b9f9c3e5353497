"""Easy consistency tuning (cm.modes.ect, training_mode consistency_tuning): the mapping r(t), the stages, the loss's
boundary, shared noise and dropout masks, exact resume from the command line, and a 2-D mixture."""

import copy
import math

import pytest
import torch

from cm import logger
from cm.config import resolve_training_config
from cm.modes.ect import adaptive_distance, create_ect_schedule, ect_losses, ect_r, ect_stage_fn
from cm.karras_diffusion import KarrasDenoiser
from cm.metrics import pseudo_huber
from cm.train_cli import create_argparser, main
from cm.train_util import CMTrainLoop, TrainLoop

from helpers import read_progress, state_equal, tiny_argv
from test_toy2d import MLP, WEIGHTS, Mixture, mode_statistics, sample


def ect_formula(t, stage, q=2, k=8.0, b=1.0):
    """r / t = 1 - (1 + k sigmoid(-b t)) / q^(stage + 1), r >= 0, written out with math."""
    n = 1 + k / (1 + math.exp(b * t))
    return max(t * (1 - n / q ** (stage + 1)), 0.0)


# ----- the mapping and the stages ---------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 3, 6])
@pytest.mark.parametrize("q", [2, 4])
def test_r_at_stage_s_is_ects_mapping(stage, q):
    ts = [0.002, 0.1, 0.5, 1.0, 2.0, 10.0, 80.0]
    r = ect_r(torch.tensor(ts, dtype=torch.float64), q ** (stage + 1))
    assert r.tolist() == pytest.approx([ect_formula(t, stage, q) for t in ts], rel=1e-12, abs=1e-15)
    const = ect_r(torch.tensor(ts, dtype=torch.float64), q ** (stage + 1), mapping="const")
    assert const.tolist() == pytest.approx([t * (1 - 1 / q ** (stage + 1)) for t in ts], rel=1e-12)


def test_r_at_known_points():
    # t = 2, stage 1, q = 2: n = 1 + 8 sigmoid(-2) = 1.953623, r = 2 (1 - n / 4) = 1.023188
    assert ect_r(torch.tensor([2.0], dtype=torch.float64), 4).item() == pytest.approx(1.0231883, abs=1e-6)
    # small t at stage 0: n(t) >= 2 makes r negative before clamping, so r = 0 (the boundary)
    assert ect_r(torch.tensor([0.5, 1.9]), 2).tolist() == [0.0, 0.0]


def test_dt_shrinks_to_zero_as_stages_grow():
    t = torch.logspace(-2, math.log10(80), 50, dtype=torch.float64)
    gaps = [((t - ect_r(t, 2 ** (s + 1))) / t) for s in range(30)]
    for coarse, fine in zip(gaps, gaps[1:]):
        assert (fine <= coarse).all() and (fine[coarse < 1] < coarse[coarse < 1]).all()
    assert gaps[-1].max() < 1e-8
    assert gaps[0].max() == 1.0  # stage 0: small t maps to the boundary r = 0


def test_stages_advance_every_so_many_images_steps_or_parts_of_the_run():
    assert [ect_stage_fn(ect_stage_steps=3)(k) for k in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    by_images = ect_stage_fn(ect_stage_images=100, images_per_step=32)
    assert [by_images(k) for k in (0, 3, 4, 6, 7)] == [0, 0, 1, 1, 2]  # 128 images at step 4, 224 at 7
    over_run = ect_stage_fn(ect_stages=4, total_steps=10)
    assert [over_run(k) for k in range(12)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    schedule = create_ect_schedule(ect_q=4, ect_stage_steps=2)
    assert [schedule(k)["num_scales"] for k in range(5)] == [4, 4, 16, 16, 64]
    assert [schedule(k)["ect_stage"] for k in range(5)] == [0, 0, 1, 1, 2]


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(ect_q=2, ect_stage_images=10, ect_stage_steps=10), "not both"),
        (dict(ect_q=2, ect_stages=4, total_steps=0), "total_training_steps > 0"),
        (dict(ect_q=1.5, ect_stage_steps=10), "integer >= 2"),
    ],
)
def test_impossible_schedules_stop_with_one_line(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        create_ect_schedule(**kwargs)


@pytest.mark.parametrize(
    "flags, needle",
    [
        (dict(ect_stage_images=10, ect_stage_steps=10), "not both"),
        (dict(ect_adaptive_p=2.0), "must lie in"),
        (dict(ect_adaptive_p=1.0), "needs ect_c > 0"),
        (dict(teacher_model_path=""), "needs --teacher_model_path"),
    ],
)
def test_impossible_ect_configurations_stop_when_resolved(flags, needle):
    args = create_argparser("consistency_tuning").parse_args(tiny_argv(**{"teacher_model_path": "t.pt", **flags}))
    with pytest.raises(ValueError, match=needle):
        resolve_training_config(args)


def test_adaptive_distance_is_pseudo_huber_at_p_half_and_weights_its_gradient():
    x, y = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    assert torch.allclose(adaptive_distance(x, y, 0.03, 0.5), pseudo_huber(x, y, 0.03), atol=1e-6)
    assert torch.allclose(adaptive_distance(x, y, 0.0, 0.5), (x - y).flatten(1).norm(dim=1), atol=1e-5)
    assert torch.allclose(adaptive_distance(x, y, 0.0, 0.0), 0.5 * (x - y).flatten(1).pow(2).sum(1), atol=1e-5)
    for p in (0.0, 0.25, 0.5, 1.0):  # gradient = (||x - y||^2 + c^2)^-p (x - y)
        x1 = x.clone().requires_grad_(True)
        adaptive_distance(x1, y, 0.5, p).sum().backward()
        weight = ((x - y).flatten(1).pow(2).sum(1) + 0.25) ** -p
        assert torch.allclose(x1.grad, weight.view(-1, 1, 1, 1) * (x - y), rtol=1e-4, atol=1e-6)


# ----- the loss ------------------------------------------------------------------------------------


class DropoutNet(torch.nn.Module):
    """A small conv net with dropout that records its inputs and dropout masks."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.calls = []

    def forward(self, x, c_noise, **kwargs):
        mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, self.training)
        self.calls.append((x.detach().clone(), c_noise.detach().clone(), mask))
        return self.conv(x) * mask + 0.01 * c_noise.view(-1, 1, 1, 1)


def noise_of_call(diffusion, call, x_start, sigma):
    """The noise z of a network input c_in(sigma) (x + sigma z)."""
    c_in = diffusion.get_scalings_for_boundary_condition(sigma)[2].view(-1, 1, 1, 1)
    return (call[0] / c_in - x_start) / sigma.view(-1, 1, 1, 1)


def test_both_passes_share_the_noise_and_the_dropout_masks_and_only_the_t_pass_has_gradients():
    torch.manual_seed(0)
    diffusion = KarrasDenoiser(distillation=True, weight_schedule="ict")
    model = DropoutNet()
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    t, z = torch.tensor([1.0, 5.0, 20.0]), torch.randn(3, 3, 8, 8)
    r = ect_r(t, 8)
    assert (r > diffusion.sigma_min).all()

    torch.manual_seed(1)
    terms = ect_losses(diffusion, model, x, 8, t=t, noise=z, c=0.01)
    after = torch.rand(1)
    (online, c_t, mask_t), (_, c_r, mask_r) = model.calls
    assert torch.equal(mask_t, mask_r) and (mask_t == 0).any()
    assert torch.allclose(noise_of_call(diffusion, model.calls[0], x, t), z, atol=1e-4)
    assert torch.allclose(noise_of_call(diffusion, model.calls[1], x, r), z, atol=1e-4)
    assert not torch.equal(c_t, c_r)
    assert terms["sigma"] is t and torch.allclose(terms["dt_over_t"], (t - r) / t)
    terms["loss"].sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]

    # the same loss written out: the r pass replays the dropout masks and is a constant
    model.zero_grad()
    torch.manual_seed(1)
    state = torch.get_rng_state()
    f_t = diffusion.denoise(model, x + t.view(-1, 1, 1, 1) * z, t)[1]
    rest = torch.get_rng_state()
    torch.set_rng_state(state)
    with torch.no_grad():
        f_r = diffusion.denoise(model, x + r.view(-1, 1, 1, 1) * z, r)[1]
    torch.set_rng_state(rest)
    assert torch.equal(torch.rand(1), after)  # the RNG continues past the t pass only
    expected = pseudo_huber(f_t, f_r, 0.01) / (t - r)
    assert torch.allclose(terms["loss"], expected.detach(), rtol=1e-5)
    expected.sum().backward()
    for a, b in zip(grads, model.parameters()):
        assert torch.allclose(a, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "mapping, num_scales, t, at_boundary",
    [
        ("sigmoid", 2, [0.01, 0.5, 1.5, 20.0], [True, True, True, False]),  # stage 0: r = 0 below t = 1.95
        ("const", 1000, [0.002, 0.0021, 20.0], [True, False, False]),  # r = 0.001998: in (0, sigma_min]
    ],
)
def test_at_the_boundary_the_target_is_the_data(mapping, num_scales, t, at_boundary):
    torch.manual_seed(0)
    diffusion = KarrasDenoiser(distillation=True, weight_schedule="uniform")
    model = DropoutNet().eval()
    t = torch.tensor(t)
    x = torch.rand(len(t), 3, 8, 8) * 2 - 1
    z = torch.randn_like(x)
    boundary = ect_r(t, num_scales, mapping) <= diffusion.sigma_min
    assert boundary.tolist() == at_boundary
    terms = ect_losses(diffusion, model, x, num_scales, mapping=mapping, t=t, noise=z, p=0.0)  # 0.5 ||f_t - f_r||^2
    f_t = diffusion.denoise(model, x + t.view(-1, 1, 1, 1) * z, t)[1]
    to_data = 0.5 * (f_t - x).flatten(1).pow(2).sum(1)
    assert torch.allclose(terms["loss"][boundary], to_data[boundary], rtol=1e-6)
    assert not torch.isclose(terms["loss"][~boundary], to_data[~boundary], rtol=1e-3).any()


# ----- the training mode from the command line --------------------------------------------------


def ect_argv(log_dir, edm_teacher_path, steps, **extra):
    flags = dict(log_dir=log_dir, teacher_model_path=edm_teacher_path, total_training_steps=steps, save_interval=3,
                 ect_stage_steps=2, ect_q=2, dropout=0.1, ema_rate="0.9,0.99")
    return tiny_argv(**{**flags, **extra})


def test_the_student_starts_from_the_edm_checkpoint_and_logs_its_stages(tmp_path, edm_teacher_path):
    loop = main("consistency_tuning", ect_argv(tmp_path, edm_teacher_path, 1, save_interval=-1))
    assert loop.target_model is None and loop.teacher_model is None and loop.diffusion.distillation
    assert loop.run_config["student_init"] == "teacher" and loop.run_config["schedule"]["images_per_step"] == 4
    teacher = torch.load(edm_teacher_path, weights_only=True)
    # one Adam step (lr 1e-3) away from the teacher's weights
    assert max((v - teacher[k]).abs().max().item() for k, v in loop.model.state_dict().items()) < 1.1e-3
    again = main("consistency_tuning", ect_argv(tmp_path / "b", edm_teacher_path, 6, save_interval=-1, log_interval=2))
    rows = read_progress(tmp_path / "b")
    assert [int(r["ect_stage"]) for r in rows] == [0, 1, 2]
    assert [int(r["num_scales"]) for r in rows] == [2, 4, 8]
    assert all(float(r["dt_over_t"]) > 0 for r in rows) and "loss_q0" in rows[0]
    assert again.step == 6


def test_resume_mid_stage_is_bit_exact(tmp_path, edm_teacher_path):
    straight = main("consistency_tuning", ect_argv(tmp_path / "a", edm_teacher_path, 6))
    main("consistency_tuning", ect_argv(tmp_path / "b", edm_teacher_path, 3))  # stopped at step 3, inside stage 1
    torch.manual_seed(12345)  # a restarted process has other RNG states until resume restores them
    resumed = main("consistency_tuning", ect_argv(tmp_path / "b", edm_teacher_path, 6))
    assert resumed.step == 6
    assert state_equal(straight.model.state_dict(), resumed.model.state_dict())
    for a, b in zip(straight.ema_params, resumed.ema_params):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    sa, sb = straight.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    rows_a, rows_b = read_progress(tmp_path / "a"), read_progress(tmp_path / "b")
    assert [r["loss"] for r in rows_a[3:]] == [r["loss"] for r in rows_b[-3:]]


# ----- 2-D mixture ---------------------------------------------------------------------------------


def toy_loop(model, diffusion, steps, log_dir, loop_cls=TrainLoop, **kwargs):
    logger.configure(dir=log_dir, format_strs=[])
    return loop_cls(model=model, diffusion=diffusion, data=Mixture(256), batch_size=256, microbatch=-1, lr=1e-3,
                    ema_rate="0.99", log_interval=10**9, save_interval=-1, resume_checkpoint="", optimizer="adam",
                    total_training_steps=steps, progress=False, channels_last=False, **kwargs)


def ema_of(loop):
    ema = copy.deepcopy(loop.model)
    ema.load_state_dict(loop.mp_trainer.master_params_to_state_dict(loop.ema_params[0]))
    return ema


def test_ect_from_a_pretrained_edm_model_recovers_the_modes_in_one_step(tmp_path):
    """ECT's mapping and 8 stages (q = 2) over 1,000 steps with a decaying lr, from a 1,000-step EDM network. On these
    2-D data uniform weights give the modes' weights more evenly than 1 / (t - r), which in so few steps favours the
    small noise levels that decide nothing about which mode a sample goes to."""
    torch.manual_seed(0)
    edm = KarrasDenoiser(weight_schedule="karras")
    teacher_loop = toy_loop(MLP(), edm, 1000, str(tmp_path / "edm"))
    teacher_loop.run_loop()
    teacher = ema_of(teacher_loop)
    weights, offsets = mode_statistics(sample(KarrasDenoiser(distillation=True), teacher, steps=18, sampler="onestep"))
    assert (offsets > 0.25).any()  # the EDM network itself is no one-step sampler

    diffusion = KarrasDenoiser(distillation=True, weight_schedule="uniform")
    options = dict(ect_mapping="sigmoid", ect_k=8.0, ect_b=1.0, ect_c=0.0, ect_adaptive_p=0.5, ect_q=2)
    torch.manual_seed(1)
    loop = toy_loop(copy.deepcopy(teacher), diffusion, 1000, str(tmp_path / "ect"), CMTrainLoop, lr_anneal_steps=1000,
                    target_model=None, teacher_model=None, teacher_diffusion=None, training_mode="consistency_tuning",
                    schedule_fn=create_ect_schedule(2, ect_stages=8, total_steps=1000), loss_options=options)
    loop.run_loop()
    weights, offsets = mode_statistics(sample(diffusion, ema_of(loop), steps=18, sampler="onestep"))
    assert torch.allclose(weights, WEIGHTS, atol=0.05), weights
    assert (offsets < 0.25).all(), offsets
