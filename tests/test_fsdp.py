"""--parallel fsdp: sharded training equals DDP, distributed checkpoints reshard, resume and export, async saves.

The multi-rank runs go through tests/fsdp_worker.py under torchrun (CPU, gloo); each launch trains several tiny
runs in one process group.
"""

import os
import subprocess
import sys

import pytest
import torch

from cm import distributed_checkpoint as dcp_io
from cm.checkpoint_io import find_resume_checkpoint

import fsdp_worker
from helpers import load_script, nested_equal, read_progress, resumes_bit_exactly

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "fsdp_worker.py")


def launch(ranks, out, plan, timeout=400, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), WORKER,
           str(out), plan]
    env = dict(os.environ, OMP_NUM_THREADS="1", CM_DIST_TIMEOUT="60", CUDA_VISIBLE_DEVICES="", **env)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert result.returncode == 0, errors or result.stderr[-3000:]
    return result


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """One 2-rank launch: sCD (frozen teacher, JVP loss, two EMAs) and CD (teacher, target, EMAs), 10 steps each
    under ddp and fsdp (fp32, Adam; the CD run writes its checkpoints in the background); 2 steps of fsdp sCT in
    fp32 and in bf16."""
    out = tmp_path_factory.mktemp("fsdp")
    launch(2, out, "scd:ddp:10,scd:fsdp:10,cd:ddp:10,cd:fsdp:10:async,sct:fsdp:2,sct:fsdp:2:bf16")
    return out


SHARDED = {"scd": "scd-fsdp", "cd": "cd-fsdp-async"}


@pytest.mark.parametrize("mode", ["scd", "cd"])
def test_fsdp_training_equals_ddp(two_rank_runs, mode):
    ddp, fsdp = two_rank_runs / f"{mode}-ddp", two_rank_runs / SHARDED[mode]
    names = ["model000010.pt", "ema_0.9_000010.pt", "ema_0.99_000010.pt"]
    names += ["target_model000010.pt"] if mode == "cd" else []
    for name in names:
        assert max_difference(load(ddp / name), load(fsdp / name)) < 1e-6, name
    # the sharded run kept distributed checkpoints at its save steps, each complete with its run state
    assert dcp_io.sharded_steps(str(fsdp)) == [10, 5]
    assert not (fsdp / "opt000010.pt").exists()


def test_bf16_fsdp_smoke(two_rank_runs):
    """bf16 under fsdp (bfloat16 gathered weights, float32 reduction; sCT's JVP keeps float32 weights and autocast):
    finite float32 weights, and losses within a loose tolerance of the float32 run's."""
    bf16 = load(two_rank_runs / "sct-fsdp-bf16" / "model000002.pt")
    assert all(torch.isfinite(v).all() for v in bf16.values())
    assert all(v.dtype == torch.float32 for v in bf16.values() if v.is_floating_point())  # weights stay float32
    assert max_difference(bf16, load(two_rank_runs / "sct-fsdp" / "model000002.pt")) < 1e-3
    losses = [[float(row["mse"]) for row in read_progress(two_rank_runs / run)] for run in ("sct-fsdp", "sct-fsdp-bf16")]
    assert losses[1] == pytest.approx(losses[0], rel=0.05), losses


def test_a_sharded_checkpoint_exports_the_reference_files(two_rank_runs, tmp_path):
    """convert_checkpoint.py turns shardedNNNNNN/ (here written in the background) into the single files the run
    gathered itself, plus an optimizer file in torch.optim's layout (the DDP run's, up to round-off)."""
    run = two_rank_runs / SHARDED["cd"]
    load_script("convert_checkpoint").main([str(run / "sharded000010"), str(tmp_path)])
    for name in ("model000010.pt", "ema_0.9_000010.pt", "ema_0.99_000010.pt", "target_model000010.pt"):
        assert nested_equal(load(tmp_path / name), load(run / name)), name
    exported, ddp = load(tmp_path / "opt000010.pt"), load(two_rank_runs / "cd-ddp" / "opt000010.pt")
    assert exported["param_groups"][0]["params"] == ddp["param_groups"][0]["params"]
    for index, values in ddp["state"].items():
        assert (exported["state"][index]["exp_avg"] - values["exp_avg"]).abs().max() < 1e-6
    # with the run state beside them the exported files are a complete checkpoint that ddp resumes from
    (tmp_path / "state000010.pt").write_bytes((run / "state000010.pt").read_bytes())
    found = find_resume_checkpoint(str(tmp_path), (0.9, 0.99), ("target_model",))
    assert found == str(tmp_path / "model000010.pt")


