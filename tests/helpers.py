"""Tiny configurations shared by the training, script and distributed tests."""

import copy
import csv
import importlib.util
import os
import tempfile

import torch

from cm import logger
from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults

TINY_MODEL = dict(
    image_size=8,
    num_channels=32,
    num_res_blocks=1,
    channel_mult="1,2",
    attention_resolutions="4",
    num_head_channels=16,
)


def tiny_argv(**overrides):
    """Command-line flags of a tiny digits run (8 px, ~0.3M parameters)."""
    flags = dict(
        TINY_MODEL,
        data_dir="digits",
        batch_size=4,
        log_interval=1,
        save_interval=-1,
        optimizer="adam",
        lr=1e-3,
        channels_last=False,
    )
    flags.update(overrides)
    argv = []
    for k, v in flags.items():
        argv += [f"--{k}", str(v)]
    return argv


def tiny_model_and_diffusion(**overrides):
    kw = model_and_diffusion_defaults()
    kw.update(TINY_MODEL)
    kw.update(overrides)
    return create_model_and_diffusion(**kw)


def quiet_logger(directory=None):
    return logger.configure(dir=directory or tempfile.mkdtemp(), format_strs=["csv"])


def read_progress(log_dir):
    with open(os.path.join(log_dir, "progress.csv"), newline="") as f:
        return list(csv.DictReader(f))


def clone(model):
    return copy.deepcopy(model)


def state_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def load_script(name):
    """scripts/NAME.py imported as a module (the scripts are files, not a package)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(root, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
