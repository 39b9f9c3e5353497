"""The latent track on a small stand-in: digits encoded once by a tiny autoencoder (scripts/prepare_data.py --kind
latents), a tiny DiT trained on the stored latents with EDM and consistency training (no encoding while training),
sampled with image_sample.py through the decoder and scored with the digits metrics."""

import json

import numpy as np
import pytest
import torch

from cm.digits_data import digits_arrays
from cm.digits_eval import digits_metrics
from cm.dit import DiT
from cm.image_datasets import DataError, load_data
from cm.image_util import from_uint8
from cm.latent import LatentStream, load_autoencoder
from cm.train_cli import main

from helpers import load_script, tiny_argv

DIT_FLAGS = dict(model_type="dit", dit_size="2x32x2/2", image_size=8, in_channels=4, random_flip="false",
                 class_cond="true", num_classes=10)  # fmt: skip


@pytest.fixture(scope="module")
def autoencoder_path(tmp_path_factory):
    """Our autoencoder trained briefly on 16-px digits: 4 x 8 x 8 latents."""
    path = str(tmp_path_factory.mktemp("ae") / "ae")
    load_script("train_autoencoder").main(["--output", path, "--image_size", "16", "--channels", "16", "--steps", "100",
                                           "--batch_size", "32", "--lr", "3e-3"])
    return path


def prepare(autoencoder_path, output_dir, *extra):
    argv = ["--kind", "latents", "--source", "digits_train", "--image_size", "16", "--autoencoder_path",
            autoencoder_path, "--output_dir", str(output_dir), "--batch_size", "50", *extra]
    return load_script("prepare_data").main(argv)


@pytest.fixture(scope="module")
def latents_file(tmp_path_factory, autoencoder_path):
    counts = prepare(autoencoder_path, tmp_path_factory.mktemp("latents"), "--flip_copies", "true", "--max_images", "120")
    assert counts["written"] == 120 and counts["rows"] == 240
    return counts["file"]


def test_latents_are_the_encoded_images_and_their_mirrors(latents_file, autoencoder_path):
    autoencoder = load_autoencoder(autoencoder_path)
    images, labels = digits_arrays(16, "train")
    with np.load(latents_file) as data:
        latents, stored_labels = data["arr_0"], data["arr_1"]
        assert latents.shape == (240, 8, 8, 4) and latents.dtype == np.float32
        assert float(data["latent_scale"]) == pytest.approx(autoencoder.scaling_factor)
        np.testing.assert_allclose(data["latent_mean"], latents.reshape(-1, 4).mean(0), atol=1e-5)
        np.testing.assert_allclose(data["latent_std"], latents.reshape(-1, 4).std(0), atol=1e-5)
    assert np.array_equal(stored_labels, np.repeat(labels[:120], 2))
    x = from_uint8(images[:3])
    with torch.no_grad():
        plain, mirrored = autoencoder.encode(x), autoencoder.encode(x.flip(-1))
    torch.testing.assert_close(torch.from_numpy(latents[0:6:2]).permute(0, 3, 1, 2), plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(latents[1:6:2]).permute(0, 3, 1, 2), mirrored, atol=1e-5, rtol=1e-5)
    # load_data reads them as they are (any channels, any range), memory-mapped, labels included
    batch, cond = next(load_data(data_dir=latents_file, batch_size=4, image_size=8, class_cond=True,
                                 deterministic=True, random_flip=False))
    assert torch.equal(batch, torch.from_numpy(latents[:4]).permute(0, 3, 1, 2))
    assert torch.equal(cond["y"], torch.from_numpy(stored_labels[:4]))
    with pytest.raises(DataError, match="8x8 latents but --image_size is 16"):
        load_data(data_dir=latents_file, batch_size=4, image_size=16)


def test_a_stopped_preparation_carries_on_to_the_same_file(tmp_path, autoencoder_path, monkeypatch):
    straight = prepare(autoencoder_path, tmp_path / "straight", "--max_images", "120")
    script = load_script("prepare_data")
    encode, calls = script.encode_rows, []

    def stop_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the shape probe, one batch, then the stop
            raise KeyboardInterrupt
        return encode(*args, **kwargs)

    monkeypatch.setattr(script, "encode_rows", stop_on_the_second_batch)
    argv = ["--kind", "latents", "--source", "digits_train", "--image_size", "16", "--autoencoder_path",
            autoencoder_path, "--output_dir", str(tmp_path / "stopped"), "--batch_size", "50", "--max_images", "120"]
    with pytest.raises(KeyboardInterrupt):
        script.run(script.create_argparser().parse_args(argv))
    progress = json.loads((tmp_path / "stopped" / "progress.json").read_text())
    assert progress["images"] == 50 and progress["rows"] == 50
    monkeypatch.setattr(script, "encode_rows", encode)
    resumed = script.run(script.create_argparser().parse_args(argv))
    assert resumed["existing"] == 50 and resumed["written"] == 70
    with np.load(straight["file"]) as a, np.load(resumed["file"]) as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    again = script.run(script.create_argparser().parse_args(argv))  # done: nothing to write
    assert again["written"] == 0 and again["existing"] == 120


def test_latents_given_to_the_on_the_fly_encoder_are_one_line(latents_file, autoencoder_path):
    stream = LatentStream(load_data(data_dir=latents_file, batch_size=4, image_size=8), load_autoencoder(autoencoder_path),
                          "cpu")
    with pytest.raises(ValueError, match="4 channels, not RGB images: latents prepared by .* without --autoencoder_path"):
        next(stream)


