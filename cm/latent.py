"""Latent space (LCM, Luo et al. 2023; latent diffusion, Rombach et al. 2022): any training mode on the latents of a
frozen autoencoder, and sampling that decodes them.

`--autoencoder_path DIR` names either a diffusers `AutoencoderKL` folder (config.json and weights, loaded through the
optional diffusers extra) or a small autoencoder written by scripts/train_autoencoder.py (no extra needed). The
network is then built for latents (their channels and size, read from DIR/config.json when the configuration is
resolved), training batches are encoded on the fly (`LatentStream`, deterministic: the posterior mean), and samples
are decoded before they are written. Latents are scaled by the autoencoder's scaling factor, to a standard
deviation near the denoiser's sigma_data.
"""

import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint_io import save_checkpoint, write_json_atomic

OWN_CLASS = "CMAutoencoder"
WEIGHTS = "model.safetensors"
DIFFUSERS_HINT = 'pip install -e ".[diffusers]"'


# ----- which autoencoder, and the latents' shape -------------------------------------------------------------------


def autoencoder_config(path):
    """The config.json of an autoencoder folder, or a one-line error saying what the folder must hold."""
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(
            f"--autoencoder_path {path} holds no config.json: give a diffusers AutoencoderKL folder or one written by "
            "scripts/train_autoencoder.py"
        )
    with open(file) as f:
        return json.load(f)


def latent_geometry(config):
    """(latent channels, downsampling factor) of an autoencoder from its config (ours or AutoencoderKL's)."""
    if config.get("_class_name") == OWN_CLASS:
        return config["latent_channels"], 2 ** config["levels"]
    if "latent_channels" not in config or "block_out_channels" not in config:
        raise ValueError("the autoencoder's config.json has no latent_channels / block_out_channels (not an AutoencoderKL)")
    return config["latent_channels"], 2 ** (len(config["block_out_channels"]) - 1)


