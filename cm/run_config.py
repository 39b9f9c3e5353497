"""A training run's own configuration, read back for the scripts that use its checkpoints.

Every run writes its resolved configuration (cm.config) to `LOG_DIR/config.json` and into each
`stateNNNNNN.pt`. Sampling, editing, search and export read the model part of it back as flag values, so
`--model_path LOG_DIR/ema_RATE_STEP.pt` alone builds the network it was trained as:

* `--config FILE` accepts a run's config.json (grouped) as well as a flat YAML or JSON file of flag values;
* without `--config`, config.json next to the model file is used, else the configuration stored in the
  state file of the model's step (stateNNNNNN.pt);
* flags given on the command line win over both.
"""

import json
import os
import re

import torch

from .training_modes import FLAGS

RUN_CONFIG_NAME = "config.json"
# the sections of a resolved configuration that decide how the network and its denoiser are built
MODEL_SECTIONS = ("network", "denoiser", "latent")
_STEP = re.compile(r"(\d{6})\.(pt|safetensors)$")


def is_run_config(data):
    """True for a resolved, grouped configuration (as in config.json), False for flat flag values."""
    return isinstance(data, dict) and isinstance(data.get("network"), dict) and "training_mode" in data


def model_flag_values(config):
    """{flag: value} that rebuild a run's network and denoiser from its resolved configuration.

    The network section of a latent run holds the latent side and channels; the image side is the data's and the
    channels follow from the autoencoder again.
    Decisions that are not flags (e.g. the boundary condition, latent channels) are left out: they follow
    from the flags again.
    """
    values = {"training_mode": config["training_mode"]}
    for section in MODEL_SECTIONS:
        for name, value in (config.get(section) or {}).items():
            if name in FLAGS:
                values[name] = value
    if (config.get("latent") or {}).get("autoencoder_path"):  # the autoencoder decides the network's input again
        values.pop("in_channels", None)
    image_size = (config.get("data") or {}).get("image_size")
    if image_size is not None:
        values["image_size"] = image_size
    return values


def read_run_config_file(path):
    """The resolved configuration in a config.json, or None when the file is not one (e.g. a diffusers UNet's)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if is_run_config(data) else None


def state_file_for(model_path):
    """LOG_DIR/stateNNNNNN.pt of the step in a checkpoint's name (modelNNNNNN.pt, ema_RATE_NNNNNN.pt), or None."""
    found = _STEP.search(os.path.basename(model_path))
    if not found:
        return None
    return os.path.join(os.path.dirname(model_path), f"state{found.group(1)}.pt")


def find_run_config(model_path):
    """(configuration, where it was read) of the run that wrote model_path, or (None, None).

    Looks for config.json in the model file's folder, then for the state file of its step.
    """
    if not model_path or not os.path.isfile(model_path):
        return None, None
    beside = os.path.join(os.path.dirname(model_path), RUN_CONFIG_NAME)
    config = read_run_config_file(beside) if os.path.isfile(beside) else None
    if config is not None:
        return config, beside
    state_path = state_file_for(model_path)
    if state_path and os.path.isfile(state_path):
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - an unreadable state file only means there is no stored configuration
            return None, None
        config = state.get("config") if isinstance(state, dict) else None
        if is_run_config(config):
            return config, state_path
    return None, None


def first_conv_in_channels(state_dict):
    """Input channels of the first convolution in a state dict (the channels the network was trained on)."""
    for value in state_dict.values():
        if isinstance(value, torch.Tensor) and value.dim() == 4:
            return value.shape[1]
    return None


def mismatch_hint(state_dict, flags, image_channels=3):
    """The likely cause of a checkpoint that does not fit the model flags, as advice in a few words."""
    channels = first_conv_in_channels(state_dict)
    if channels is not None and channels != image_channels and not flags.get("autoencoder_path"):
        return (f"its first layer takes {channels} channels, not {image_channels}: this is a latent model, pass "
                "--autoencoder_path (the run's autoencoder)")
    return ("pass the run's configuration: --config LOG_DIR/config.json, or keep config.json next to the model "
            "file")


def missing_checkpoint_note(path):
    """What exists where a checkpoint was expected: the checkpoint files of its folder, or that the folder is missing."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return f"the folder {folder} does not exist"
    found = sorted(n for n in os.listdir(folder) if n.endswith((".pt", ".safetensors")) and not n.startswith(("opt", "state")))
    return f"{folder} holds {', '.join(found)}" if found else f"{folder} holds no checkpoint"
