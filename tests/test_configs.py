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
