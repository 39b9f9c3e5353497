"""Files from elsewhere: .pt files refused on a torch whose weights_only loading can run code (< 2.6), and the
published weights files (FID Inception, torchvision VGG16 for LPIPS) checked by their SHA256 before loading."""

import hashlib

import numpy as np
import pytest
import torch

from cm import checkpoint_io, dist_util
from cm.errors import CheckpointError
from cm.metrics import VGG16_FILENAME, LPIPSDistance
from cm.safe_load import (ALLOW_UNVERIFIED_WEIGHTS_ENV, check_torch_load_is_safe, torch_version_tuple,
                          verify_known_weights)
from evaluations import evaluator as ev
from evaluations.inception import FID_WEIGHTS_NAME, load_inception


@pytest.fixture
def verified_only(monkeypatch):
    monkeypatch.delenv(ALLOW_UNVERIFIED_WEIGHTS_ENV, raising=False)


def test_torch_versions_are_compared_by_release():
    assert torch_version_tuple("2.5.1+cu124") == (2, 5) and torch_version_tuple("2.6.0") == (2, 6)
    assert torch_version_tuple("2.10.0a0+git1234") == (2, 10) and torch_version_tuple("3.0.0rc1") == (3, 0)
    check_torch_load_is_safe("x.pt", "2.6.0")
    check_torch_load_is_safe("x.pt", "2.14.1+cu130")


def test_pt_files_are_refused_on_torch_before_2_6_and_safetensors_still_load(tmp_path, monkeypatch):
    state = {"w": torch.arange(4.0)}
    torch.save(state, tmp_path / "model.pt")
    checkpoint_io.save_checkpoint(state, str(tmp_path / "model.safetensors"))
    assert torch.equal(dist_util.load_state_dict(str(tmp_path / "model.pt"), map_location="cpu")["w"], state["w"])
    monkeypatch.setattr(torch, "__version__", "2.5.1+cu124")
    with pytest.raises(CheckpointError) as info:
        dist_util.load_state_dict(str(tmp_path / "model.pt"), map_location="cpu")
    message = str(info.value)
    assert "\n" not in message and "model.pt" in message and "CVE-2025-32434" in message
    assert "torch 2.5.1+cu124" in message and ".safetensors" in message
    with pytest.raises(CheckpointError, match="CVE-2025-32434"):
        checkpoint_io.load_checkpoint(str(tmp_path / "model.pt"))  # every reader of .pt files
    loaded = dist_util.load_state_dict(str(tmp_path / "model.safetensors"), map_location="cpu")
    assert torch.equal(loaded["w"], state["w"])


def test_known_weights_are_matched_by_the_sha256_prefix(tmp_path, verified_only, capsys):
    path = tmp_path / "w.pth"
    path.write_bytes(b"some weights")
    prefix = hashlib.sha256(b"some weights").hexdigest()[:8]
    assert verify_known_weights(str(path), {"00000000": "a.pth", prefix: "b.pth"}, "weights") == "b.pth"
    with pytest.raises(ValueError) as info:
        verify_known_weights(str(path), {"00000000": "a.pth"}, "test weights", flag_hint="--ok")
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "a.pth (SHA256 00000000...)" in message
    assert "--ok" in message and ALLOW_UNVERIFIED_WEIGHTS_ENV in message
    assert verify_known_weights(str(path), {"00000000": "a.pth"}, "weights", allow_unverified=True) is None
    assert "warning" in capsys.readouterr().err


def test_inception_weights_of_another_hash_are_refused_unless_accepted(tmp_path, verified_only, monkeypatch, capsys):
    fake = tmp_path / FID_WEIGHTS_NAME  # the published name, other contents
    torch.save({"fc.weight": torch.zeros(2, 2)}, fake)
    with pytest.raises(ValueError, match="6726825d") as info:
        load_inception(str(fake))
    assert str(fake) in str(info.value) and "\n" not in str(info.value)
    ref = tmp_path / "ref.npz"
    np.savez(ref, np.zeros((2, 8, 8, 3), np.uint8))
    assert ev.main([str(ref), str(ref), "--inception_weights", str(fake), "--quiet", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "6726825d" in err and str(fake) in err
    # accepted knowingly, the file is read (and here found not to be the Inception network)
    with pytest.raises(ValueError, match="does not hold the FID Inception weights"):
        load_inception(str(fake), allow_unverified=True)
    monkeypatch.setenv(ALLOW_UNVERIFIED_WEIGHTS_ENV, "1")
    with pytest.raises(ValueError, match="does not hold the FID Inception weights"):
        load_inception(str(fake))


def test_lpips_vgg16_of_another_hash_is_refused_unless_accepted(tmp_path, verified_only, monkeypatch):
    fake = tmp_path / VGG16_FILENAME
    torch.save({"weight": torch.zeros(1)}, fake)
    with pytest.raises(ValueError, match="397923af") as info:
        LPIPSDistance(vgg_path=str(fake))
    assert str(fake) in str(info.value) and ALLOW_UNVERIFIED_WEIGHTS_ENV in str(info.value)
    monkeypatch.setenv(ALLOW_UNVERIFIED_WEIGHTS_ENV, "1")
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        LPIPSDistance(vgg_path=str(fake))
