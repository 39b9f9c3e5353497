"""The install: ranges in setup.py, the exact CI pair in constraints.txt, README and .ci/run in step, and a
one-line error naming the [mpi] extra when mpiexec finds no MPI library."""

import ast
import os
import re
import sys

import pytest

from cm import dist_util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_kwargs():
    """The keyword arguments of the setup() call in setup.py, evaluated from its syntax tree."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    names = {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
             for t in node.targets if isinstance(t, ast.Name)}
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")

    def value(node):
        if isinstance(node, ast.Name):
            return names[node.id]
        if isinstance(node, ast.BinOp):
            return value(node.left) + value(node.right)
        if isinstance(node, ast.Dict):
            return {ast.literal_eval(k): value(v) for k, v in zip(node.keys, node.values)}
        return ast.literal_eval(node)

    return {k.arg: value(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}


def test_setup_asks_for_ranges_and_constraints_pin_the_ci_pair():
    kwargs = setup_kwargs()
    core = kwargs["install_requires"]
    assert not [r for r in core if "==" in r]
    assert "torch>=2.6,<3" in core and "torchvision>=0.21" in core  # 2.6: CVE-2025-32434
    assert not [r for r in core if re.match(r"(mpich|mpi4py|diffusers|lmdb)\b", r)]
    assert any(r.startswith("safetensors") for r in core) and any(r.startswith("matplotlib") for r in core)
    extras = kwargs["extras_require"]
    assert set(extras["mpi"]) == {"mpi4py", "mpich"}
    assert set(extras["mpi"]) | set(extras["diffusers"]) | set(extras["data"]) <= set(extras["test"])
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        pins = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert pins == ["torch==2.14.1", "torchvision==0.29.1"]


def test_readme_and_ci_run_the_same_install_and_test_commands():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        ci = f.read()
    with open(os.path.join(ROOT, "README.md")) as f:
        setup_section = f.read().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = ['pip install -e ".[test]" -c constraints.txt', "python -m pytest -q"]
    for command in commands:
        assert re.search(rf"^{re.escape(command)}$", ci, re.M), command
        assert re.search(rf"^{re.escape(command)}$", setup_section, re.M), command
    assert '"$status" -eq 5' in ci  # no collected tests is a failure


def test_mpiexec_without_an_mpi_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # "import mpi4py" now fails as if it were not installed
    with pytest.raises(RuntimeError) as err:
        dist_util._mpi_environment()
    message = str(err.value)
    assert 'pip install -e ".[mpi]"' in message and "\n" not in message