def latent_network(path, image_size):
    """The network flags a latent model decides: {"image_size": latent side, "in_channels": latent channels}."""
    channels, factor = latent_geometry(autoencoder_config(path))
    if image_size % factor:
        raise ValueError(f"image_size {image_size} is not divisible by the autoencoder's downsampling factor {factor}")
    return {"image_size": image_size // factor, "in_channels": channels}


# ----- our small autoencoder ---------------------------------------------------------------------------------------


def _conv(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class Autoencoder(nn.Module):
    """A small convolutional autoencoder: `levels` stride-2 stages from images to latents of `latent_channels` at
    1 / 2^levels of the side, and back. `encode` returns latents times `scaling_factor`; `decode` undoes it.

    :param in_channels: image channels.
    :param latent_channels: latent channels.
    :param channels: width of the convolutions.
    :param levels: number of 2x downsamplings.
    :param scaling_factor: latents are multiplied by it (set after training so that their std is sigma_data).
    """

    def __init__(self, in_channels=3, latent_channels=4, channels=32, levels=1, scaling_factor=1.0):
        super().__init__()
        self.config = dict(_class_name=OWN_CLASS, in_channels=in_channels, latent_channels=latent_channels,
                           channels=channels, levels=levels, scaling_factor=scaling_factor)
        down = [_conv(in_channels, channels), nn.SiLU()]
        up = [_conv(latent_channels, channels), nn.SiLU()]
        for _ in range(levels):
            down += [_conv(channels, channels, stride=2), nn.SiLU(), _conv(channels, channels), nn.SiLU()]
            up += [nn.Upsample(scale_factor=2, mode="nearest"), _conv(channels, channels), nn.SiLU(),
                   _conv(channels, channels), nn.SiLU()]
        self.encoder = nn.Sequential(*down, _conv(channels, latent_channels))
        self.decoder = nn.Sequential(*up, _conv(channels, in_channels))

    @property
    def scaling_factor(self):
        return self.config["scaling_factor"]

    def encode(self, x):
        """Images in [-1, 1] -> scaled latents."""
        return self.encoder(x) * self.scaling_factor

    def decode(self, z):
        """Scaled latents -> images (about [-1, 1])."""
        return self.decoder(z / self.scaling_factor)

    def forward(self, x):
        return self.decode(self.encode(x))

    def save(self, path):
        """Write config.json and model.safetensors into the folder `path`."""
        os.makedirs(path, exist_ok=True)
        save_checkpoint(self.state_dict(), os.path.join(path, WEIGHTS))
        write_json_atomic(self.config, os.path.join(path, "config.json"))
        return path


def autoencoder_loss(autoencoder, x, latent_weight=1e-4):
    """Training loss of our autoencoder: mean squared reconstruction error plus a small penalty on the latents'
    magnitude (which keeps their scale finite, as the KL term of a VAE does)."""
    z = autoencoder.encoder(x)
    return F.mse_loss(autoencoder.decoder(z), x) + latent_weight * z.pow(2).mean()


# ----- diffusers' AutoencoderKL -------------------------------------------------------------------------------------


class DiffusersAutoencoder(nn.Module):
    """An AutoencoderKL behind the same encode / decode: latents = (posterior mean - shift) * scaling_factor."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def encode(self, x):
        return (self.vae.encode(x).latent_dist.mode() - self.shift_factor) * self.scaling_factor

    def decode(self, z):
        return self.vae.decode(z / self.scaling_factor + self.shift_factor).sample


def load_autoencoder(path, device="cpu"):
    """The frozen autoencoder of `path` (ours or a diffusers AutoencoderKL) on `device`, in eval mode."""
    config = autoencoder_config(path)
    if config.get("_class_name") == OWN_CLASS:
        from safetensors.torch import load_file

        model = Autoencoder(**{k: v for k, v in config.items() if k != "_class_name"})
        model.load_state_dict(load_file(os.path.join(path, WEIGHTS)))
    else:
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ImportError(f"--autoencoder_path {path} is a diffusers AutoencoderKL; install the extra: "
                              f"{DIFFUSERS_HINT}") from None
        model = DiffusersAutoencoder(AutoencoderKL.from_pretrained(path))
    return model.to(device).eval().requires_grad_(False)


# ----- training data as latents ------------------------------------------------------------------------------------


class StreamView:
    """A training data stream that changes each batch of `data`; its position (state_dict / load_state_dict),
    log_summary and everything else are the underlying stream's."""

    def __init__(self, data):
        self.data = data

    def __getattr__(self, name):  # only reached for names the view does not have itself
        if name == "data":
            raise AttributeError(name)
        return getattr(self.data, name)

    def __iter__(self):
        return self


class LatentStream(StreamView):
    """A training data stream whose images are encoded to latents on the device (no gradients)."""

    def __init__(self, data, autoencoder, device):
        super().__init__(data)
        self.autoencoder = autoencoder
        self.device = device

    def __next__(self):
        images, cond = next(self.data)
        if images.shape[1] != 3:
            raise ValueError(f"the training data have {images.shape[1]} channels, not RGB images: latents prepared by "
                             "scripts/prepare_data.py --kind latents are trained on without --autoencoder_path (pass "
                             "--in_channels and the latent --image_size instead)")
        with torch.no_grad():
            latents = self.autoencoder.encode(images.to(self.device)).float()
        return latents, cond


# ----- per-channel normalisation (--latent_norm channel) -----------------------------------------------------------

LATENT_CHANNEL_STD = 0.5  # the std of every latent channel under --latent_norm channel (EDM's sigma_data, as in EDM2)


def channel_list(text, name):
    """Comma list of floats of the flag `name` (empty: None)."""
    if not str(text).strip():
        return None
    try:
        return [float(v) for v in str(text).split(",")]
    except ValueError:
        raise ValueError(f"--{name} must be a comma list of numbers, got {text!r}") from None


def stored_channel_statistics(data_dir):
    """(latent_mean, latent_std) lists stored by scripts/prepare_data.py --kind latents in data_dir, or None."""
    if not str(data_dir).endswith(".npz") or not os.path.exists(data_dir):
        return None
    with np.load(data_dir) as data:
        if "latent_mean" not in data.files or "latent_std" not in data.files:
            return None
        return data["latent_mean"].astype(np.float64).tolist(), data["latent_std"].astype(np.float64).tolist()


def resolve_latent_norm(latent, data_dir=None):
    """The latent group with --latent_norm channel's statistics filled in: the flags, else the prepared .npz's;
    one line when there are none, or when their lengths or values cannot be a per-channel normalisation."""
    if latent.get("latent_norm", "scale") != "channel":
        return latent
    mean, std = channel_list(latent.get("latent_mean", ""), "latent_mean"), channel_list(latent.get("latent_std", ""),
                                                                                         "latent_std")
    if mean is None or std is None:
        stored = stored_channel_statistics(data_dir) if data_dir else None
        if stored is None:
            raise ValueError("--latent_norm channel needs per-channel statistics: pass --latent_mean and --latent_std, "
                             "or train on latents prepared by scripts/prepare_data.py --kind latents (they store "
                             "them), or sample a checkpoint whose run's config.json records them")
        mean, std = mean or stored[0], std or stored[1]
    if len(mean) != len(std) or min(std) <= 0:
        raise ValueError(f"--latent_mean / --latent_std must have one value per channel and positive stds, got "
                         f"{len(mean)} means and stds {std}")
    return {**latent, "latent_mean": ",".join(f"{v:.8g}" for v in mean),
            "latent_std": ",".join(f"{v:.8g}" for v in std)}


def channel_normalizer(latent):
    """(mean, std) tensors [1, C, 1, 1] of a resolved --latent_norm channel group, or None for --latent_norm scale."""
    if latent.get("latent_norm", "scale") != "channel":
        return None
    mean, std = (torch.tensor(channel_list(latent[k], k), dtype=torch.float32).view(1, -1, 1, 1)
                 for k in ("latent_mean", "latent_std"))
    return mean, std


def normalize_channels(z, mean, std):
    """EDM2's latent normalisation: each channel to mean 0 and std LATENT_CHANNEL_STD, (z - mean) / std * 0.5."""
    return (z - mean.to(z)) / std.to(z) * LATENT_CHANNEL_STD


def denormalize_channels(x, mean, std):
    """The inverse of normalize_channels: x / 0.5 * std + mean."""
    return x / LATENT_CHANNEL_STD * std.to(x) + mean.to(x)


class ChannelNormalized(StreamView):
    """A latent training stream (pre-encoded latents, or LatentStream) with every batch normalised per channel."""

    def __init__(self, data, mean, std):
        super().__init__(data)
        self.mean, self.std = mean, std

    def __next__(self):
        latents, cond = next(self.data)
        if latents.shape[1] != self.mean.shape[1]:
            raise ValueError(f"--latent_norm channel has statistics of {self.mean.shape[1]} channels but the latents "
                             f"have {latents.shape[1]}")
        return normalize_channels(latents, self.mean, self.std), cond


class DenormalizingDecoder:
    """An autoencoder whose decode first undoes --latent_norm channel (what sampling decodes)."""

    def __init__(self, autoencoder, mean, std):
        self.autoencoder, self.mean, self.std = autoencoder, mean, std

    def decode(self, x):
        return self.autoencoder.decode(denormalize_channels(x, self.mean, self.std))
