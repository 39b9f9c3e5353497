"""The stable target field (--ct_target stf): the batch's posterior mean of x0 as CT's and ECT's target step.

Its math against closed forms (two points: a tanh; one point: the point), its class masking, the losses equal to
the CM paper's where the batch holds one data point per class, and CT with it on the 2-D mixture.
"""

import pytest
import torch

from cm.config import resolve_training_config
from cm.karras_diffusion import KarrasDenoiser
from cm.modes.consistency import batch_x0_estimate, consistency_losses, stable_target_x0
from cm.modes.ect import ect_losses
from cm.schedules import create_ema_and_scales_fn
from cm.train_cli import create_argparser
from cm.train_util import CMTrainLoop
from helpers import clone, tiny_argv, tiny_model_and_diffusion
from test_toy2d import WEIGHTS, mode_statistics, sample, train


def brute_force_x0(x_t, t, refs):
    """sum_j softmax_j(-||x_t - x_j||^2 / (2 t^2)) x_j in float64, the distances taken directly."""
    d2 = ((x_t.double().flatten(1)[:, None] - refs.double().flatten(1)[None]) ** 2).sum(-1)
    w = torch.softmax(-d2 / (2 * t.double()[:, None] ** 2), dim=1)
    return (w @ refs.double().flatten(1)).view_as(x_t)


def test_the_field_is_the_posterior_mean_of_the_references():
    g = torch.Generator().manual_seed(0)
    refs = torch.rand(16, 3, 4, 4, generator=g) * 2 - 1
    t = torch.tensor([0.05, 0.3, 1.0, 3.0, 20.0, 80.0]).repeat(4)[:16]
    x_t = refs + t[:, None, None, None] * torch.randn(refs.shape, generator=g)
    got = stable_target_x0(x_t, t, refs)
    assert got.dtype == x_t.dtype and got.shape == x_t.shape
    assert torch.allclose(got.double(), brute_force_x0(x_t, t, refs), atol=1e-5)


def test_two_points_give_the_tanh_of_the_gaussian_posterior():
    """Data {+a, -a}: E[x0 | x_t] = a tanh(a . x_t / t^2) (the two likelihoods N(x_t; +-a, t^2 I))."""
    a = torch.tensor([[0.6, -0.2]])
    refs = torch.cat([a, -a])
    x_t = torch.tensor([[0.3, 0.1], [-1.0, 0.4], [2.0, 2.0]])
    t = torch.tensor([0.5, 1.0, 4.0])
    expected = a * torch.tanh((x_t * a).sum(1, keepdim=True) / t[:, None] ** 2)
    assert torch.allclose(stable_target_x0(x_t, t, refs), expected, atol=1e-6)


def test_small_noise_finds_the_own_point_and_large_noise_the_class_mean():
    g = torch.Generator().manual_seed(1)
    refs = torch.rand(8, 1, 4, 4, generator=g) * 2 - 1
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    small = torch.full((8,), 0.01)
    x_t = refs + small[:, None, None, None] * torch.randn(refs.shape, generator=g)
    assert torch.allclose(stable_target_x0(x_t, small, refs, labels, labels), refs, atol=1e-6)
    large = torch.full((8,), 1e4)
    class_means = torch.stack([refs[labels == k].mean(0) for k in range(3)])
    assert torch.allclose(stable_target_x0(refs, large, refs, labels, labels), class_means[labels], atol=1e-5)
    # rows with the null label (the unconditional model's) average over every class
    null = torch.tensor([3, 1, 0, 3, 2, 2, 0, 1])
    got = stable_target_x0(refs, large, refs, null, labels, null_label=3)
    assert torch.allclose(got[null == 3], refs.mean(0).expand(2, -1, -1, -1), atol=1e-5)
    assert torch.allclose(got[null != 3], class_means[null[null != 3]], atol=1e-5)


