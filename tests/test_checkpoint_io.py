"""Checkpoints as .pt or .safetensors: bit-equal round trips, the convert script, loading for sampling."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import torch

from cm import dist_util
from cm.checkpoint_io import flat_tensors, is_safetensors, load_checkpoint, save_checkpoint
from cm.script_util import load_model_checkpoint
from helpers import load_script, state_equal, tiny_model_and_diffusion

ROOT = Path(__file__).resolve().parents[1]


def mixed_state():
    """Tensors of the dtypes checkpoints hold, one of them a non-contiguous view."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        "w32": torch.randn(3, 5, generator=g),
        "w16": torch.randn(7, generator=g).half(),
        "wbf16": torch.randn(2, 2, generator=g).bfloat16(),
        "steps": torch.arange(5, dtype=torch.int64),
        "view": base.t(),
        "empty": torch.zeros(0, 3),
    }


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_is_bit_equal(tmp_path, suffix):
    state = mixed_state()
    path = tmp_path / f"model{suffix}"
    save_checkpoint(state, str(path))
    loaded = load_checkpoint(str(path), map_location="cpu")
    assert state_equal(state, loaded)
    assert all(loaded[k].dtype == state[k].dtype for k in state)
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left behind
    assert is_safetensors(path) == (suffix == ".safetensors")


def test_safetensors_file_is_readable_by_the_library_itself(tmp_path):
    model, _ = tiny_model_and_diffusion()
    path = tmp_path / "model.safetensors"
    save_checkpoint(model.state_dict(), str(path), metadata={"note": "tiny"})
    from safetensors.torch import load_file

    assert state_equal(model.state_dict(), load_file(str(path)))
    with safetensors.safe_open(str(path), "pt") as f:
        assert f.metadata() == {"note": "tiny"}


def test_safetensors_refuses_non_tensor_entries_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="save optimizer and training state as .pt") as err:
        save_checkpoint({"step": 3, "w": torch.zeros(2)}, str(tmp_path / "opt.safetensors"))
    assert "\n" not in str(err.value)
    assert not list(tmp_path.iterdir())


def test_shared_storage_is_split_for_safetensors():
    w = torch.randn(4)
    flat = flat_tensors({"a": w, "b": w})
    assert torch.equal(flat["a"], flat["b"]) and flat["a"].data_ptr() != flat["b"].data_ptr()


def test_dist_util_reads_safetensors_by_extension(tmp_path):
    state = mixed_state()
    save_checkpoint(state, str(tmp_path / "m.safetensors"))
    assert state_equal(state, dist_util.load_state_dict(str(tmp_path / "m.safetensors"), map_location="cpu"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dist_util.load_state_dict(str(tmp_path / "missing.safetensors"), map_location="cpu")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a valid .safetensors"):
        dist_util.load_state_dict(str(tmp_path / "bad.safetensors"), map_location="cpu")


def test_sampling_model_loads_a_safetensors_checkpoint(tmp_path):
    trained, _ = tiny_model_and_diffusion()
    for p in trained.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = tmp_path / "ema_0.999_000010.safetensors"
    save_checkpoint(trained.state_dict(), str(path))
    fresh, _ = tiny_model_and_diffusion()
    load_model_checkpoint(fresh, str(path))
    assert state_equal(trained.state_dict(), fresh.state_dict())
    wrong, _ = tiny_model_and_diffusion(num_channels=64)
    with pytest.raises(ValueError, match="does not fit the model flags"):
        load_model_checkpoint(wrong, str(path))


def run_convert(*paths):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(ROOT / "scripts" / "convert_checkpoint.py"), *map(str, paths)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def test_convert_script_both_ways(tmp_path):
    model, _ = tiny_model_and_diffusion()
    state = model.state_dict()
    torch.save(state, tmp_path / "model.pt")
    result = run_convert(tmp_path / "model.pt", tmp_path / "model.safetensors")
    assert result.returncode == 0, result.stderr
    assert state_equal(state, load_checkpoint(str(tmp_path / "model.safetensors")))
    result = run_convert(tmp_path / "model.safetensors", tmp_path / "back.pt")
    assert result.returncode == 0, result.stderr
    assert state_equal(state, torch.load(tmp_path / "back.pt", weights_only=True))


def convert_in_process(capsys, *paths):
    """(exit status, stderr) of convert_checkpoint.py's main on paths, run in this process."""
    capsys.readouterr()
    try:
        load_script("convert_checkpoint").main([str(p) for p in paths])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_convert_script_errors_are_one_line(tmp_path, capsys):
    code, err = convert_in_process(capsys, tmp_path / "missing.pt", tmp_path / "out.safetensors")
    assert code == 1 and err.strip() == f"error: checkpoint {tmp_path / 'missing.pt'} does not exist"
    torch.save({"step": 3, "w": torch.zeros(2)}, tmp_path / "opt.pt")
    code, err = convert_in_process(capsys, tmp_path / "opt.pt", tmp_path / "opt.safetensors")
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    code, err = convert_in_process(capsys, tmp_path / "bad.pt", tmp_path / "bad.safetensors")
    assert code == 1 and "corrupt" in err and err.count("\n") == 1
    result = run_convert(tmp_path / "missing.pt", tmp_path / "out.safetensors")  # and as a command
    assert result.returncode == 1 and result.stderr.strip() == f"error: checkpoint {tmp_path / 'missing.pt'} does not exist"
