"""Truncated consistency models (cm.modes.tcm): the truncated log-Student-t, the switch to the frozen stage 1 exactly
below t', the boundary share and weight the flags set, exact resume, and sampling from the saved pair."""

import math

import pytest
import torch
from scipy import stats

from cm.image_util import companion_path
from cm.random_util import get_generator
from cm.sampling import karras_sample
from cm.modes.ect import adaptive_distance, ect_losses, ect_r
from cm.modes.tcm import TruncatedDenoiser, boundary_weights, truncated_log_student_t
from cm.train_cli import main

from helpers import TINY_MODEL, load_script, read_progress, state_equal, tiny_argv


def test_log_t_follows_the_truncated_student_t():
    torch.manual_seed(0)
    t = truncated_log_student_t(20000, 0.01, 0.0, 0.2, 1.0, 80.0, "cpu", torch.float64)
    assert t.min() >= 1.0 and t.max() <= 80.0
    # the empirical CDF of log t against scipy's Student-t CDF renormalised to [log 1, log 80]
    lo, hi = (stats.t.cdf(math.log(v) / 0.2, 0.01) for v in (1.0, 80.0))
    for v in (1.05, 1.5, 3.0, 10.0, 40.0):
        expect = (stats.t.cdf(math.log(v) / 0.2, 0.01) - lo) / (hi - lo)
        assert abs((t <= v).double().mean().item() - expect) < 0.015, v


class Constant(torch.nn.Module):
    """A network whose output is one value everywhere (with a parameter, so it can be a student)."""

    def __init__(self, value):
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(float(value)))

    def forward(self, x, t, **kwargs):
        return torch.zeros_like(x) + self.value


def test_the_composed_model_switches_to_stage_1_exactly_below_t_prime():
    stage1, stage2 = Constant(-1.0), Constant(1.0)
    plain = TruncatedDenoiser(transition_t=1.0)
    composed = plain.with_stage1(stage1)
    below = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    sigmas = torch.stack([torch.tensor(0.5), below, torch.tensor(1.0), torch.tensor(1.0 + 1e-8), torch.tensor(30.0)])
    x = torch.randn(5, 3, 4, 4)
    out = composed.denoise(stage2, x, sigmas)[1]
    expect_1, expect_2 = plain.denoise(stage1, x, sigmas)[1], plain.denoise(stage2, x, sigmas)[1]
    for i, use_stage2 in enumerate([False, False, True, True, True]):
        assert torch.equal(out[i], (expect_2 if use_stage2 else expect_1)[i]), i
    assert plain.stage1_model is None and torch.equal(plain.denoise(stage2, x, sigmas)[1], expect_2)


def test_the_targets_come_from_stage_1_where_r_is_below_t_prime():
    """ECT's loss on the composed model: f_2 at t, and at r the frozen stage 1 where r < t', else f_2 (no gradient)."""
    stage1, stage2 = Constant(-1.0), Constant(1.0)
    plain = TruncatedDenoiser(transition_t=1.0, weight_schedule="ict")
    composed = plain.with_stage1(stage1)
    t = torch.tensor([1.0, 1.05, 1.3, 5.0, 60.0])
    num_scales = 8
    r = ect_r(t, num_scales)
    assert (r < 1.0).any() and (r >= 1.0).any()
    x, noise = torch.rand(5, 3, 4, 4) * 2 - 1, torch.randn(5, 3, 4, 4)
    terms = ect_losses(composed, stage2, x, num_scales, t=t, noise=noise)
    online = plain.denoise(stage2, x + t.view(-1, 1, 1, 1) * noise, t)[1]
    x_r = x + r.view(-1, 1, 1, 1) * noise
    below = (r < 1.0).view(-1, 1, 1, 1)
    target = torch.where(below, plain.denoise(stage1, x_r, r)[1], plain.denoise(stage2, x_r, r)[1])
    expect = adaptive_distance(online, target) / (t - r)
    assert torch.allclose(terms["loss"], expect, rtol=1e-5)
    terms["loss"].sum().backward()
    assert stage2.value.grad is not None and stage1.value.grad is None


def test_tcm_two_step_sampling_denoises_at_80_then_at_t_prime_with_stage_2():
    stage1, stage2 = Constant(-1.0), Constant(1.0)
    composed = TruncatedDenoiser(transition_t=1.0).with_stage1(stage1)
    seen = []
    x = karras_sample(composed, stage2, (2, 3, 4, 4), steps=2, sampler="tcm_twostep", clip_denoised=False,
                      generator=get_generator("determ", 2, 0), callback=seen.append)
    assert [info["sigma"] for info in seen] == [80.0, 1.0]
    x_mid = seen[1]["x"]
    expect = composed.denoise(stage2, x_mid, torch.ones(2))[1]
    assert torch.equal(seen[1]["denoised"], expect) and torch.equal(x, expect.clamp(-1, 1))
    assert not torch.equal(expect, TruncatedDenoiser(transition_t=1.0).denoise(stage1, x_mid, torch.ones(2))[1])
    # another intermediate level (the quickstart's search): below t' the second denoising is stage 1's
    seen = []
    karras_sample(composed, stage2, (2, 3, 4, 4), steps=2, sampler="tcm_twostep", clip_denoised=False, t_mid=0.5,
                  generator=get_generator("determ", 2, 0), callback=seen.append)
    assert [info["sigma"] for info in seen] == [80.0, 0.5]
    assert torch.equal(seen[1]["denoised"], composed.denoise(stage2, seen[1]["x"], torch.full((2,), 0.5))[1])