def test_a_folder_without_metadata_is_not_a_checkpoint(tmp_path):
    for step in (1, 2):
        (tmp_path / f"state{step:06d}.pt").write_bytes(b"")
    state = {"model": {"w": torch.arange(6.0)}}
    dcp_io.Checkpointer().save(state, str(tmp_path / dcp_io.sharded_dir_name(1)))
    (tmp_path / dcp_io.sharded_dir_name(2)).mkdir()  # a save that never finished: shards, no metadata
    (tmp_path / dcp_io.sharded_dir_name(2) / "__0_0.distcp").write_bytes(b"partial")
    dcp_io.Checkpointer().save(state, str(tmp_path / dcp_io.sharded_dir_name(3)))  # no state file
    assert dcp_io.sharded_steps(str(tmp_path)) == [1]
    with pytest.raises(FileNotFoundError, match="not a complete distributed checkpoint"):
        dcp_io.read_full(str(tmp_path / dcp_io.sharded_dir_name(2)))


def test_an_async_save_holds_the_state_it_staged(tmp_path):
    """Training goes on while the background write runs: the parameters change before it completes, and the
    folder still holds the values of the moment of the save."""
    weights = {"w": torch.randn(64, 8), "b": torch.randn(8)}
    staged = {k: v.clone() for k, v in weights.items()}
    saver = dcp_io.Checkpointer(asynchronous=True)
    saver.save({"model": weights}, str(tmp_path / "sharded000001"))
    for value in weights.values():
        value.add_(1.0)  # the next optimizer steps
    saver.wait()
    assert nested_equal(dcp_io.read_full(str(tmp_path / "sharded000001"))["model"], staged)


def test_single_process_fsdp_resumes_bit_exactly(tmp_path):
    """One process with --parallel fsdp: nothing to shard, distributed checkpoints all the same; a restart from
    step 1 reproduces step 2 bit for bit, the optimizer state inside the folder included."""
    same, names = resumes_bit_exactly("consistency_training", tmp_path, loss_norm="l2", parallel="fsdp")
    assert same and "target_model000002.pt" in names
    straight, restarted = (dcp_io.read_full(str(tmp_path / run / "sharded000002")) for run in ("straight", "restarted"))
    assert nested_equal(straight, restarted)


def test_keep_checkpoints_prunes_distributed_checkpoints(tmp_path):
    """--keep_checkpoints with distributed checkpoints: older folders go with their run state and single files."""
    from cm.train_cli import main

    from helpers import tiny_argv

    main("consistency_training", tiny_argv(log_dir=tmp_path, total_training_steps=4, save_interval=1,
                                           loss_norm="l2", parallel="fsdp", keep_checkpoints=2))
    names = sorted(os.listdir(tmp_path))
    assert dcp_io.sharded_steps(str(tmp_path)) == [4, 3]
    assert not [n for n in names if n.startswith("sharded") and n not in ("sharded000003", "sharded000004")]
    assert not [n for n in names if n.endswith(("000001.pt", "000002.pt"))]


def copy_until(run, step, to):
    """A copy of the log dir `run` as it was at `step` (later checkpoints left out)."""
    import shutil

    def later(name):
        digits = name[-9:-3] if name.endswith(".pt") else name[-6:]
        return digits.isdigit() and int(digits) > step

    shutil.copytree(run, to, ignore=lambda _, names: [n for n in names if later(n) or n == "run.lock"])
    return to


def test_a_sharded_run_resumes_at_another_world_size_on_the_same_trajectory(two_rank_runs, tmp_path, monkeypatch):
    """The 2-rank fsdp run saved at step 5 continues on 1 and on 4 ranks to step 10 (its distributed checkpoint
    resharded): the same parameters, EMAs and target as the uninterrupted 2-rank run (every random draw of a step
    comes from the seed, the step and the sample's global index; the data position is global). The same under ddp:
    tests/test_sample_rng.py."""
    runs = {"cd-fsdp-async": "cd:fsdp:+5:async"}
    for ranks in (1, 4):
        out = tmp_path / f"ranks{ranks}"
        for name in runs:
            copy_until(two_rank_runs / name, 5, out / name)
        teacher = str(two_rank_runs / "teacher" / "model000002.pt")
        if ranks == 1:  # one process needs no launcher
            monkeypatch.setenv("FSDP_TEST_TEACHER", teacher)
            fsdp_worker.run(str(out), ",".join(runs.values()))
        else:
            launch(ranks, out, ",".join(runs.values()), FSDP_TEST_TEACHER=teacher)
        for name in runs:
            for file in ("model000010.pt", "ema_0.9_000010.pt", "ema_0.99_000010.pt", "target_model000010.pt"):
                difference = max_difference(load(out / name / file), load(two_rank_runs / name / file))
                assert difference < 1e-6, (ranks, name, file, difference)