def test_missing_autoencoder_is_one_line(tmp_path):
    script = load_script("prepare_data")
    args = script.create_argparser().parse_args(["--kind", "latents", "--source", "digits", "--image_size", "16",
                                                 "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="needs --autoencoder_path: a local diffusers AutoencoderKL folder"):
        script.run(args)


@pytest.mark.parametrize("mode, sampler", [("edm", "euler"), ("consistency_training", "onestep")])
def test_a_tiny_latent_dit_trains_samples_and_is_scored(tmp_path, latents_file, autoencoder_path, mode, sampler):
    loop = main(mode, tiny_argv(log_dir=tmp_path / "train", data_dir=latents_file, total_training_steps=2,
                                loss_norm="l2", **DIT_FLAGS))
    assert isinstance(loop.model, DiT) and not isinstance(loop.data, LatentStream)  # no encoding while training
    config = json.loads((tmp_path / "train" / "config.json").read_text())
    assert (config["network"]["in_channels"], config["network"]["image_size"], config["latent"]["autoencoder_path"]) \
        == (4, 8, "")
    flags = [f"--{k}={v}" for k, v in DIT_FLAGS.items() if k not in ("image_size", "in_channels", "random_flip")]
    path = load_script("image_sample").main(flags + [
        "--model_path", str(tmp_path / "train" / "model000002.pt"), "--autoencoder_path", autoencoder_path,
        "--image_size", "16", "--training_mode", mode, "--sampler", sampler, "--steps", "3", "--num_samples", "20",
        "--batch_size", "10", "--log_dir", str(tmp_path / "samples"),
    ])
    with np.load(path) as data:
        images = data["arr_0"]
        assert path.endswith("samples_20x16x16x3.npz") and images.shape == (20, 16, 16, 3) and len(data["arr_1"]) == 20
    metrics = digits_metrics(images)
    assert np.isfinite(metrics["digits_fid"]) and metrics["digits_fid"] > 0 and sum(metrics["class_histogram"]) == 20


def test_channel_normalisation_trains_on_standardised_latents_and_sampling_undoes_it(tmp_path, latents_file,
                                                                                     autoencoder_path):
    """--latent_norm channel: batches are (z - mean) / std * 0.5 with the prepared file's statistics, the run records
    them, and image_sample.py undoes them before decoding."""
    from cm.latent import DenormalizingDecoder, normalize_channels

    loop = main("edm", tiny_argv(log_dir=tmp_path / "train", data_dir=latents_file, total_training_steps=1,
                                 latent_norm="channel", **DIT_FLAGS))
    with np.load(latents_file) as data:
        mean, std, stored = data["latent_mean"], data["latent_std"], torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2)
    config = json.loads((tmp_path / "train" / "config.json").read_text())["latent"]
    np.testing.assert_allclose([float(v) for v in config["latent_mean"].split(",")], mean, rtol=1e-6)
    np.testing.assert_allclose([float(v) for v in config["latent_std"].split(",")], std, rtol=1e-6)
    mean_t, std_t = (torch.from_numpy(v).float().view(1, -1, 1, 1) for v in (mean, std))
    whole = normalize_channels(stored, mean_t, std_t)
    torch.testing.assert_close(whole.mean((0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(whole.std((0, 2, 3), correction=0), torch.full((4,), 0.5), atol=1e-5, rtol=0)
    position = loop.data.state_dict()
    batch, _ = next(loop.data)
    loop.data.data.load_state_dict(position)
    raw, _ = next(loop.data.data)
    torch.testing.assert_close(batch, (raw - mean_t) / std_t * 0.5)
    autoencoder = load_autoencoder(autoencoder_path)
    with torch.no_grad():
        z = stored[:3]
        torch.testing.assert_close(DenormalizingDecoder(autoencoder, mean_t, std_t).decode(
            normalize_channels(z, mean_t, std_t)), autoencoder.decode(z), atol=1e-5, rtol=1e-5)

    def sample(name, *extra):
        flags = [f"--{k}={v}" for k, v in DIT_FLAGS.items() if k not in ("image_size", "in_channels", "random_flip")]
        path = load_script("image_sample").main(flags + [
            "--model_path", str(tmp_path / "train" / "model000001.pt"), "--autoencoder_path", autoencoder_path,
            "--image_size", "16", "--training_mode", "edm", "--sampler", "euler", "--steps", "3", "--num_samples", "4",
            "--log_dir", str(tmp_path / name), *extra])
        with np.load(path) as data:
            return data["arr_0"]

    recorded = sample("recorded")  # the statistics come from the run's config.json
    given = sample("given", "--latent_mean=" + ",".join(map(str, mean.tolist())),
                   "--latent_std=" + ",".join(map(str, std.tolist())))
    assert np.abs(recorded.astype(int) - given.astype(int)).max() <= 1
    assert not np.array_equal(recorded, sample("unnormalised", "--latent_norm", "scale"))


def test_channel_normalisation_without_statistics_is_one_line(tmp_path, capsys):
    for flags, expected in ((dict(), "--latent_norm channel needs per-channel statistics"),
                            (dict(latent_mean="0,0", latent_std="1"), "one value per channel")):
        with pytest.raises(SystemExit) as info:
            main("edm", tiny_argv(log_dir=tmp_path, total_training_steps=1, latent_norm="channel", **flags))
        err = capsys.readouterr().err.strip()
        assert info.value.code == 1 and err.count("\n") == 0 and expected in err, err
