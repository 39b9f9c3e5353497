import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")


def mpiexec():
    path = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return path if os.path.exists(path) else shutil.which("mpiexec")


def run(cmd, timeout=180, dist_timeout=60):
    env = dict(os.environ, OMP_NUM_THREADS="1", CM_DIST_TIMEOUT=str(dist_timeout), CUDA_VISIBLE_DEVICES="")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    result = run([sys.executable, WORKER, str(out)])
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.load(out / "params_rank0.pt", weights_only=True)


def check_ranks_agree_with_single(out, single):
    ranks = [torch.load(out / f"params_rank{r}.pt", weights_only=True) for r in range(2)]
    # first step: the all-reduced mean gradient over ranks equals the one-process gradient, and so
    # does the update
    for g0, g1, g in zip(ranks[0]["first_grads"], ranks[1]["first_grads"], single["first_grads"]):
        assert torch.equal(g0, g1)
        assert torch.allclose(g0, g, atol=1e-6 * g.abs().max().item() + 1e-9, rtol=1e-4)
    for p0, p in zip(ranks[0]["first_params"], single["first_params"]):
        assert torch.allclose(p0, p, atol=1e-6)
    # every step keeps the ranks identical
    for k in single["params"]:
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), k


def test_mpiexec_two_ranks_match_one_process(tmp_path, single):
    exe = mpiexec()
    assert exe, "mpiexec not found (installed by the mpich package)"
    result = run([exe, "-n", "2", sys.executable, WORKER, str(tmp_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    check_ranks_agree_with_single(tmp_path, single)


def test_torchrun_two_ranks_match_one_process(tmp_path, single):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, str(tmp_path)]
    result = run(cmd)
    assert result.returncode == 0, result.stderr[-2000:]
    check_ranks_agree_with_single(tmp_path, single)


def test_a_dead_rank_makes_the_launch_fail_instead_of_hanging(tmp_path):
    start = time.time()
    result = run([mpiexec(), "-n", "2", sys.executable, WORKER, str(tmp_path), "--die"], timeout=150, dist_timeout=10)
    assert result.returncode != 0
    assert time.time() - start < 100


EXIT_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exit_worker.py")


def test_finished_runs_exit_cleanly_under_mpiexec(tmp_path):
    """A finished 2-rank run leaves with status 0 every time: CM_EXIT_ROUNDS fresh 2-rank runs forked inside one
    mpiexec launch (each ending through the interpreter's shutdown), then a run of the launch itself over MPI.
    Without the orderly teardown (cm.dist_util.teardown_dist), gloo could outlive the interpreter and abort a
    finished run ("terminate called without an active exception", exit code 6)."""
    rounds = int(os.environ.get("CM_EXIT_ROUNDS", "4"))
    result = run([mpiexec(), "-n", "2", sys.executable, EXIT_WORKER, str(tmp_path), str(rounds)], timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "terminate called" not in output, output[-3000:]
    statuses = json.loads((tmp_path / "statuses.json").read_text())
    assert statuses == [[0] * rounds, [0] * rounds]
    finished = [tmp_path / f"round{i}" for i in range(rounds)] + [tmp_path / "mpi"]
    assert all((run_dir / "model000003.pt").exists() for run_dir in finished)


def test_the_teardown_is_registered_once_and_is_idempotent(monkeypatch):
    from cm import dist_util

    registered = []
    monkeypatch.setattr(dist_util.atexit, "register", registered.append)
    monkeypatch.setattr(dist_util, "_TEARDOWN_REGISTERED", False)
    dist_util._register_teardown()
    dist_util._register_teardown()
    assert registered == [dist_util.teardown_dist]
    dist_util.teardown_dist()  # no process group: nothing to do, no error
