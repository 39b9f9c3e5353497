"""Faults during training: disk full at a checkpoint, NaN / inf steps, damaged checkpoints, unexpected errors."""

import errno
import io
import os
import re
import time

import pytest
import torch

from cm import checkpoint_io, errors, logger, train_util
from cm.dist_util import load_state_dict
from cm.errors import CheckpointError
from cm.script_util import parse_args_with_config, run_or_exit
from cm.train_cli import build_loop, create_argparser, main
from cm.train_util import find_resume_checkpoint

from helpers import read_progress, tiny_argv

STEP_FILES = ("model", "ema_0.9999_", "opt", "state", "target_model")


def ct_argv(log_dir, **flags):
    return tiny_argv(log_dir=log_dir, loss_norm="l2", **{"total_training_steps": 4, "save_interval": 2, **flags})


def error_lines(err):
    """stderr without the progress bar's lines."""
    return [line for line in re.split(r"[\r\n]", err) if line.strip() and not line.startswith("train:")]


def loadable(log_dir, step):
    return all(
        torch.load(os.path.join(log_dir, f"{name}{step:06d}.pt"), weights_only=True) is not None for name in STEP_FILES
    )


# ----- disk full -------------------------------------------------------------------------------


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_stops_with_one_line(tmp_path, monkeypatch, capsys):
    real_save = torch.save

    def fills_the_disk(obj, f, *args, **kwargs):
        """Writes half of opt000004.pt, then fails as a full disk does."""
        if "opt000004.pt" not in getattr(f, "name", ""):
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", fills_the_disk)
    with pytest.raises(SystemExit) as info:
        main("consistency_training", ct_argv(tmp_path))
    monkeypatch.setattr(checkpoint_io.torch, "save", real_save)
    assert info.value.code == 1
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: could not write the checkpoint of step 4 (opt000004.pt: No space left on device)")
    assert "the last checkpoint (step 2) is intact" in lines[0]
    names = os.listdir(tmp_path)
    assert not [n for n in names if ".tmp" in n] and not [n for n in names if "000004" in n], names
    assert find_resume_checkpoint(str(tmp_path), [0.9999], ("target_model",)).endswith("model000002.pt")
    assert loadable(tmp_path, 2)
    loop = main("consistency_training", ct_argv(tmp_path))  # space is back: the same command resumes and ends
    assert loop.step == 4 and loadable(tmp_path, 4)


def test_temporary_files_of_a_killed_writer_are_removed_at_the_next_checkpoint(tmp_path):
    (tmp_path / "model000002.pt.tmp4242").write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp1").write_text("not ours")
    main("consistency_training", ct_argv(tmp_path, total_training_steps=2))
    assert "model000002.pt.tmp4242" not in os.listdir(tmp_path) and "notes.tmp1" in os.listdir(tmp_path)


# ----- NaN loss and inf gradient -----------------------------------------------------------------


def snapshot(loop):
    return {
        "model": [p.detach().clone() for p in loop.model.parameters()],
        "ema": [p.clone() for params in loop.ema_params for p in params],
        "target": [p.detach().clone() for p in loop.target_model.parameters()],
        "opt": [v.clone() for state in loop.opt.state.values() for v in state.values() if torch.is_tensor(v)],
    }


def same(a, b):
    return all(len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a)


@pytest.mark.parametrize("optimizer", ["adam", "radam"])
def test_a_nan_loss_or_inf_gradient_is_skipped_and_logged_leaving_everything_untouched(tmp_path, optimizer):
    args = parse_args_with_config(create_argparser("consistency_training"),
                                  ct_argv(tmp_path, total_training_steps=6, save_interval=-1, optimizer=optimizer,
                                          ema_rate="0.9"))
    loop = build_loop(args)
    logger.configure(dir=str(tmp_path), format_strs=["log", "csv"])
    loop._interval_start = (time.time(), loop.step)  # what run_loop sets before dump_logs
    for _ in range(2):
        loop.run_step(*next(loop.data))
    logger.dumpkvs()
    forward = loop.model.forward

    def nan_loss():
        loop.model.forward = lambda *a, **k: forward(*a, **k) * float("nan")
        return lambda: vars(loop.model).pop("forward")

    def inf_gradient():
        return next(loop.model.parameters()).register_hook(lambda g: g * float("inf")).remove

    for inject in (nan_loss, inf_gradient):
        before = snapshot(loop)
        undo = inject()
        loop.run_step(*next(loop.data))
        loop.dump_logs()
        undo()
        assert same(before, snapshot(loop)), inject.__name__
    assert [float(r["skipped"]) for r in read_progress(tmp_path)][-2:] == [1.0, 1.0]
    text = open(tmp_path / "log.txt").read()
    assert text.count("skipped 1 of the last 1 steps for non-finite gradients") == 2
    before = snapshot(loop)
    loop.run_step(*next(loop.data))  # training goes on
    assert not same(before, snapshot(loop))


