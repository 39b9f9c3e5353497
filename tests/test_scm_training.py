"""sCT and sCD (sCM, Lu & Song 2024) as training modes: the command line, exact resume, the log-variance head in
checkpoints, sampling a checkpoint with image_sample.py, the UNet's sCM flags, and the quickstart's samplers."""

import json
import os

import numpy as np
import pytest
import torch

from cm import config as cm_config
from cm import nn as nn_module
from cm.karras_diffusion import KarrasDenoiser
from cm.nn import pixel_norm
from cm.script_util import create_model, model_and_diffusion_defaults
from cm.train_cli import create_argparser, describe_teacher, main
from cm.training_modes import get_training_mode
from cm.trigflow import TrigFlowDenoiser
from cm.unet import ResBlock, UNetModel

from helpers import TINY_MODEL, load_script, read_progress, state_equal, tiny_argv

SCM = dict(logvar_channels=16, adaptive_double_norm="true", tangent_warmup_steps=3, dropout=0.1)
HEAD_KEYS = {"logvar_head.linear.weight", "logvar_head.linear.bias"}


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    """A few-step EDM teacher checkpoint of the tiny digits model (adaptive double normalisation, as the students)."""
    log_dir = tmp_path_factory.mktemp("edm")
    main("edm", tiny_argv(log_dir=log_dir, total_training_steps=2, adaptive_double_norm="true"))
    return str(log_dir / "model000002.pt")


def scm_argv(mode, log_dir, teacher_path, **flags):
    extra = dict(SCM, time_conditioning="trigflow", **flags)
    if mode == "scd":
        extra.update(teacher_model_path=teacher_path, init_from_teacher="true", time_conditioning="edm")
    return tiny_argv(log_dir=log_dir, **extra)


@pytest.mark.parametrize("mode", ["sct", "scd"])
def test_each_mode_trains_from_the_command_line_with_its_head_in_every_checkpoint(tmp_path, teacher_path, mode):
    loop = main(mode, scm_argv(mode, tmp_path, teacher_path, total_training_steps=3))
    assert loop.step == 3 and loop.target_model is None
    assert isinstance(loop.diffusion, TrigFlowDenoiser) and (loop.teacher_model is not None) == (mode == "scd")
    names = set(os.listdir(tmp_path))
    assert {"model000003.pt", "opt000003.pt", "state000003.pt", "ema_0.9999_000003.pt"} <= names
    assert not any(name.startswith("target_model") for name in names)
    for name in ("model000003.pt", "ema_0.9999_000003.pt"):
        saved = torch.load(tmp_path / name, weights_only=True)
        assert HEAD_KEYS <= set(saved) and set(saved) == set(loop.model.state_dict())
    # the head is trained with the model's optimizer (it starts at zero)
    assert loop.model.logvar_head.linear.weight.abs().sum() > 0
    assert {"loss", "mse", "logvar", "t"} <= set(read_progress(tmp_path)[-1])


@pytest.mark.parametrize("mode", ["sct", "scd"])
def test_resume_continues_the_same_trajectory_bit_for_bit(tmp_path, teacher_path, mode):
    straight = main(mode, scm_argv(mode, tmp_path / "a", teacher_path, total_training_steps=4, save_interval=2))
    main(mode, scm_argv(mode, tmp_path / "b", teacher_path, total_training_steps=2))  # stopped at step 2
    torch.manual_seed(12345)  # a restarted process has other RNG states until resume restores them
    resumed = main(mode, scm_argv(mode, tmp_path / "b", teacher_path, total_training_steps=4))
    assert resumed.step == 4
    assert state_equal(straight.model.state_dict(), resumed.model.state_dict())  # the log-variance head included
    for a, b in zip(straight.ema_params, resumed.ema_params):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    sa, sb = straight.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    saved = torch.load(tmp_path / "b" / "model000002.pt", weights_only=True)
    head_at_2 = {k: v for k, v in saved.items() if k in HEAD_KEYS}
    assert len(head_at_2) == 2 and all(v.abs().sum() > 0 for v in head_at_2.values())


