"""A run saved on K ranks continues on M ranks: random draws indexed by (seed, step, global sample) (cm.sample_rng),
a data layout cut in global batches (cm.image_datasets.DataStream), and a log dir that accepts another number of
ranks with the same global batch (cm.run_dir)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cm.config import resolve_training_config
from cm.digits_data import digits_arrays
from cm.image_datasets import ArraySource, DataStream
from cm.modes.base import consistency_pair
from cm.random_util import DeviceRNG
from cm.run_dir import check_log_dir
from cm.sample_rng import SampleIndexedDraws, SampleRNG
from cm.train_cli import create_argparser

from resize_worker import MODE, main as resize_main, resize_argv
from test_distributed import mpiexec

HERE = os.path.dirname(os.path.abspath(__file__))
G = 8


def loss_like_draws(rows):
    """The kinds of draws the losses make, for a micro-batch of `rows` samples (per-sample ones and two shared)."""
    x = torch.zeros(rows, 3, 4, 4)
    return {
        "noise": torch.randn_like(x),
        "indices": torch.randint(0, 10, (rows,)),
        "uniform": torch.rand(rows, dtype=torch.float64),
        "normal": torch.randn(rows),
        "grid": torch.multinomial(torch.ones(5), rows, replacement=True),
        "scaled": torch.normal(torch.zeros(rows), 2.0),
        "label_drop": torch.rand((rows,), generator=None) < 0.5,  # cm.guidance.drop_labels passes generator=None
        "sized": torch.normal(0.0, 1.0, size=(rows, 2)),
        "channels_last": torch.randn_like(x.contiguous(memory_format=torch.channels_last)),
        "shared": torch.rand(5),  # no layout here has micro-batches of 5
    }


def draws_of_layout(ranks, per_rank, micro, step=5, seed=0):
    """Every micro-batch's draws of a step with `ranks` ranks of `per_rank` samples cut into micro-batches."""
    parts = []
    for rank in range(ranks):
        rng = SampleRNG(True, seed, ranks * per_rank, rank * per_rank)
        for start in range(0, per_rank, micro):
            with rng.micro_batch(step, start, micro):
                parts.append(loss_like_draws(micro))
    return parts


