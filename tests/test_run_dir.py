"""A log dir belongs to one run: resume compares the stored configuration, another run's files are never
overwritten, and an architecture mismatch is one line."""

import os

import pytest

from cm.run_dir import config_differences
from cm.train_cli import main

from helpers import tiny_argv


def ct(log_dir, **flags):
    return main("consistency_training", tiny_argv(log_dir=log_dir, loss_norm="l2", **{"total_training_steps": 2, **flags}))


def test_a_resume_with_other_settings_stops_and_names_them(tmp_path, capsys):
    ct(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        ct(tmp_path, lr=0.002)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "optimizer.lr: 0.001 -> 0.002" in err and "--allow_config_change true" in err
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("model")) == ["model000002.pt"]


def test_log_and_output_settings_may_change_and_the_explicit_flag_allows_the_rest(tmp_path, capsys):
    ct(tmp_path)
    assert ct(tmp_path, log_interval=2, save_interval=5, max_minutes=9).step == 2  # resumed, nothing left to do
    loop = ct(tmp_path, lr=0.002, total_training_steps=4, allow_config_change="true")
    out = capsys.readouterr().out
    assert loop.step == 4 and "with changed settings:" in out and "optimizer.lr: 0.001 -> 0.002" in out


def test_another_runs_checkpoints_are_never_overwritten(tmp_path, capsys):
    ct(tmp_path)
    capsys.readouterr()
    before = {n: os.path.getmtime(tmp_path / n) for n in os.listdir(tmp_path) if n.endswith(".pt")}
    with pytest.raises(SystemExit):
        ct(tmp_path, ema_rate="0.5")  # no complete set of this run's files: another run's
    err = capsys.readouterr().err
    assert "holds checkpoints of another run" in err and "ema_0.5_000002.pt" in err
    assert {n: os.path.getmtime(tmp_path / n) for n in before} == before


def test_an_architecture_mismatch_at_resume_is_one_line(tmp_path, capsys):
    ct(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        ct(tmp_path, num_channels=64, allow_config_change="true")
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit the model flags" in err and "shape mismatches" in err


def test_config_differences_ignore_what_does_not_change_the_result():
    a = {"training_mode": "edm", "loop": {"log_interval": 1, "time_limit": 0.0, "lr_anneal_steps": 0},
         "run": {"log_dir": "a", "world_size": 1}}
    b = {"training_mode": "edm", "loop": {"log_interval": 9, "time_limit": 60.0, "lr_anneal_steps": 5},
         "run": {"log_dir": "b", "world_size": 2}}
    assert config_differences(a, b) == ["loop.lr_anneal_steps: 0 -> 5", "run.world_size: 1 -> 2"]


def test_a_run_from_before_a_flag_existed_resumes_with_the_flag_at_its_default():
    """Settings added later (latent normalisation, Adam betas, the sample-indexed RNG) read as their defaults in the
    configuration of a run that predates them; another value is a difference."""
    old = {"training_mode": "edm", "latent": {"autoencoder_path": ""}, "optimizer": {"lr": 1e-4}, "run": {"seed": 0}}
    new = {"training_mode": "edm", "optimizer": {"lr": 1e-4, "adam_betas": "0.9,0.999"}, "run": {"seed": 0,
        "sample_indexed_rng": False}, "latent": {"autoencoder_path": "", "latent_norm": "scale", "latent_mean": "",
                                                  "latent_std": ""}}
    assert config_differences(old, new) == []
    new["optimizer"]["adam_betas"] = "0.9,0.95"
    assert config_differences(old, new) == ["optimizer.adam_betas: 0.9,0.999 -> 0.9,0.95"]
    # a distillation run from before the guided teacher and the DiT's final convolution
    old = {"training_mode": "scd", "network": {"model_type": "dit"}, "teacher": {"solver": None,
           "network": {"model_type": "dit"}}}
    new = {"training_mode": "scd", "network": {"model_type": "dit", "dit_final_conv": False}, "teacher": {
           "solver": None, "guidance_scale": 1.0, "network": {"model_type": "dit", "dit_final_conv": False}}}
    assert config_differences(old, new) == []
    new["teacher"]["guidance_scale"] = 1.5
    assert config_differences(old, new) == ["teacher.guidance_scale: 1.0 -> 1.5"]


def test_a_run_may_be_made_longer_when_its_past_schedule_stays(tmp_path, capsys):
    fixed = dict(scale_mode="fixed", target_ema_mode="fixed", start_scales=10)
    ct(tmp_path / "fixed", **fixed)
    assert ct(tmp_path / "fixed", total_training_steps=3, **fixed).step == 3  # N(k) did not depend on K
    assert "for longer: loop.total_training_steps: 2 -> 3" in capsys.readouterr().out
    ct(tmp_path / "progressive", end_scales=40)
    with pytest.raises(SystemExit):  # the progressive N(k) of the steps already trained would change
        ct(tmp_path / "progressive", end_scales=40, total_training_steps=3)
    assert "schedule.total_steps: 2 -> 3" in capsys.readouterr().err