def test_sample_keeps_the_data_point_and_a_bad_choice_is_one_line():
    x = torch.randn(3, 3, 4, 4)
    assert batch_x0_estimate(x, x + 1, torch.ones(3), torch.nn.Identity(), {}, "sample") is x
    with pytest.raises(ValueError, match="ct_target"):
        batch_x0_estimate(x, x, torch.ones(3), torch.nn.Identity(), {}, "batch")


@pytest.mark.parametrize("loss", ["ct", "ect"])
def test_one_point_per_class_gives_the_papers_loss(loss):
    """Where each class has one data point in the batch the field is that point, and the loss is CT's (ECT's)."""
    model, diffusion = tiny_model_and_diffusion(distillation=True, loss_norm="l2", class_cond=True)
    diffusion.p_mean, diffusion.p_std = 0.0, 2.0
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    kwargs = {"y": torch.tensor([3, 0, 7, 1])}
    noise = torch.randn_like(x)

    def terms(ct_target):
        torch.manual_seed(5)
        if loss == "ct":
            return consistency_losses(diffusion, model, x, 10, kwargs, target_model=clone(model), noise=noise,
                                      ct_target=ct_target)
        return ect_losses(diffusion, model, x, 4, kwargs, noise=noise, ct_target=ct_target)

    sample_terms, stf_terms = terms("sample"), terms("stf")
    assert torch.equal(sample_terms["sigma"], stf_terms["sigma"])
    assert torch.allclose(sample_terms["loss"], stf_terms["loss"], rtol=1e-4, atol=1e-6)
    # with the classes shared the field moves the target where the noise is large
    kwargs["y"] = torch.zeros(4, dtype=torch.long)
    shared = terms("stf")
    assert not torch.allclose(sample_terms["loss"], shared["loss"], rtol=1e-3)
    shared["loss"].mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_flag_reaches_the_ct_and_ect_losses():
    for mode, extra in (("consistency_training", {}), ("consistency_tuning", dict(teacher_model_path="t.pt"))):
        args = create_argparser(mode).parse_args(tiny_argv(ct_target="stf", **extra))
        assert resolve_training_config(args)["loss"]["ct_target"] == "stf"
    args = create_argparser("consistency_training").parse_args(tiny_argv())
    assert resolve_training_config(args)["loss"]["ct_target"] == "sample"  # the reference's CT


def test_ct_with_the_stable_target_field_recovers_the_modes(tmp_path):
    """The iCT recipe of test_toy2d, its target step with the batch's field: the mixture's weights in one step and
    two, in half the steps of the CM paper's target."""
    diffusion = KarrasDenoiser(sigma_max=10.0, distillation=True, loss_norm="pseudo-huber", weight_schedule="ict",
                               index_sampler="lognormal")
    schedule = create_ema_and_scales_fn("fixed", 0.0, "exponential", 10, 320, 3000, 0)
    model = train(CMTrainLoop, 3000, diffusion, log_dir=str(tmp_path), target_model=True, teacher_model=None,
                  teacher_diffusion=None, training_mode="consistency_training", ema_scale_fn=schedule,
                  loss_options={"ct_target": "stf"})
    for kwargs, offset in ((dict(sampler="onestep"), 0.25), (dict(sampler="multistep", ts=(0, 20, 39)), 0.12)):
        weights, offsets = mode_statistics(sample(diffusion, model, steps=40, **kwargs))
        assert torch.allclose(weights, WEIGHTS, atol=0.06), weights
        assert (offsets < offset).all(), offsets


def test_the_field_stays_float32_under_bfloat16_autocast():
    g = torch.Generator().manual_seed(2)
    refs = torch.rand(32, 3, 8, 8, generator=g) * 2 - 1
    t = torch.full((32,), 0.8)
    x_t = refs + t[:, None, None, None] * torch.randn(refs.shape, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = stable_target_x0(x_t, t, refs)
    assert torch.allclose(got.double(), brute_force_x0(x_t, t, refs), atol=1e-5)