def test_the_tangent_warmup_is_the_schedule_in_place_of_n(tmp_path, teacher_path):
    main("sct", scm_argv("sct", tmp_path, teacher_path, total_training_steps=4, tangent_warmup_steps=2))
    assert [float(r["tangent_warmup"]) for r in read_progress(tmp_path)] == [0.0, 0.5, 1.0, 1.0]


def test_the_jvp_flag_chooses_how_the_tangent_is_taken(tmp_path, teacher_path, monkeypatch):
    """--jvp finite_difference reaches the sCM loss: the same run with central differences stays close to the exact
    one (the derivative's error is ~1e-4 relative in float32, cm.nn.finite_difference_jvp)."""
    calls = []
    fd = nn_module.JVP_METHODS["finite_difference"]
    monkeypatch.setitem(nn_module.JVP_METHODS, "finite_difference", lambda *a, **k: calls.append(1) or fd(*a, **k))
    exact = main("sct", scm_argv("sct", tmp_path / "exact", teacher_path, total_training_steps=2))
    assert calls == []
    differences = main("sct", scm_argv("sct", tmp_path / "fd", teacher_path, total_training_steps=2,
                                       jvp="finite_difference"))
    assert len(calls) == 2 and differences.run_config["run"]["jvp"] == "finite_difference"
    for a, b in zip(exact.model.parameters(), differences.model.parameters()):
        assert torch.allclose(a, b, atol=1e-3, rtol=0)


def test_image_sample_samples_a_trained_checkpoint(tmp_path, teacher_path):
    main("sct", scm_argv("sct", tmp_path / "run", teacher_path, total_training_steps=2))
    sample = load_script("image_sample")
    flags = {**TINY_MODEL, "logvar_channels": 16, "adaptive_double_norm": "true", "dropout": 0.1,
             "time_conditioning": "trigflow", "training_mode": "sct", "model_path": tmp_path / "run" / "model000002.pt",
             "num_samples": 6, "batch_size": 4, "grid": "none"}
    argv = [a for k, v in flags.items() for a in (f"--{k}", str(v))]
    images = {}
    for sampler in ("trigflow_onestep", "trigflow_twostep"):
        path = sample.main([*argv, "--sampler", sampler, "--log_dir", str(tmp_path / sampler)])
        with np.load(path) as data:
            images[sampler] = data["arr_0"]
        assert images[sampler].shape == (6, 8, 8, 3) and images[sampler].dtype == np.uint8
    assert not np.array_equal(images["trigflow_onestep"], images["trigflow_twostep"])


# ----- the network and the denoiser ---------------------------------------------------------------


def test_the_unet_flags_off_give_the_reference_network_bit_for_bit():
    kw = {**model_and_diffusion_defaults(), **TINY_MODEL}
    network_kw = {k: kw[k] for k in kw if k not in ("sigma_min", "sigma_max", "weight_schedule")}
    torch.manual_seed(0)
    reference = UNetModel(8, 3, 32, 3, 1, (2,), channel_mult=(1, 2), num_heads=4, num_head_channels=16,
                          use_scale_shift_norm=True)
    torch.manual_seed(0)
    ours = create_model(**{**network_kw, "adaptive_double_norm": False, "logvar_channels": 0})
    assert state_equal(reference.state_dict(), ours.state_dict())
    # adaptive double normalisation adds no parameter; the head adds exactly its own
    adn = create_model(**{**network_kw, "adaptive_double_norm": True})
    head = create_model(**{**network_kw, "logvar_channels": 8})
    assert adn.state_dict().keys() == reference.state_dict().keys()
    assert set(head.state_dict()) - set(reference.state_dict()) == HEAD_KEYS
    weights = {k: torch.randn_like(v) * 0.2 for k, v in reference.state_dict().items()}  # no zero-initialised layers
    for net in (reference, ours, adn):
        net.load_state_dict(weights)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, -200.0])
    assert torch.equal(reference(x, t), ours(x, t))
    assert not torch.allclose(reference(x, t), adn(x, t))


