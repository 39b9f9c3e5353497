"""Nothing is lost: a log dir belongs to one live process, every output is written atomically (a full disk leaves
the previous file and no temporary one), a written checkpoint is fsynced with its folder, and a log dir of
another run names the settings that differ."""

import ast
import errno
import json
import os
import socket
import stat
import subprocess
import sys

import pytest
import torch

from cm import checkpoint_io
from cm.train_cli import main

from helpers import tiny_argv

HERE = os.path.dirname(os.path.abspath(__file__))

HOLDER = """
import os, sys
from cm.run_dir import lock_log_dir
log_dir = sys.argv[1]
lock_log_dir(log_dir)
with open(os.path.join(log_dir, f"model000002.pt.tmp{os.getpid()}"), "wb") as f:
    f.write(b"a checkpoint being written")
print("locked", flush=True)
sys.stdin.read()
"""


def ct(log_dir, **flags):
    return main("consistency_training", tiny_argv(log_dir=log_dir, loss_norm="l2", **{"total_training_steps": 2, **flags}))


def test_a_second_process_in_a_log_dir_stops_at_once_naming_the_holder(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        in_flight = tmp_path / f"model000002.pt.tmp{holder.pid}"
        with pytest.raises(SystemExit):
            ct(tmp_path)
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"error: log dir {tmp_path} is in use by another run"), err
        assert f"host {socket.gethostname()}, pid {holder.pid}, started 20" in err, err
        assert in_flight.exists() and not any(n.startswith("model0") and n.endswith(".pt") for n in os.listdir(tmp_path))
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert ct(tmp_path).step == 2  # the holder has ended: the log dir is free, its leftover temporary removed
    assert "model000002.pt" in os.listdir(tmp_path) and not in_flight.exists()


def test_another_runs_checkpoints_name_every_setting_that_differs(tmp_path, capsys):
    ct(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        ct(tmp_path, ema_rate="0.5", lr=0.002)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds checkpoints of another run" in err, err
    assert "loop.ema_rate: 0.9999 -> 0.5" in err and "optimizer.lr: 0.001 -> 0.002" in err, err


FULL_DISK = """
import json, os, resource, signal, sys
import numpy as np
import torch
sys.path.insert(0, sys.argv[2])
from cm.checkpoint_io import atomic_save, write_directory_atomically, write_json_atomic
from cm.image_util import save_npz, save_png
from cm.run_dir import write_run_config
from evaluations.evaluator import FIDStatistics, save_statistics
from helpers import load_script

out = sys.argv[1]
prepare_data = load_script("prepare_data")
noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
writers = {
    "samples.npz": lambda p: save_npz(p, noise),
    "grid.png": lambda p: save_png(noise, p),
    "stats.npz": lambda p: save_statistics(p, FIDStatistics(np.zeros(64), np.eye(64)), overwrite=True),
    "prepared.png": lambda p: prepare_data.write_png(noise, p),
    "metrics.json": lambda p: write_json_atomic({"rows": list(range(2000))}, p),
    "config.json": lambda p: write_run_config(os.path.dirname(p), {"rows": list(range(2000))}),
    "model.pt": lambda p: atomic_save({"w": torch.zeros(4096)}, p),
    "export": lambda p: write_directory_atomically(p, lambda d: write_json_atomic(noise.tolist(), os.path.join(d, "w"))),
}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
failures = {}
for name, write in writers.items():
    try:
        write(os.path.join(out, name))
        failures[name] = None
    except OSError as e:
        failures[name] = e.errno
print(json.dumps(failures))
"""


def test_a_full_disk_leaves_every_previous_output_and_no_temporary_file(tmp_path):
    names = ["samples.npz", "grid.png", "stats.npz", "prepared.png", "metrics.json", "config.json", "model.pt"]
    for name in names:
        (tmp_path / name).write_bytes(b"previous")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "old.txt").write_bytes(b"previous")
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path), HERE], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert failures == {name: errno.EFBIG for name in names + ["export"]}, failures  # each write hit the limit
    for name in names:
        assert (tmp_path / name).read_bytes() == b"previous", name
    assert sorted(os.listdir(tmp_path)) == sorted(names + ["export"])  # no temporary file or folder
    assert os.listdir(tmp_path / "export") == ["old.txt"]


def test_a_checkpoint_counts_as_written_once_the_file_and_its_folder_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(checkpoint_io.os, "fsync", fsync)
    checkpoint_io.atomic_save({"w": torch.ones(3)}, tmp_path / "model000001.pt")
    assert synced == ["file", "folder"]
    assert torch.load(tmp_path / "model000001.pt", weights_only=True)["w"].tolist() == [1.0, 1.0, 1.0]


def test_an_export_folder_is_replaced_only_once_the_new_one_is_complete(tmp_path):
    target = tmp_path / "pipeline"
    checkpoint_io.write_directory_atomically(target, lambda d: open(os.path.join(d, "a.txt"), "w").write("one"))
    with pytest.raises(RuntimeError):
        def fail(folder):
            open(os.path.join(folder, "a.txt"), "w").write("two")
            raise RuntimeError("export failed half way")
        checkpoint_io.write_directory_atomically(target, fail)
    assert (target / "a.txt").read_text() == "one" and sorted(os.listdir(tmp_path)) == ["pipeline"]
    checkpoint_io.write_directory_atomically(target, lambda d: open(os.path.join(d, "b.txt"), "w").write("three"))
    assert os.listdir(target) == ["b.txt"] and sorted(os.listdir(tmp_path)) == ["pipeline"]


ONE_LINE_ENTRIES = {"run_or_exit", "run_script", "main"}  # main: cm.train_cli.main, which calls run_script


@pytest.mark.parametrize("script", sorted(
    [os.path.join("scripts", n) for n in os.listdir(os.path.join(HERE, "..", "scripts")) if n.endswith(".py")]
    + [os.path.join("evaluations", "evaluator.py")]))
def test_every_script_ends_its_failures_in_one_line(script):
    tree = ast.parse(open(os.path.join(HERE, "..", script)).read())
    entry = [node for node in ast.walk(tree) if isinstance(node, ast.If) and "__main__" in ast.dump(node.test)]
    assert entry, f"{script} has no __main__ block"
    called = {getattr(c.func, "id", getattr(c.func, "attr", None)) for c in ast.walk(entry[0]) if isinstance(c, ast.Call)}
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    if "main" in called and "main" in functions:  # the script's own main: it must hand over to run_or_exit
        called = {getattr(c.func, "id", getattr(c.func, "attr", None)) for c in ast.walk(functions["main"])
                  if isinstance(c, ast.Call)}
        assert called & {"run_or_exit", "run_script"}, f"{script}: main() does not go through run_or_exit"
    else:
        assert called & ONE_LINE_ENTRIES, f"{script}: its __main__ block calls {sorted(called)}"


def test_remote_writes_retry_a_bounded_number_of_times(monkeypatch, tmp_path):
    configured = {}
    monkeypatch.setattr(checkpoint_io.bf, "configure", lambda **kw: configured.update(kw))
    monkeypatch.setattr(checkpoint_io, "_blobfile_configured", False)
    monkeypatch.setattr(checkpoint_io.bf, "BlobFile", lambda path, mode: open(tmp_path / "blob", mode))
    checkpoint_io.write_atomic(b"weights", "gs://bucket/model000001.pt")
    assert configured["retry_limit"] == checkpoint_io.BLOB_RETRY_LIMIT > 0  # blobfile's default (None) retries forever
    assert (tmp_path / "blob").read_bytes() == b"weights"