# ----- damaged checkpoints ---------------------------------------------------------------------


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_hostile_truncated_and_empty_checkpoints_are_one_line_naming_the_file(tmp_path):
    marker = str(tmp_path / "code_ran")
    torch.save({"w": torch.ones(2), "payload": RunsCode(marker)}, tmp_path / "hostile.pt")
    with pytest.raises(CheckpointError, match=r"hostile.pt refers to os.makedirs, which is not tensor data") as info:
        load_state_dict(str(tmp_path / "hostile.pt"), map_location="cpu")
    assert not os.path.exists(marker) and "\n" not in str(info.value)
    torch.save({"w": torch.randn(1000)}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    for name, content, message in [
        ("cut.pt", data[: len(data) // 2], r"cut.pt is truncated"),
        ("empty.pt", b"", r"empty.pt is empty \(0 bytes\)"),
        ("noise.pt", b"\x80\x02}q\x00" + b"x" * 50, r"noise.pt is (truncated or )?corrupt"),
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as info:
            load_state_dict(str(tmp_path / name), map_location="cpu")
        assert "\n" not in str(info.value)


def test_a_truncated_checkpoint_at_resume_names_it_and_says_how_to_go_back(tmp_path, capsys):
    main("consistency_training", ct_argv(tmp_path))
    path = tmp_path / "opt000004.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(SystemExit):
        main("consistency_training", ct_argv(tmp_path, total_training_steps=6, allow_config_change="true"))
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and str(path) in lines[0] and "truncated" in lines[0]
    assert lines[0].endswith(f"to resume from the checkpoint before it, move the files of step 4 out of {tmp_path}")


# ----- input errors and unexpected errors ----------------------------------------------------------


def fails_with(exc):
    def fn():
        raise exc

    return fn


def test_input_errors_are_one_line_and_unexpected_ones_name_a_traceback_file(tmp_path, capsys, monkeypatch):
    logger.configure(dir=str(tmp_path), format_strs=["csv"])
    for exc in (ValueError("bad --flag value"), FileNotFoundError("data file x.npz does not exist"),
                errors.CheckpointWriteError("disk full")):
        with pytest.raises(SystemExit):
            run_or_exit(fails_with(exc))
        assert capsys.readouterr().err == f"error: {exc}\n"
    assert not [n for n in os.listdir(tmp_path) if n.startswith("traceback")]

    with pytest.raises(SystemExit):
        run_or_exit(fails_with(KeyError("weight")))
    err = capsys.readouterr().err
    path = os.path.join(tmp_path, "traceback_rank0.txt")
    assert err == f"error: KeyError: 'weight' (full traceback in {path})\n"
    text = open(path).read()
    assert "Traceback (most recent call last)" in text and "in fn" in text and "raise exc" in text

    monkeypatch.setattr(logger, "_current", None)  # no log dir yet: a temp file
    with pytest.raises(SystemExit):
        run_or_exit(fails_with(RuntimeError("CUDA error: an illegal memory access\nmore detail")))
    err = capsys.readouterr().err
    found = re.fullmatch(r"error: RuntimeError: CUDA error: an illegal memory access \(full traceback in (.+)\)\n", err)
    assert found and os.path.exists(found.group(1)) and "more detail" in open(found.group(1)).read()
    os.remove(found.group(1))


def test_an_unexpected_error_in_training_leaves_its_traceback_in_the_log_dir(tmp_path, monkeypatch, capsys):
    def out_of_memory(self, batch, cond):
        raise RuntimeError("simulated out of memory")

    monkeypatch.setattr(train_util.TrainLoop, "run_step", out_of_memory)
    with pytest.raises(SystemExit):
        main("consistency_training", ct_argv(tmp_path))
    lines = error_lines(capsys.readouterr().err)
    assert lines == [f"error: RuntimeError: simulated out of memory (full traceback in {tmp_path}/traceback_rank0.txt)"]
    assert "out_of_memory" in open(tmp_path / "traceback_rank0.txt").read()