def test_adaptive_double_normalisation_is_pixel_normed_scale_and_shift():
    torch.manual_seed(0)
    block = ResBlock(32, 16, 0.0, use_scale_shift_norm=True, adaptive_double_norm=True)
    torch.nn.init.normal_(block.out_layers[-1].weight)  # not the zero init, so the branch shows
    x, emb = torch.randn(2, 32, 4, 4), torch.randn(2, 16)
    scale, shift = block.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
    h = block.out_layers[0](block.in_layers(x)) * pixel_norm(1 + scale) + pixel_norm(shift)
    torch.testing.assert_close(block(x, emb), x + block.out_layers[1:](h))
    assert torch.allclose(pixel_norm(shift).pow(2).mean(dim=1), torch.ones(2, 1, 1), atol=1e-5)
    with pytest.raises(ValueError, match="use_scale_shift_norm"):
        ResBlock(32, 16, 0.0, adaptive_double_norm=True)


def test_edm_time_conditioning_makes_an_edm_checkpoint_an_exact_trigflow_model():
    torch.manual_seed(0)
    net = UNetModel(8, 3, 32, 3, 1, (2,), channel_mult=(1, 2), num_head_channels=16, use_scale_shift_norm=True)
    torch.nn.init.normal_(net.out[-1].weight, std=0.1)
    x, sigma = torch.randn(3, 3, 8, 8), torch.tensor([0.01, 0.7, 60.0])
    edm = KarrasDenoiser().denoise(net, x * 1, sigma)
    trigflow = TrigFlowDenoiser(time_conditioning="edm").denoise(net, x * 1, sigma)
    torch.testing.assert_close(trigflow[1], edm[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trigflow[0], -edm[0], rtol=1e-5, atol=1e-5)


def test_configurations_name_the_trigflow_denoiser_and_stop_on_a_mismatched_start():
    config = cm_config.resolve_training_config(create_argparser("sct").parse_args(tiny_argv()))
    assert config["denoiser"] == {"sigma_data": 0.5, "time_conditioning": "trigflow", "c_noise_scale": 1.0}
    assert config["schedule"] == {"tangent_warmup_steps": 10000, "total_steps": 400000}
    assert config["loss"] == {"tangent_norm_c": 0.1, "scm_p_mean": -1.0, "scm_p_std": 1.4}
    assert config["network"]["logvar_channels"] == 128 and config["network"]["adaptive_double_norm"] is True
    scd = cm_config.resolve_training_config(create_argparser("scd").parse_args(tiny_argv(teacher_model_path="t.pt")))
    assert scd["student_init"] == "random" and scd["denoiser"]["time_conditioning"] == "trigflow"
    assert scd["teacher"]["network"]["logvar_channels"] == 0 and scd["teacher"]["denoiser"]["distillation"] is False
    for mode, flags in (("scd", dict(teacher_model_path="t.pt", init_from_teacher="true")),
                        ("sct", dict(teacher_model_path="t.pt"))):
        with pytest.raises(ValueError, match="--time_conditioning edm"):
            cm_config.resolve_training_config(create_argparser(mode).parse_args(tiny_argv(**flags)))
    assert get_training_mode("sct").samplers == ("trigflow_onestep", "trigflow_twostep")


# ----- the quickstart ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sct", "scd"])
def test_quickstart_samples_scm_modes_with_the_trigflow_samplers(tmp_path, mode):
    metrics = load_script("quickstart").main(["--mode", mode, "--steps", "4", "--out", str(tmp_path),
                                              "--num_samples", "32", "--search_samples", "32", "--precision", "fp32"])
    with open(tmp_path / "metrics.json") as f:
        assert json.load(f)["mode"] == mode
    assert {"onestep_grid.png", "twostep_grid.png", "metrics.json"} <= set(os.listdir(tmp_path))
    assert np.isfinite(metrics["one-step"]["digits_fid"])


def test_scd_names_no_teacher_solver_it_does_not_use():
    scd = cm_config.resolve_training_config(create_argparser("scd").parse_args(tiny_argv(teacher_model_path="t.pt")))
    assert scd["teacher"]["solver"] is None and "steps" not in describe_teacher(scd["teacher"])
    cd_args = create_argparser("consistency_distillation").parse_args(tiny_argv(teacher_model_path="t.pt"))
    cd = cm_config.resolve_training_config(cd_args)
    assert cd["teacher"]["solver"] == "heun" and "heun steps" in describe_teacher(cd["teacher"])