def test_a_micro_batch_draws_its_rows_of_the_full_batch_draw():
    full = draws_of_layout(1, G, G)[0]
    with SampleIndexedDraws(seed=0, step=5, global_batch=G, offset=2, rows=3):
        rows = loss_like_draws(3)
    for name in full:
        expected = full[name] if name == "shared" else full[name][2:5]
        assert torch.equal(rows[name], expected), name
    assert rows["channels_last"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("ranks, per_rank, micro", [(2, 4, 4), (2, 4, 2), (4, 2, 1)])
def test_every_layout_of_the_global_batch_draws_the_same_values_per_sample(ranks, per_rank, micro):
    one = draws_of_layout(1, G, G)[0]
    parts = draws_of_layout(ranks, per_rank, micro)
    for name in one:
        if name == "shared":  # not a per-sample draw: the same whole draw everywhere
            assert all(torch.equal(p[name], one[name]) for p in parts)
        else:
            assert torch.equal(torch.cat([p[name] for p in parts]), one[name]), name


def test_draws_follow_the_step_and_the_seed_not_the_default_rng():
    torch.manual_seed(1)
    a = draws_of_layout(1, G, G, step=5)[0]["noise"]
    torch.manual_seed(2)
    assert torch.equal(draws_of_layout(1, G, G, step=5)[0]["noise"], a)
    assert not torch.equal(draws_of_layout(1, G, G, step=6)[0]["noise"], a)
    assert not torch.equal(draws_of_layout(1, G, G, step=5, seed=1)[0]["noise"], a)


def test_other_operations_and_explicit_generators_pass_through():
    x = torch.arange(6.0).reshape(2, 3)
    with SampleIndexedDraws(seed=0, step=0, global_batch=G, offset=0, rows=2) as mode:
        assert torch.equal(torch.exp(x).log(), torch.log(torch.exp(x)))
        assert torch.equal((x + 1).sum(0), torch.tensor([5.0, 7.0, 9.0]))
        explicit = torch.randn(2, 3, generator=torch.Generator().manual_seed(7))
        assert mode.draws == 0
    assert torch.equal(explicit, torch.randn(2, 3, generator=torch.Generator().manual_seed(7)))


def test_the_default_rng_is_reseeded_per_micro_batch_and_dropout_replays_for_the_target_pass():
    """Dropout stays on the default RNG: reseeded from (seed, step, global row offset), and the target pass of a
    consistency pair (cm.modes.base) sees the online pass's masks under the mode."""
    ones = torch.ones(4, 16)
    rng = SampleRNG(True, seed=0, global_batch=G, first_row=4)
    with rng.micro_batch(3, 0, 4):
        online, target = consistency_pair(DeviceRNG("cpu"), lambda: F.dropout(ones, 0.5), lambda: F.dropout(ones, 0.5))
    assert torch.equal(online, target) and not torch.equal(online, ones)
    torch.manual_seed(99)
    with rng.micro_batch(3, 0, 4):
        again = F.dropout(ones, 0.5)
    assert torch.equal(again, online)
    with rng.micro_batch(3, 2, 2):  # another offset: other masks
        assert not torch.equal(F.dropout(ones, 0.5), online)


# ----- the data layout ----------------------------------------------------------------------------------------------


def digits_streams(world_size, batch_size, **kw):
    images, labels = digits_arrays(8, "train")
    return [DataStream(ArraySource(images, labels), batch_size, class_cond=True, shuffle=True, random_flip=True,
                       seed=3, rank=r, world_size=world_size, **kw) for r in range(world_size)]


def global_batches(streams, count):
    """The next `count` global batches of streams standing for every rank: (images, labels) concatenated."""
    out = []
    for _ in range(count):
        parts = [next(s) for s in streams]
        out.append((torch.cat([x for x, _ in parts]), torch.cat([c["y"] for _, c in parts])))
    return out


def test_the_global_batches_do_not_depend_on_the_number_of_ranks():
    reference = global_batches(digits_streams(1, G), 120)  # past the end of the first epoch (112 batches)
    for world in (2, 4):
        batches = global_batches(digits_streams(world, G // world), 120)
        assert all(torch.equal(a, x) and torch.equal(b, y) for (a, b), (x, y) in zip(reference, batches)), world


def test_a_resume_on_another_number_of_ranks_continues_with_the_same_samples():
    two = digits_streams(2, 4)
    global_batches(two, 5)
    state = two[0].state_dict()
    assert state["sample"] == 5 * G and state == two[1].state_dict()
    expected = global_batches(two, 3)
    four = digits_streams(4, 2)
    for s in four:
        s.load_state_dict(state)
    assert all(torch.equal(a, x) for (a, _), (x, _) in zip(expected, global_batches(four, 3)))
    # another global batch: the stream goes on at the same sample of the epoch's order
    single = digits_streams(1, 4)[0]
    single.load_state_dict(state)
    unflipped = digits_streams(1, G)[0]
    unflipped.random_flip = single.random_flip = False
    unflipped.load_state_dict(state)
    x, _ = next(unflipped)
    assert torch.equal(torch.cat([next(single)[0], next(single)[0]]), x)


# ----- the log dir --------------------------------------------------------------------------------------------------


def resolved(log_dir, world_size, **flags):
    args = create_argparser(MODE).parse_args(resize_argv(log_dir, 4) + sum(([f"--{k}", str(v)] for k, v in
                                                                              flags.items()), []))
    return resolve_training_config(args, world_size)


def test_another_number_of_ranks_with_the_same_global_batch_is_the_same_run(tmp_path):
    resize_main(["4", f"{tmp_path}:1"])
    config = resolved(tmp_path, 2)
    check_log_dir(str(tmp_path), config)
    assert config["run"]["layout_changes"] == [
        "step 1: 1 rank(s) x 8 -> 2 rank(s) x 4, global batch 8 kept (the sample-indexed draws continue the same "
        "trajectory)"]
    with pytest.raises(ValueError, match=r"other settings: run.batch_size: -1 -> 8; run.world_size: 1 -> 2; pass"):
        check_log_dir(str(tmp_path), resolved(tmp_path, 2, batch_size=8))  # global batch 16: another run


# ----- end to end: 2 ranks, then 1 or 4 -----------------------------------------------------------------------------


def launch(ranks, *jobs):
    env = dict(os.environ, OMP_NUM_THREADS="1", CM_DIST_TIMEOUT="60", CUDA_VISIBLE_DEVICES="")
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, os.path.join(HERE, "resize_worker.py"), "4", *jobs]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_run_saved_on_two_ranks_continues_identically_on_one_and_on_four(tmp_path):
    straight, saved = tmp_path / "straight", tmp_path / "saved"
    launch(2, str(straight), f"{saved}:2")  # 4 steps straight; the same run stopped after 2
    for name in ("one", "four"):
        shutil.copytree(saved, tmp_path / name, ignore=shutil.ignore_patterns("run.lock"))
    launch(4, str(tmp_path / "four"))
    resize_main(["4", str(tmp_path / "one")])
    names = ["model000004.pt", "ema_0.5_000004.pt", "target_model000004.pt", "opt000004.pt"]
    expected = {n: torch.load(straight / n, weights_only=True) for n in names}
    for run in ("one", "four"):
        for name in names[:3]:
            got = torch.load(tmp_path / run / name, weights_only=True)
            assert all(torch.allclose(got[k], v, atol=1e-6, rtol=0) for k, v in expected[name].items()), (run, name)
        got = torch.load(tmp_path / run / names[3], weights_only=True)["state"]
        assert all(torch.allclose(got[k]["exp_avg"], v["exp_avg"], atol=1e-6, rtol=0)
                   for k, v in expected[names[3]]["state"].items())
        config = json.loads((tmp_path / run / "config.json").read_text())
        ranks = {"one": 1, "four": 4}[run]
        assert config["run"]["world_size"] == ranks
        assert config["run"]["layout_changes"] == [
            f"step 2: 2 rank(s) x 4 -> {ranks} rank(s) x {G // ranks}, global batch 8 kept (the sample-indexed draws "
            "continue the same trajectory)"]
        assert "this run has" in (tmp_path / run / "log.txt").read_text()


def test_a_run_stored_before_sample_indexed_draws_resumes_only_with_its_per_rank_streams(tmp_path):
    resize_main(["4", f"{tmp_path}:1"])
    state_path = tmp_path / "state000001.pt"
    state = torch.load(state_path, weights_only=False)
    del state["config"]["run"]["sample_indexed_rng"]  # as stored before the flag existed
    torch.save(state, state_path)
    with pytest.raises(ValueError, match=r"other settings: run.sample_indexed_rng: False -> True; pass"):
        check_log_dir(str(tmp_path), resolved(tmp_path, 1))
    check_log_dir(str(tmp_path), resolved(tmp_path, 1, sample_indexed_rng="false"))
