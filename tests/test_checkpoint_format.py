"""--checkpoint_format safetensors: the network files of a run in .safetensors, resumed and sampled like .pt."""

import os

import numpy as np

from cm.checkpoint_io import load_checkpoint
from cm.train_cli import main

from helpers import load_script, state_equal, tiny_argv


def ct(log_dir, steps, fmt):
    return main("consistency_training", tiny_argv(log_dir=log_dir, loss_norm="l2", total_training_steps=steps,
                                                  save_interval=2, checkpoint_format=fmt))


def test_a_safetensors_run_writes_networks_in_safetensors_and_resumes_exactly(tmp_path):
    whole = ct(tmp_path / "whole", 4, "safetensors")
    names = set(os.listdir(tmp_path / "whole"))
    assert {"model000004.safetensors", "ema_0.9999_000004.safetensors", "target_model000004.safetensors",
            "opt000004.pt", "state000004.pt"} <= names
    assert not any(n.startswith("model") and n.endswith(".pt") for n in names)
    ct(tmp_path / "split", 4, "safetensors")
    for name in os.listdir(tmp_path / "split"):  # as if the run had stopped after the checkpoint of step 2
        if "000004" in name:
            os.remove(tmp_path / "split" / name)
    resumed = ct(tmp_path / "split", 4, "safetensors")
    assert resumed.step == 4 and state_equal(resumed.model.state_dict(), whole.model.state_dict())
    saved = load_checkpoint(str(tmp_path / "whole" / "model000004.safetensors"))
    assert state_equal(saved, {k: v for k, v in whole.model.state_dict().items()})


def test_safetensors_and_pt_checkpoints_hold_the_same_weights_and_both_sample(tmp_path):
    pt = ct(tmp_path / "pt", 2, "pt")
    st = ct(tmp_path / "st", 2, "safetensors")
    assert state_equal(pt.model.state_dict(), st.model.state_dict())
    sample = load_script("image_sample")
    flags = [a for a in tiny_argv() if a]
    common = ["--training_mode", "consistency_training", "--sampler", "onestep", "--num_samples", "2",
              "--batch_size", "2", *flags[flags.index("--image_size"):flags.index("--data_dir")]]
    a = sample.main([*common, "--model_path", str(tmp_path / "pt" / "model000002.pt"), "--log_dir", str(tmp_path / "a")])
    b = sample.main([*common, "--model_path", str(tmp_path / "st" / "model000002.safetensors"),
                     "--log_dir", str(tmp_path / "b")])
    assert np.array_equal(np.load(a)["arr_0"], np.load(b)["arr_0"])
