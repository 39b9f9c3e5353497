"""Every preset in configs/ parses with its script's flags and builds its network (on the meta device)."""

import glob
import os

import pytest
import torch

from cm.script_util import args_to_dict, create_model_and_diffusion, model_and_diffusion_defaults, parse_args_with_config
from cm.train_cli import create_argparser

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))


def test_there_are_presets_for_every_paper_run():
    names = {os.path.basename(p)[:-5] for p in CONFIGS}
    for dataset in ("imagenet64", "lsun_bedroom256", "cifar10", "digits"):
        assert any(n.startswith(dataset) and n.endswith("_ct") for n in names), dataset
        assert any(n.startswith(dataset) and "_cd" in n for n in names), dataset
        assert any(n.startswith(dataset) and n.endswith("_edm") for n in names), dataset


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p))
def test_config_parses_and_builds_its_network(path):
    import yaml

    with open(path) as f:
        mode = yaml.safe_load(f).get("training_mode", "edm")  # edm_train.py needs no mode
    args = parse_args_with_config(create_argparser(mode), ["--config", path])
    assert args.training_mode == mode
    with torch.device("meta"):
        model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults()),
                                                      distillation=mode in ("consistency_distillation", "consistency_training"))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert diffusion.sigma_max == args.sigma_max


@pytest.mark.parametrize("name", ["lsun_bedroom256_edm", "lsun_cat256_edm"])
def test_lsun_edm_presets_use_the_reference_ema_rates(name):
    """openai/consistency_models' scripts/launch.sh trains the LSUN 256 EDM teachers with
    --ema_rate 0.999,0.9999,0.9999432189950708 (its LSUN CD and CT lines use 0.9999,0.99994,...)."""
    import yaml

    with open(os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.yaml")) as f:
        assert yaml.safe_load(f)["ema_rate"] == "0.999,0.9999,0.9999432189950708"