def test_the_quickstart_scores_tcm_two_step_at_t_prime_and_at_the_searched_level(tmp_path):
    quickstart = load_script("quickstart")
    metrics = quickstart.main(["--mode", "tcm", "--steps", "2", "--out", str(tmp_path), "--num_samples", "16",
                               "--search_samples", "16"])
    assert metrics["two_step_ts_default"] == [80.0, 1.0, 0.0]
    searched = metrics["two_step_ts_searched"]
    assert searched[0] == 80.0 and searched[2] == 0.0 and searched[1] in quickstart.TCM_MIDS


def test_boundary_weights_give_the_rest_mean_plus_w_times_the_boundary_mean():
    boundary = torch.tensor([True, False, False, True, False, False, False, False])
    loss = torch.arange(1.0, 9.0)
    weighted = (loss * boundary_weights(boundary, 0.1)).mean()
    assert torch.isclose(weighted, loss[~boundary].mean() + 0.1 * loss[boundary].mean())
    assert torch.equal(boundary_weights(torch.zeros(4, dtype=torch.bool), 0.1), torch.ones(4))


# ----- the command line ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage1_path(tmp_path_factory):
    """A stage-1 consistency model: two ECT steps from a two-step EDM checkpoint of the tiny digits model."""
    log_dir = tmp_path_factory.mktemp("stage1")
    main("edm", tiny_argv(log_dir=log_dir / "edm", total_training_steps=2))
    main("consistency_tuning", tiny_argv(log_dir=log_dir / "ect", total_training_steps=2, ect_stages=1,
                                         teacher_model_path=log_dir / "edm" / "model000002.pt"))
    return str(log_dir / "ect" / "model000002.pt")


def tcm_argv(log_dir, stage1_path, steps, **extra):
    flags = dict(log_dir=log_dir, teacher_model_path=stage1_path, total_training_steps=steps, save_interval=2,
                 ect_stages=1, ect_q=16, dropout=0.1, ema_rate="0.9", batch_size=8)
    return tiny_argv(**{**flags, **extra})


def test_the_boundary_share_and_weight_are_what_the_flags_say(tmp_path, stage1_path):
    loop = main("tcm", tcm_argv(tmp_path, stage1_path, 1, tcm_boundary_share=0.5, tcm_boundary_weight=0.3,
                                tcm_transition_t=2.0, save_interval=-1))
    assert loop.diffusion.transition_t == 2.0 and loop.run_config["student_init"] == "teacher"
    x = torch.rand(8, 3, 8, 8) * 2 - 1
    terms, weights = loop.loss_fn(loop.model, x, {}, loop.schedule_values)
    boundary = terms["sigma"] == torch.tensor(2.0 + 1e-8, dtype=torch.float64).float()
    assert int(boundary.sum()) == 4 and (terms["sigma"][~boundary] >= 2.0).all()
    assert torch.allclose(weights[boundary], torch.full((4,), 0.3 * 8 / 4))
    assert torch.allclose(weights[~boundary], torch.full((4,), 8 / 4))


def test_tcm_resumes_bit_exactly_and_saves_the_pair(tmp_path, stage1_path):
    straight = main("tcm", tcm_argv(tmp_path / "a", stage1_path, 4))
    main("tcm", tcm_argv(tmp_path / "b", stage1_path, 2))
    torch.manual_seed(12345)  # a restarted process has other RNG states until resume restores them
    resumed = main("tcm", tcm_argv(tmp_path / "b", stage1_path, 4))
    assert resumed.step == 4 and state_equal(straight.model.state_dict(), resumed.model.state_dict())
    rows_a, rows_b = read_progress(tmp_path / "a"), read_progress(tmp_path / "b")
    assert [r["loss"] for r in rows_a[2:]] == [r["loss"] for r in rows_b[-2:]]
    # the frozen stage 1 is saved beside each checkpoint, unchanged
    saved = torch.load(tmp_path / "a" / "stage1_model000004.pt", weights_only=True)
    assert state_equal(saved, torch.load(stage1_path, weights_only=True))


def test_sampling_loads_the_pair_and_needs_both_files(tmp_path, stage1_path, capsys):
    main("tcm", tcm_argv(tmp_path / "run", stage1_path, 2))
    ema = tmp_path / "run" / "ema_0.9_000002.pt"
    assert companion_path(str(ema), "stage1_model") == str(tmp_path / "run" / "stage1_model000002.pt")
    sample = load_script("image_sample")
    flags = dict(TINY_MODEL, training_mode="tcm", model_path=ema, sampler="tcm_twostep",
                 num_samples=4, batch_size=4, log_dir=tmp_path / "samples")
    flags = [item for k, v in flags.items() for item in (f"--{k}", str(v))]
    path = sample.main(flags)
    assert path.endswith("samples_4x8x8x3.npz")
    (tmp_path / "run" / "stage1_model000002.pt").unlink()
    with pytest.raises(SystemExit):
        sample.main(flags)
    assert "stage1_model000002.pt does not exist" in capsys.readouterr().err
