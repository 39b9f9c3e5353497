"""UFOGen: the generator's step through the forward process against its closed forms, the noise-level-conditioned
discriminator and its start from the teacher, training from the command line with the discriminator and its
optimizer resumed exactly, and one-step sampling."""

import numpy as np
import pytest
import torch

from cm.karras_diffusion import KarrasDenoiser
from cm.config import resolve_model_config
from cm.train_cli import create_argparser, main
from cm.modes.ufogen import (
    build_discriminator,
    forward_marginal,
    forward_transition,
    generator_step,
    load_encoder_weights,
    posterior_mean_std,
)

from helpers import CFG_FLAGS, TINY_MODEL, load_script, resumes_bit_exactly, tiny_argv, train_cfg_teacher

UFOGEN_FLAGS = dict(CFG_FLAGS, start_scales=10, ufogen_t_skip=2)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return train_cfg_teacher(tmp_path_factory.mktemp("cfg_teacher"))


def test_the_posterior_step_is_ddpms_closed_form_in_ve_coordinates():
    """q(x_s | x_t, x_0) of x = x_0 + sigma z, mapped to DDPM's x_vp = x / sqrt(1 + sigma^2), abar = 1 / (1 + sigma^2),
    is DDPM's posterior: mean sqrt(abar_s) beta / (1 - abar_t) x_0 + sqrt(alpha) (1 - abar_s) / (1 - abar_t) x_t,
    variance (1 - abar_s) / (1 - abar_t) beta, with alpha = abar_t / abar_s, beta = 1 - alpha (Ho et al. 2020, Eq. 7)."""
    t, s = torch.tensor([3.0, 0.7], dtype=torch.float64), torch.tensor([1.5, 0.02], dtype=torch.float64)
    x0, x_t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64) * 3
    mean, std = posterior_mean_std(x_t, x0, t, s)
    abar_t, abar_s = 1 / (1 + t**2), 1 / (1 + s**2)
    alpha = abar_t / abar_s
    beta = 1 - alpha
    view = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
    x_t_vp = x_t * view(abar_t.sqrt())
    ddpm_mean = view(abar_s.sqrt() * beta / (1 - abar_t)) * x0 + view(alpha.sqrt() * (1 - abar_s) / (1 - abar_t)) * x_t_vp
    ddpm_var = (1 - abar_s) / (1 - abar_t) * beta
    assert torch.allclose(mean * view(abar_s.sqrt()), ddpm_mean, atol=1e-12)
    assert torch.allclose((std * view(abar_s.sqrt())) ** 2, view(ddpm_var).expand_as(std), atol=1e-12)


def test_the_generator_steps_sample_their_distributions():
    """Empirical moments: the posterior draw and the marginal draw q(x_s | x'_0) have the stated means and spreads;
    a chain x_s ~ q(x_s | x_0), x_t ~ q(x_t | x_s) has the marginal q(x_t | x_0)."""
    g = torch.Generator().manual_seed(0)
    n, x0 = 200_000, torch.tensor([0.3], dtype=torch.float64)
    t, s = torch.full((n,), 2.0, dtype=torch.float64), torch.full((n,), 0.8, dtype=torch.float64)
    z = lambda: torch.randn(n, 1, dtype=torch.float64, generator=g)  # noqa: E731
    x_s = forward_marginal(x0.expand(n, 1), s, z())
    x_t = forward_transition(x_s, s, t, z())
    assert abs(x_t.std().item() - 2.0) < 0.02 and abs(x_s.std().item() - 0.8) < 0.01
    x_t = torch.full((n, 1), 1.1, dtype=torch.float64)
    draws = generator_step("posterior", x_t, x0.expand(n, 1), t, s, z())
    mean, std = posterior_mean_std(x_t[:1], x0.view(1, 1), t[:1], s[:1])
    assert abs(draws.mean().item() - mean.item()) < 0.01 and abs(draws.std().item() - std.item()) < 0.01
    draws = generator_step("marginal", x_t, x0.expand(n, 1), t, s, z())
    assert abs(draws.mean().item() - 0.3) < 0.01 and abs(draws.std().item() - 0.8) < 0.01
    with pytest.raises(ValueError, match="unknown ufogen_step"):
        generator_step("ddim", x_t, x0, t, s, z())


