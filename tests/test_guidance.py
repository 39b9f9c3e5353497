"""Classifier-free guidance in the teachers: the null class, label dropout, guided denoising and sampling."""

import numpy as np
import pytest
import torch

from cm.guidance import drop_labels, guidance_mix, guided_denoiser
from cm.sampling import make_denoiser
from cm.train_cli import main

from helpers import CFG_FLAGS, TINY_MODEL, load_script, read_progress, tiny_argv, tiny_model_and_diffusion, train_cfg_teacher

image_sample = load_script("image_sample")


def random_cfg_model():
    """A tiny class-conditional model with a null class whose output depends on the label (no zero layers left)."""
    model, diffusion = tiny_model_and_diffusion(class_cond=True, num_classes=10, null_class=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval(), diffusion


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return train_cfg_teacher(tmp_path_factory.mktemp("cfg_teacher"))


def test_the_null_class_is_one_more_label_row_only_when_asked():
    plain, _ = tiny_model_and_diffusion(class_cond=True, num_classes=10)
    guided, _ = tiny_model_and_diffusion(class_cond=True, num_classes=10, null_class=True)
    assert plain.label_emb.weight.shape[0] == 10 and plain.null_label is None
    assert guided.label_emb.weight.shape[0] == 11 and guided.null_label == 10
    assert set(plain.state_dict()) == set(guided.state_dict())  # reference checkpoints load strictly without it
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        tiny_model_and_diffusion(null_class=True)


def test_guidance_one_is_the_conditional_model_bit_for_bit():
    model, diffusion = random_cfg_model()
    x, sigma, y = torch.randn(3, 3, 8, 8), torch.tensor([0.5, 2.0, 10.0]), torch.tensor([1, 4, 7])
    conditional = diffusion.denoise(model, x, sigma, y=y)[1]
    denoise = lambda x, s, **kw: diffusion.denoise(model, x, s, **kw)[1]  # noqa: E731
    with torch.no_grad():
        assert torch.equal(guided_denoiser(denoise, model, {"y": y}, 1.0)(x, sigma), conditional)
        assert torch.equal(guided_denoiser(denoise, model, {"y": y}, torch.ones(3))(x, sigma), conditional)
        assert torch.equal(make_denoiser(diffusion, model, clip_denoised=False, model_kwargs={"y": y})(x, sigma),
                           conditional)
        # w = 3: D_u + 3 (D_c - D_u), per sample too
        unconditional = diffusion.denoise(model, x, sigma, y=torch.full_like(y, 10))[1]
        assert not torch.allclose(conditional, unconditional)
        three = guided_denoiser(denoise, model, {"y": y}, 3.0)(x, sigma)
        assert torch.allclose(three, unconditional + 3 * (conditional - unconditional), atol=1e-5)
        mixed = guided_denoiser(denoise, model, {"y": y}, torch.tensor([1.0, 3.0, 3.0]))(x, sigma)
        assert torch.equal(mixed[0], conditional[0]) and torch.allclose(mixed[1:], three[1:])


def test_guidance_needs_a_null_class():
    model, diffusion = tiny_model_and_diffusion(class_cond=True, num_classes=10)
    denoise = lambda x, s, **kw: diffusion.denoise(model, x, s, **kw)[1]  # noqa: E731
    with pytest.raises(ValueError, match="--null_class true"):
        guided_denoiser(denoise, model, {"y": torch.tensor([1])}, 2.0)


def test_label_dropout_replaces_the_asked_share_of_labels():
    y = torch.arange(10).repeat(1000)
    dropped = drop_labels(y, 0.3, 10, generator=torch.Generator().manual_seed(0))
    share = (dropped == 10).float().mean().item()
    assert abs(share - 0.3) < 0.02
    assert torch.equal(dropped[dropped != 10], y[dropped != 10])
    assert drop_labels(y, 0.0, 10) is y
    assert torch.equal(guidance_mix(torch.ones(2, 1), torch.zeros(2, 1), torch.tensor([1.0, 2.0])), torch.tensor([[1.0], [2.0]]))


def test_label_dropout_trains_from_the_command_line_and_needs_the_null_class(tmp_path, teacher_path):
    rows = read_progress(teacher_path.rsplit("/", 1)[0])
    assert [int(r["step"]) for r in rows] == [1, 2]
    with pytest.raises(SystemExit):
        main("edm", tiny_argv(log_dir=tmp_path, total_training_steps=1, class_cond="true", num_classes=10,
                              class_dropout_prob=0.1))


def sample(tmp_path, teacher, *extra):
    flags = [f"--{k}={v}" for k, v in {**TINY_MODEL, **CFG_FLAGS}.items()]
    argv = flags + ["--model_path", teacher, "--log_dir", str(tmp_path), "--training_mode", "edm", "--sampler", "euler",
                    "--steps", "4", "--num_samples", "4", "--batch_size", "4", "--clip_denoised", "false"]
    with np.load(image_sample.main(argv + list(extra))) as data:
        return data["arr_0"], data["arr_1"]


def test_guided_sampling_of_an_edm_teacher(tmp_path, teacher_path):
    plain, labels = sample(tmp_path / "plain", teacher_path)
    one, labels_one = sample(tmp_path / "one", teacher_path, "--guidance_scale", "1")
    four, _ = sample(tmp_path / "four", teacher_path, "--guidance_scale", "4")
    assert np.array_equal(plain, one) and np.array_equal(labels, labels_one)
    assert not np.array_equal(plain, four)


# ----- a guided teacher in distillation (--teacher_guidance_scale) -----


class GuidedNetwork(torch.nn.Module):
    """The network whose output is F_u + w (F_c - F_u) of `model`: under EDM's preconditioning D is affine in F with
    the same c_skip x, so its denoiser is the guided D_w of `model`'s, written out independently of cm.guidance."""

    def __init__(self, model, w):
        super().__init__()
        self.model, self.w = model, w

    def forward(self, x, timesteps, y=None):
        cond = self.model(x, timesteps, y=y)
        uncond = self.model(x, timesteps, y=torch.full_like(y, self.model.null_label))
        return uncond + self.w * (cond - uncond)


def test_cd_with_a_guided_teacher_steps_the_guided_pf_ode():
    from cm.modes.consistency import consistency_losses

    teacher, _ = random_cfg_model()
    student, diffusion = tiny_model_and_diffusion(class_cond=True, num_classes=10, null_class=True, loss_norm="l2",
                                                  distillation=True)
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 4, 7])

    def loss(teacher_model, w):
        torch.manual_seed(0)
        return consistency_losses(diffusion, student, x, 18, model_kwargs={"y": y}, target_model=student,
                                  teacher_model=teacher_model, teacher_guidance=w)["loss"]

    guided = loss(teacher, 3.0)
    torch.testing.assert_close(guided, loss(GuidedNetwork(teacher, 3.0), 1.0), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(guided, loss(teacher, 1.0))
    assert torch.equal(loss(teacher, 1.0), loss(teacher, 1))


def test_scd_reads_the_guided_teachers_velocity():
    from cm.modes.base import LossContext
    from cm.modes.scm import teacher_velocity

    teacher, diffusion = random_cfg_model()
    x_t, t, y = torch.randn(3, 3, 8, 8), torch.tensor([0.3, 0.9, 1.4]), torch.tensor([0, 5, 9])
    guided = LossContext(teacher_model=teacher, teacher_diffusion=diffusion, config={"teacher": {"guidance_scale": 2.5}})
    written_out = LossContext(teacher_model=GuidedNetwork(teacher, 2.5), teacher_diffusion=diffusion)
    plain = LossContext(teacher_model=teacher, teacher_diffusion=diffusion, config={"teacher": {"guidance_scale": 1.0}})
    v = teacher_velocity(guided, 0.5)(x_t, t, y=y)
    torch.testing.assert_close(v, teacher_velocity(written_out, 0.5)(x_t, t, y=y), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(v, teacher_velocity(plain, 0.5)(x_t, t, y=y))


def test_guided_distillation_trains_from_the_command_line_and_refuses_what_cannot_guide(tmp_path, teacher_path):
    for mode in ("consistency_distillation", "scd"):
        extra = dict(time_conditioning="edm", tangent_warmup_steps=2) if mode == "scd" else dict(loss_norm="l2")
        main(mode, tiny_argv(log_dir=tmp_path / mode, total_training_steps=2, teacher_model_path=teacher_path,
                             teacher_guidance_scale=2.0, **CFG_FLAGS, **extra))
        rows = read_progress(str(tmp_path / mode))
        assert [int(r["step"]) for r in rows] == [1, 2] and all(np.isfinite(float(r["loss"])) for r in rows)
    with pytest.raises(SystemExit):  # a teacher without the null class
        main("consistency_distillation", tiny_argv(log_dir=tmp_path / "no_null", total_training_steps=1, teacher_model_path=teacher_path,
                             teacher_guidance_scale=2.0, class_cond="true", num_classes=10, loss_norm="l2"))
    with pytest.raises(SystemExit):  # a mode whose loss does not guide its teacher
        main("progdist", tiny_argv(log_dir=tmp_path / "pd", total_training_steps=1, teacher_model_path=teacher_path,
                                   teacher_guidance_scale=2.0, **CFG_FLAGS))
