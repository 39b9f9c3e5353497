import argparse

import pytest

from cm.metrics import LOSS_NORMS

from cm.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    cm_train_defaults,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    parse_args_with_config,
    resolve_channel_mult,
)


def parser():
    p = argparse.ArgumentParser()
    add_dict_to_argparser(p, {**model_and_diffusion_defaults(), **cm_train_defaults(), "lr": 1e-4})
    return p


def test_args_round_trip_through_the_command_line():
    defaults = {**model_and_diffusion_defaults(), **cm_train_defaults()}
    args = parser().parse_args([])
    assert args_to_dict(args, defaults.keys()) == defaults
    argv = []
    for k, v in defaults.items():
        argv += [f"--{k}", str(v)]
    assert args_to_dict(parser().parse_args(argv), defaults.keys()) == defaults


def test_config_file_sets_defaults_and_flags_win(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("image_size: 32\nattention_resolutions: [16, 8]\nclass_cond: true\nlr: 0.0002\nloss_norm: l2\n")
    args = parse_args_with_config(parser(), ["--config", str(cfg), "--lr", "0.001"])
    assert args.image_size == 32 and args.attention_resolutions == "16,8" and args.class_cond is True
    assert args.loss_norm == "l2" and args.lr == 0.001


@pytest.mark.parametrize(
    "text, needle",
    [
        ("image_sise: 32\n", "unknown keys: image_sise"),
        ("loss_norm: l3\n", "loss_norm must be one of"),
        ("image_size: big\n", "bad value for image_size"),
    ],
)
def test_bad_config_files_stop_with_one_line(tmp_path, capsys, text, needle):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit):
        parse_args_with_config(parser(), ["--config", str(cfg)])
    assert needle in capsys.readouterr().err


def test_missing_config_file(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        parse_args_with_config(parser(), ["--config", str(tmp_path / "nope.yaml")])


def test_enum_flags_have_choices_and_help(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--weight_schedule", "cosine"])
    assert "invalid choice" in capsys.readouterr().err
    help_text = " ".join(parser().format_help().split())
    assert "qkv channel layout" in help_text and "{" + ",".join(LOSS_NORMS) + "}" in help_text


def test_default_channel_mult_follows_the_reference():
    assert resolve_channel_mult("", 64) == (1, 2, 3, 4)
    assert resolve_channel_mult("", 256) == (1, 1, 2, 2, 4, 4)
    assert resolve_channel_mult("", 512) == (0.5, 1, 1, 2, 2, 4, 4)
    assert resolve_channel_mult("1,2", 64) == (1, 2)
    with pytest.raises(ValueError, match="no default channel_mult for image_size 48"):
        resolve_channel_mult("", 48)


def test_create_model_and_diffusion_passes_every_flag():
    kw = model_and_diffusion_defaults()
    kw.update(image_size=16, num_channels=32, num_res_blocks=1, attention_resolutions="8", num_head_channels=16,
              weight_schedule="uniform", sigma_max=40.0)
    model, diffusion = create_model_and_diffusion(**kw, distillation=True, loss_norm="l1")
    assert diffusion.loss_norm == "l1" and diffusion.distillation and diffusion.sigma_max == 40.0
    assert diffusion.weight_schedule == "uniform"
    assert model.image_size == 16


def test_unknown_model_type():
    kw = model_and_diffusion_defaults()
    kw["model_type"] = "uvit"
    with pytest.raises(ValueError, match="unknown model_type 'uvit'"):
        create_model_and_diffusion(**kw)


def test_boolean_flags_stand_alone_or_take_a_value(tmp_path):
    """`--class_cond` alone is `--class_cond true`; explicit values and YAML booleans still parse."""
    assert parser().parse_args(["--class_cond"]).class_cond is True
    assert parser().parse_args(["--class_cond", "--lr", "0.5"]).class_cond is True
    assert parser().parse_args(["--class_cond", "false"]).class_cond is False
    assert parser().parse_args(["--class_cond", "yes"]).class_cond is True
    cfg = tmp_path / "run.yaml"
    cfg.write_text("class_cond: true\n")
    assert parse_args_with_config(parser(), ["--config", str(cfg)]).class_cond is True
    assert parse_args_with_config(parser(), ["--config", str(cfg), "--class_cond", "no"]).class_cond is False


def test_bare_dry_run_prints_the_configuration(capsys):
    from cm.train_cli import main

    main(None, ["--training_mode", "consistency_training", "--dry_run"])
    assert '"training_mode": "consistency_training"' in capsys.readouterr().out
