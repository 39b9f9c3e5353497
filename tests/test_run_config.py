"""Sampling from a run's own configuration: --model_path alone (config.json beside it, or the configuration in
its state file), --config RUN/config.json, flags that still win, and one-line advice when a checkpoint does not fit."""

import os
import shutil

import numpy as np
import pytest

from cm.run_config import model_flag_values, state_file_for
from cm.train_cli import main as train_main

from helpers import TINY_MODEL, load_script, tiny_argv

image_sample = load_script("image_sample")
SAMPLE = ["--num_samples", "3", "--batch_size", "3", "--sampler", "onestep"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A one-step CT run of the tiny model with its own channel multipliers (channel_mult 1,1: the tiny flags alone cannot load it)."""
    log_dir = tmp_path_factory.mktemp("run")
    train_main("consistency_training", tiny_argv(log_dir=log_dir, total_training_steps=1, loss_norm="l2",
                                                 channel_mult="1,1"))
    return log_dir


def samples(path):
    with np.load(path) as data:
        return data["arr_0"]


def explicit_samples(run_dir, out):
    flags = [f"--{k}={v}" for k, v in {**TINY_MODEL, "channel_mult": "1,1"}.items()]
    return samples(image_sample.main(flags + SAMPLE + [
        "--model_path", str(run_dir / "ema_0.9999_000001.pt"), "--training_mode", "consistency_training",
        "--log_dir", str(out)]))


def test_model_path_alone_gives_the_runs_samples(run_dir, tmp_path, capsys):
    alone = samples(image_sample.main(SAMPLE + ["--model_path", str(run_dir / "ema_0.9999_000001.pt"),
                                                "--log_dir", str(tmp_path / "alone")]))
    assert "model flags from" in capsys.readouterr().out
    assert np.array_equal(alone, explicit_samples(run_dir, tmp_path / "explicit"))


def test_the_runs_config_json_is_accepted_as_config(run_dir, tmp_path):
    given = samples(image_sample.main(SAMPLE + ["--config", str(run_dir / "config.json"), "--model_path",
                                                str(run_dir / "ema_0.9999_000001.pt"), "--log_dir", str(tmp_path)]))
    assert np.array_equal(given, explicit_samples(run_dir, tmp_path / "explicit"))


def test_the_state_file_stands_in_for_a_missing_config_json(run_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("ema_0.9999_000001.pt", "state000001.pt"):
        shutil.copy(run_dir / name, copy / name)
    assert state_file_for(str(copy / "ema_0.9999_000001.pt")) == str(copy / "state000001.pt")
    from_state = samples(image_sample.main(SAMPLE + ["--model_path", str(copy / "ema_0.9999_000001.pt"),
                                                     "--log_dir", str(tmp_path / "out")]))
    assert np.array_equal(from_state, explicit_samples(run_dir, tmp_path / "explicit"))


def test_command_line_flags_win_over_the_runs_configuration(run_dir, capsys):
    image_sample.main(SAMPLE + ["--model_path", str(run_dir / "ema_0.9999_000001.pt"), "--num_channels", "64",
                                "--dry_run"])
    out = capsys.readouterr().out
    assert '"num_channels": 64' in out and '"channel_mult": "1,1"' in out


def test_a_checkpoint_without_its_configuration_says_to_pass_it(run_dir, tmp_path, capsys):
    lone = tmp_path / "ema_0.9999_000001.pt"
    shutil.copy(run_dir / "ema_0.9999_000001.pt", lone)
    with pytest.raises(SystemExit):
        image_sample.main(SAMPLE + ["--model_path", str(lone), "--log_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit the model flags" in err[0] and "pass the run's configuration" in err[0]


def test_grouped_configuration_maps_back_to_model_flags():
    config = {"training_mode": "edm", "network": {"num_channels": 64, "image_size": 4, "in_channels": 4},
              "denoiser": {"sigma_max": 80.0, "distillation": False}, "latent": {"autoencoder_path": "ae"},
              "data": {"image_size": 16, "batch_size": 8}, "loop": {"batch_size": 8}}
    assert model_flag_values(config) == {"training_mode": "edm", "num_channels": 64, "image_size": 16,
                                         "sigma_max": 80.0, "autoencoder_path": "ae"}


def test_without_log_dir_samples_go_under_the_current_directory_and_the_last_line_lists_them(
        run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    path = image_sample.main(SAMPLE + ["--model_path", str(run_dir / "ema_0.9999_000001.pt")])
    assert os.path.dirname(os.path.dirname(path)) == str(tmp_path / "samples")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("wrote ") and path in last.split()
    written = last.split()[1:]
    assert len(written) == 4 and all(os.path.isfile(p) for p in written)


def test_a_missing_teacher_lists_the_checkpoints_of_its_folder(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_main("consistency_distillation", tiny_argv(log_dir=tmp_path, total_training_steps=1, loss_norm="l2",
                                                         teacher_model_path=run_dir / "ema_0.9999_001500.pt"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ema_0.9999_001500.pt does not exist" in err[0]
    assert f"{run_dir} holds ema_0.9999_000001.pt, model000001.pt" in err[0]
