"""Latent space: the small autoencoder (trained here on digits), any mode trained on its latents with an exact
resume, sampling that decodes them, and diffusers' AutoencoderKL behind the same interface."""

import json
import os
import sys

import numpy as np
import pytest
import torch

from cm.digits_data import digits_arrays
from cm.image_util import from_uint8
from cm.latent import DIFFUSERS_HINT, LatentStream, load_autoencoder, latent_network
from cm.image_datasets import load_data
from cm.train_cli import main

from helpers import TINY_MODEL, load_script, resumes_bit_exactly, tiny_argv


@pytest.fixture(scope="module")
def autoencoder_path(tmp_path_factory):
    """Our autoencoder trained briefly on the 8-px digits: 4 x 4 x 4 latents."""
    path = str(tmp_path_factory.mktemp("ae") / "ae")
    load_script("train_autoencoder").main(["--output", path, "--image_size", "8", "--channels", "16", "--steps", "150",
                                           "--batch_size", "32", "--lr", "3e-3"])
    return path


def test_the_latent_path_round_trips_through_the_autoencoder(autoencoder_path):
    autoencoder = load_autoencoder(autoencoder_path)
    x = from_uint8(digits_arrays(8)[0][:256])
    with torch.no_grad():
        z = autoencoder.encode(x)
        again = load_autoencoder(autoencoder_path).encode(x)
        reconstruction = autoencoder.decode(z)
    assert z.shape == (256, 4, 4, 4) and torch.equal(z, again)  # the saved folder gives the same latents
    assert 0.3 < z.std().item() < 0.7  # scaled to about sigma_data = 0.5
    error = (reconstruction - x).pow(2).mean().item()
    assert error < 0.35 * x.var().item(), error
    # the training stream's latents are the encoded images, batch for batch, and it resumes like the image stream
    images = load_data(data_dir="digits", batch_size=4, image_size=8, seed=0)
    latents = LatentStream(load_data(data_dir="digits", batch_size=4, image_size=8, seed=0), autoencoder, "cpu")
    first, _ = next(latents)
    with torch.no_grad():
        assert torch.equal(first, autoencoder.encode(next(images)[0]))
    state = latents.state_dict()
    second, _ = next(latents)
    latents.load_state_dict(state)
    assert torch.equal(next(latents)[0], second)


@pytest.mark.parametrize("mode", ["edm", "consistency_training"])
def test_a_mode_trains_on_latents_and_resumes_bit_exactly(tmp_path, autoencoder_path, mode):
    flags = dict(autoencoder_path=autoencoder_path, loss_norm="l2")
    same, names = resumes_bit_exactly(mode, tmp_path, **flags)
    assert same and "model000002.pt" in names
    config = json.loads((tmp_path / "straight" / "config.json").read_text())
    assert (config["network"]["in_channels"], config["network"]["image_size"], config["data"]["image_size"]) == (4, 4, 8)


def test_latent_samples_are_decoded_to_images(tmp_path, autoencoder_path):
    main("edm", tiny_argv(log_dir=tmp_path / "edm", total_training_steps=1, autoencoder_path=autoencoder_path))
    flags = [f"--{k}={v}" for k, v in TINY_MODEL.items()]
    path = load_script("image_sample").main(flags + [
        "--model_path", str(tmp_path / "edm" / "model000001.pt"), "--autoencoder_path", autoencoder_path,
        "--training_mode", "edm", "--sampler", "euler", "--steps", "3", "--num_samples", "3", "--batch_size", "3",
        "--log_dir", str(tmp_path / "samples"),
    ])
    with np.load(path) as data:
        assert path.endswith("samples_3x8x8x3.npz") and data["arr_0"].shape == (3, 8, 8, 3)


def test_an_autoencoder_kl_folder_gives_the_same_interface(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=8, scaling_factor=0.5,
    )
    vae.save_pretrained(tmp_path / "vae")
    assert latent_network(str(tmp_path / "vae"), 8) == {"image_size": 4, "in_channels": 4}
    autoencoder = load_autoencoder(str(tmp_path / "vae"))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        z = autoencoder.encode(x)
        assert torch.allclose(z, vae.encode(x).latent_dist.mode() * 0.5, atol=1e-6)
        assert autoencoder.decode(z).shape == (2, 3, 8, 8)


def test_a_missing_extra_or_folder_is_one_line(tmp_path, monkeypatch):
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "latent_channels": 4,
                                                    "block_out_channels": [8, 16]}))
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=DIFFUSERS_HINT.replace("[", r"\[").replace(".", r"\.")):
        load_autoencoder(str(folder))
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        latent_network(str(tmp_path / "nowhere"), 8)
    with pytest.raises(ValueError, match="not divisible"):
        latent_network(str(folder), 9)


def test_model_path_alone_samples_a_latent_run(tmp_path, autoencoder_path, capsys):
    """The run's configuration brings its autoencoder; without it, the mismatch says this is a latent model."""
    main("edm", tiny_argv(log_dir=tmp_path / "edm", total_training_steps=1, autoencoder_path=autoencoder_path))
    model = tmp_path / "edm" / "model000001.pt"
    common = ["--sampler", "euler", "--steps", "3", "--num_samples", "3", "--batch_size", "3"]
    alone = load_script("image_sample").main(common + ["--model_path", str(model), "--log_dir", str(tmp_path / "a")])
    flags = [f"--{k}={v}" for k, v in TINY_MODEL.items()]
    given = load_script("image_sample").main(flags + common + [
        "--model_path", str(model), "--autoencoder_path", autoencoder_path, "--training_mode", "edm",
        "--log_dir", str(tmp_path / "b")])
    with np.load(alone) as a, np.load(given) as b:
        assert alone.endswith("samples_3x8x8x3.npz") and np.array_equal(a["arr_0"], b["arr_0"])
    os.remove(tmp_path / "edm" / "config.json")
    os.remove(tmp_path / "edm" / "state000001.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        load_script("image_sample").main(flags + common + ["--model_path", str(model), "--training_mode", "edm",
                                                           "--log_dir", str(tmp_path / "c")])
    assert "this is a latent model, pass --autoencoder_path" in capsys.readouterr().err
