import json
import os
import shutil
import socket
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


@pytest.fixture(scope="module")
def torchrun_pair(tmp_path_factory):
    """The output folder of a 2-process torchrun launch of the worker (and the launch's result)."""
    out = tmp_path_factory.mktemp("torchrun_pair")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER, str(out)]
    return out, run(cmd)


def test_torchrun_two_ranks_match_one_process(torchrun_pair, single):
    tmp_path, result = torchrun_pair
    assert result.returncode == 0, result.stderr[-2000:]
    check_ranks_agree_with_single(tmp_path, single)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_two_torchrun_launchers_train_as_a_two_process_run(tmp_path, torchrun_pair):
    """Two launchers on this host stand for two nodes (one process each) meeting at a c10d rendezvous, as
    `torchrun --nnodes 2 --node_rank i --rdzv_backend c10d --rdzv_endpoint HOST:PORT` on each node; the run ends
    with status 0 on both and writes the same checkpoint as the one-launcher 2-process run, bit for bit."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", CM_DIST_TIMEOUT="60", CUDA_VISIBLE_DEVICES="")
    launchers = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                          "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint,
                          "--rdzv_id", "cm-two-nodes", "--rdzv_conf", "join_timeout=120", WORKER, str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for node in range(2)
    ]
    outputs = [launcher.communicate(timeout=240)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    pair_dir = torchrun_pair[0]
    for name in ("model000003.pt", "ema_0.9_000003.pt", "opt000003.pt"):
        ours = torch.load(tmp_path / "log" / name, weights_only=True)
        theirs = torch.load(pair_dir / "log" / name, weights_only=True)
        assert_same(ours, theirs, name)


def assert_same(a, b, where):
    """a and b equal, tensors bit for bit, through nested dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def launched_as(monkeypatch, rank):
    """The environment of rank `rank` of 2 launched by torchrun, with a rendezvous port nobody listens on and a
    one-second time-out."""
    for name, value in dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port()), CM_DIST_TIMEOUT="1", CM_DEVICE="cpu").items():
        monkeypatch.setenv(name, value)


def test_a_rank_that_cannot_reach_the_rendezvous_stops_in_one_line_within_the_time_out(monkeypatch):
    """A second node given a wrong endpoint (nothing listens there) stops after CM_DIST_TIMEOUT with one line,
    before torch's own connection attempts (which print C++ stack traces while they retry)."""
    from cm import dist_util
    from cm.errors import SetupError

    monkeypatch.setattr(dist_util.dist, "init_process_group", lambda *a, **k: pytest.fail("rendezvous attempted"))
    launched_as(monkeypatch, rank=1)
    start = time.monotonic()
    with pytest.raises(SetupError) as caught:
        dist_util.setup_dist()
    assert 1.0 <= time.monotonic() - start < 5.0
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"rank 1 could not reach the rendezvous at {os.environ['MASTER_ADDR']}:"
                              f"{os.environ['MASTER_PORT']} within 1 s (Connection refused)"), message


def test_rank_0_whose_other_node_never_comes_stops_in_one_line_within_the_time_out(monkeypatch):
    from cm import dist_util
    from cm.errors import SetupError

    launched_as(monkeypatch, rank=0)
    start = time.monotonic()
    with pytest.raises(SetupError) as caught:
        dist_util.setup_dist()
    assert time.monotonic() - start < 10.0
    message = str(caught.value)
    assert "\n" not in message and not dist_util.is_distributed()
    assert message.startswith(f"rank 0 could not join the process group at 127.0.0.1:{os.environ['MASTER_PORT']} "
                              "within 1 s"), message


def test_the_rendezvous_probe_returns_once_rank_0_listens():
    from cm import dist_util

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        start = time.monotonic()
        dist_util.wait_for_rendezvous("127.0.0.1", server.getsockname()[1], seconds=30, rank=1)
        assert time.monotonic() - start < 5.0


def test_a_dead_rank_makes_the_launch_fail_instead_of_hanging(tmp_path):
    start = time.time()
    result = run([mpiexec(), "-n", "2", sys.executable, WORKER, str(tmp_path), "--die"], timeout=150, dist_timeout=10)
    assert result.returncode != 0
    assert time.time() - start < 100


EXIT_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "exit_worker.py")


def test_finished_runs_exit_cleanly_under_mpiexec(tmp_path):
    """A finished 2-rank program leaves with status 0 every time: CM_EXIT_ROUNDS fresh 2-rank worlds forked inside
    one mpiexec launch (each ending through the interpreter's shutdown), then the launch's own ranks over MPI.
    Each ends with a broadcast that gloo's worker thread is still releasing when the main thread exits (the window
    held open on purpose, tests/exit_worker.py): without the orderly teardown (cm.dist_util.teardown_dist) every
    one of them aborts ("terminate called without an active exception", exit code 6 under mpiexec)."""
    rounds = int(os.environ.get("CM_EXIT_ROUNDS", "2"))
    result = run([mpiexec(), "-n", "2", sys.executable, EXIT_WORKER, str(tmp_path), str(rounds)], timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "terminate called" not in output, output[-3000:]
    statuses = json.loads((tmp_path / "statuses.json").read_text())
    assert statuses == [[0] * rounds, [0] * rounds]
    finished = [f"round{i}" for i in range(rounds)] + ["mpi"]
    assert all((tmp_path / f"{name}.rank{r}").exists() for name in finished for r in range(2))
    assert "TCPStore" not in output, output[-3000:]


def test_the_teardown_is_registered_once_and_is_idempotent(monkeypatch):
    from cm import dist_util

    registered = []
    monkeypatch.setattr(dist_util.atexit, "register", registered.append)
    monkeypatch.setattr(dist_util, "_TEARDOWN_REGISTERED", False)
    dist_util._register_teardown()
    dist_util._register_teardown()
    assert registered == [dist_util.teardown_dist]
    dist_util.teardown_dist()  # no process group: nothing to do, no error
