"""README.md's walk-through runs as written: every `python scripts/...` line of its bash blocks that needs only the
embedded digits is executed in order, in a scratch folder, with short runs (2 training steps, 4 samples); each
script runs as __main__ in this process, with sys.argv as `python scripts/X.py ARGS` sets it.

Left out, each for the reason named in HEAVY or EXTERNAL: the quickstart (five minutes of training by design), and
lines that need data, weights or GPUs this machine does not have.
"""

import os
import re
import runpy
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
SAMPLES = 4
# commands that run as written but take minutes: named here so nobody mistakes them for cheap
HEAVY = {"scripts/quickstart.py": "trains for five minutes by design (tests/test_quickstart.py covers it)"}
# a command naming any of these needs data, weights or processes from outside this repository
EXTERNAL = ("/data/", "imagenet", "cifar10", "lsun", "NEW_DATA", "VIRTUAL_", "photo.png", " ... ", "cd_imagenet64",
            "ema_0.9999_050000", "my_photos", "mpiexec", "torchrun")


def readme_commands(text):
    """Commands of the ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def walk_through(commands):
    """The `python scripts/X.py ...` commands that run on the embedded digits alone (HEAVY ones left out)."""
    chosen = []
    for command in commands:
        words = shlex.split(command)
        if words[:1] != ["python"] or not words[1].startswith("scripts/") or words[1] in HEAVY:
            continue
        if any(marker in f" {command} " for marker in EXTERNAL):
            continue
        chosen.append(words[1:])
    return chosen


def set_flag(argv, name, value):
    """argv with --name set to value (replaced where given, else appended)."""
    if name in argv:
        argv[argv.index(name) + 1] = value
        return argv
    return argv + [name, value]


def drop_flag(argv, name):
    if name not in argv:
        return argv
    i = argv.index(name)
    return argv[:i] + argv[i + 2:]


def shortened(words):
    """A README command with short runs: training STEPS steps, SAMPLES samples, a small autoencoder run; the
    checkpoints it names are the ones the short runs write."""
    script, argv = words[0], [re.sub(r"_(\d{6}|NNNNNN)\.pt$", f"_{STEPS:06d}.pt", w) for w in words[1:]]
    if script.endswith("_train.py"):
        argv = drop_flag(argv, "--time_budget_minutes")
        argv = set_flag(set_flag(argv, "--total_training_steps", str(STEPS)), "--save_interval", str(STEPS))
    elif script == "scripts/image_sample.py":
        argv = set_flag(set_flag(argv, "--num_samples", str(SAMPLES)), "--batch_size", str(SAMPLES))
    elif script == "scripts/train_autoencoder.py":
        argv = set_flag(argv, "--steps", "20")
    return script, argv


def test_the_readme_names_a_walk_through():
    with open(os.path.join(ROOT, "README.md")) as f:
        commands = walk_through(readme_commands(f.read()))
    scripts = {words[0] for words in commands}
    assert {"scripts/edm_train.py", "scripts/ct_train.py", "scripts/cd_train.py", "scripts/image_sample.py",
            "scripts/cm_train.py", "scripts/sct_train.py", "scripts/scd_train.py"} <= scripts


def test_the_readme_walk_through_runs_as_written(tmp_path, monkeypatch):
    with open(os.path.join(ROOT, "README.md")) as f:
        commands = walk_through(readme_commands(f.read()))
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_LOGDIR", raising=False)
    for words in commands:
        script, argv = shortened(words)
        monkeypatch.setattr(sys, "argv", [script] + argv)
        try:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        except SystemExit as e:
            if e.code not in (0, None):
                pytest.fail(f"README command failed ({e.code}): python {script} {' '.join(argv)}")
        for i, word in enumerate(argv[:-1]):
            if word in ("--log_dir", "--output"):
                assert os.listdir(argv[i + 1]), f"python {script} wrote nothing to {argv[i + 1]}"