def test_the_discriminator_is_the_teachers_encoder_conditioned_on_the_noise_level(teacher_path):
    network = resolve_model_config(create_argparser("edm").parse_args(tiny_argv(**CFG_FLAGS)))["network"]
    disc = build_discriminator(network)
    count = load_encoder_weights(disc, teacher_path)
    teacher = torch.load(teacher_path, weights_only=True)
    own = disc.state_dict()
    assert count == len([k for k in own if k in teacher]) > 10
    assert all(torch.equal(own[k], teacher[k]) for k in own if k in teacher)
    with torch.no_grad():
        for p in disc.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    sigma_noise = lambda v: torch.full((2,), v)  # noqa: E731
    logits = disc(x, sigma_noise(-100.0), y)
    assert logits.shape == (2,)
    assert not torch.allclose(logits, disc(x, sigma_noise(300.0), y))  # the noise level matters
    assert not torch.allclose(logits, disc(x, sigma_noise(-100.0), torch.tensor([5, 6])))  # so does the label


def test_ufogen_trains_from_the_command_line_and_resumes_the_discriminator_bit_exactly(tmp_path, teacher_path):
    same, names = resumes_bit_exactly("ufogen", tmp_path, teacher_model_path=teacher_path, **UFOGEN_FLAGS)
    assert {"discriminator000002.pt", "discriminator_opt000002.pt"} <= set(names) and same
    opt = torch.load(tmp_path / "straight" / "discriminator_opt000002.pt", weights_only=False)
    assert opt["state"] and opt["param_groups"][0]["betas"] == (0.0, 0.999)  # Adam moments are in the checkpoint


def test_ufogen_posterior_step_trains_and_samples_in_one_step(tmp_path, teacher_path):
    loop = main("ufogen", tiny_argv(log_dir=tmp_path / "run", total_training_steps=1, teacher_model_path=teacher_path,
                                    ufogen_step="posterior", disc_init="random", **UFOGEN_FLAGS))
    assert loop.step == 1 and not loop.diffusion.distillation
    image_sample = load_script("image_sample")
    flags = [f"--{k}={v}" for k, v in {**TINY_MODEL, **CFG_FLAGS}.items()]
    path = image_sample.main(flags + ["--model_path", str(tmp_path / "run" / "model000001.pt"), "--training_mode",
                                      "ufogen", "--sampler", "onestep", "--num_samples", "3", "--batch_size", "3",
                                      "--log_dir", str(tmp_path / "samples")])
    with np.load(path) as data:
        assert data["arr_0"].shape == (3, 8, 8, 3)


def test_ufogen_needs_the_adm_unet():
    with pytest.raises(ValueError, match="model_type adm"):
        build_discriminator(dict(model_type="ncsnpp", image_size=8, num_channels=32, num_res_blocks=1))
    assert KarrasDenoiser().get_scalings(torch.tensor(1.0))[2] > 0


def test_ufogen_resumes_from_a_distributed_checkpoint_bit_exactly(tmp_path, teacher_path):
    """--parallel fsdp: the discriminator, which the loss owns, travels in shardedNNNNNN/, its optimizer in its own
    file beside stateNNNNNN.pt (the same on every rank)."""
    from cm.distributed_checkpoint import read_full

    same, names = resumes_bit_exactly("ufogen", tmp_path, teacher_model_path=teacher_path, parallel="fsdp",
                                      **UFOGEN_FLAGS)
    assert same and {"discriminator000002.pt", "discriminator_opt000002.pt"} <= set(names)
    assert "discriminator" in read_full(str(tmp_path / "restarted" / "sharded000002"))
    opt = torch.load(tmp_path / "restarted" / "discriminator_opt000002.pt", weights_only=False)
    assert opt["state"]  # the optimizer's moments, beside the run state
