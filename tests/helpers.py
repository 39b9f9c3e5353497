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


CFG_FLAGS = dict(class_cond="true", num_classes=10, null_class="true")  # class-conditional with a null class


def train_cfg_teacher(log_dir, steps=2):
    """A few-step class-conditional EDM teacher with a null class (label dropout 0.2); returns its model file."""
    from cm.train_cli import main

    main("edm", tiny_argv(log_dir=log_dir, total_training_steps=steps, class_dropout_prob=0.2, **CFG_FLAGS))
    return os.path.join(str(log_dir), f"model{steps:06d}.pt")


def nested_equal(a, b):
    """Bit-for-bit equality of nested dicts / lists of tensors and plain values (state dicts, optimizer states)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(nested_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(nested_equal(x, y) for x, y in zip(a, b))
    return a == b


def resumes_bit_exactly(mode, tmp_path, **flags):
    """Train `mode` 2 steps straight and 1 + 1 steps with a restart from the step-1 checkpoint; returns (whether
    every checkpoint file of step 2 -- model, EMAs, optimizer, target, a loss's own state -- is bit-for-bit the
    same, the file names compared)."""
    from cm.train_cli import build_loop, create_argparser, main

    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    main(mode, tiny_argv(log_dir=straight, total_training_steps=2, save_interval=1, **flags))
    first = build_loop(create_argparser(mode).parse_args(tiny_argv(log_dir=restarted, total_training_steps=2, **flags)))
    first.total_training_steps = 1  # killed after the checkpoint of step 1
    first.run_loop()
    torch.manual_seed(12345)  # a new process has other RNG states until the resume restores them
    loop = main(mode, tiny_argv(log_dir=restarted, total_training_steps=2, save_interval=1, **flags))
    assert loop.step == 2
    names = sorted(n for n in os.listdir(straight) if n.endswith("000002.pt") and not n.startswith("state"))
    assert names == sorted(n for n in os.listdir(restarted) if n.endswith("000002.pt") and not n.startswith("state"))
    load = lambda d, n: torch.load(d / n, map_location="cpu", weights_only=False)  # noqa: E731
    return all(nested_equal(load(straight, n), load(restarted, n)) for n in names), names


# ----- JVP checks -------------------------------------------------------------------------


def point():
    """Inputs x [2, 3, 8, 8] and TrigFlow times t [2] with random tangents, in float64."""
    g = torch.Generator().manual_seed(2)
    x, dx = torch.randn(2, 2, 3, 8, 8, dtype=torch.float64, generator=g)
    t, dt = torch.tensor([0.3, 1.2], dtype=torch.float64), torch.randn(2, dtype=torch.float64, generator=g)
    return x, t, dx, dt


def replay(state, fn, *args):
    """fn(*args) with the CPU RNG (dropout masks) at `state`."""
    torch.set_rng_state(state)
    return fn(*args)
