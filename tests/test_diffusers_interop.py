"""ADM <-> diffusers: the key mapping, one-step images through diffusers' own pipeline, bit-equal round trips."""

import importlib.util
import os

import numpy as np
import pytest
import torch
import yaml

from cm import diffusers_interop as di
from cm.checkpoint_io import load_checkpoint, save_checkpoint
from cm.sampling import karras_sample
from cm.script_util import load_model_checkpoint

from helpers import TINY_MODEL, state_equal, tiny_model_and_diffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None
needs_diffusers = pytest.mark.skipif(
    not HAS_DIFFUSERS, reason='diffusers is not installed (pip install -e ".[diffusers]")'
)

CONFIGS = {
    "plain": dict(),
    "class_cond_updown": dict(class_cond=True, num_classes=10, resblock_updown=True),
    "guided_layout_no_film": dict(attention_type="guided", use_scale_shift_norm=False),
    "num_heads_two_levels": dict(num_head_channels=-1, num_heads=2, attention_resolutions="8,4", channel_mult="1,1"),
}


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def random_consistency_model(**overrides):
    """A tiny ADM consistency model with every weight random (no zero-initialised output layers)."""
    torch.manual_seed(0)
    model, diffusion = tiny_model_and_diffusion(distillation=True, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval(), diffusion


@pytest.mark.parametrize("name", list(CONFIGS))
def test_key_map_round_trip_is_bit_equal_without_diffusers(name):
    model, _ = random_consistency_model(**CONFIGS[name])
    state = model.state_dict()
    hf = di.adm_to_diffusers_state_dict(state, model)
    assert len(hf) == len(state) + 2 * sum(".qkv." in k for k in state)  # qkv -> q, k, v
    assert state_equal(state, di.diffusers_to_adm_state_dict(hf, model))


def test_guided_layout_is_permuted_into_the_query_key_value_order():
    model, _ = random_consistency_model(attention_type="guided", num_head_channels=8)
    qkv = model.state_dict()["middle_block.1.qkv.weight"].reshape(64 * 3, 64)
    heads = model.middle_block[1].num_heads
    hf = di.adm_to_diffusers_state_dict(model.state_dict(), model)
    # guided order (heads, three, d): rows of head h's query are h*3d .. h*3d + d
    expected_q = qkv.reshape(heads, 3, 8, 64)[:, 0].reshape(64, 64)
    assert torch.equal(hf["mid_block.attentions.0.to_q.weight"], expected_q)


def test_configurations_diffusers_cannot_express_are_refused_in_one_line():
    model, _ = tiny_model_and_diffusion(num_head_channels=-1, num_heads=2, attention_resolutions="8,4")
    with pytest.raises(ValueError, match="num_head_channels") as err:
        di.diffusers_unet_config(model)  # 32- and 64-wide attention with 2 heads: head widths 16 and 32
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="channel_mult to start with 1"):
        di.diffusers_unet_config(tiny_model_and_diffusion(channel_mult="2,2", image_size=8)[0])
    with pytest.raises(ValueError, match="ADM UNet"):
        di.module_pairs(torch.nn.Linear(2, 2))


@needs_diffusers
@pytest.mark.parametrize("name", list(CONFIGS))
def test_diffusers_pipeline_gives_our_one_step_images(tmp_path, name):
    from diffusers import ConsistencyModelPipeline

    model, diffusion = random_consistency_model(**CONFIGS[name])
    di.export_diffusers(model, str(tmp_path))
    pipe = ConsistencyModelPipeline.from_pretrained(str(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 4, 9]) if model.num_classes else None
    theirs = pipe(batch_size=3, latents=noise, class_labels=labels, output_type="pt").images  # (x + 1) / 2
    ours = karras_sample(
        diffusion, model, noise.shape, steps=40, sampler="onestep", x_T=noise * 80.0,
        model_kwargs={"y": labels} if labels is not None else None,
    )
    assert ours.std() > 0.05  # a real image, not a constant
    assert (theirs * 2 - 1 - ours).abs().max().item() < 1e-4


@needs_diffusers
@pytest.mark.parametrize("name", ["plain", "class_cond_updown"])
def test_export_then_import_is_bit_equal(tmp_path, name):
    model, _ = random_consistency_model(**CONFIGS[name])
    di.export_diffusers(model, str(tmp_path / "pipe"), di.scheduler_config(steps=18, sigma_max=40.0))
    flags, back = di.import_diffusers_folder(str(tmp_path / "pipe"))
    assert state_equal(model.state_dict(), back.state_dict())
    assert (flags["steps"], flags["sigma_max"], flags["training_mode"]) == (18, 40.0, "consistency_distillation")
    assert state_equal(model.state_dict(), di.import_diffusers_folder(str(tmp_path / "pipe" / "unet"))[1].state_dict())


@needs_diffusers
def test_scripts_export_and_import_and_image_sample_agrees(tmp_path):
    export, importer = load_script("export_diffusers"), load_script("import_diffusers")
    image_sample = load_script("image_sample")
    model, _ = random_consistency_model(class_cond=True, num_classes=10)
    save_checkpoint(model.state_dict(), str(tmp_path / "model.safetensors"))
    flags = [f"--{k}={v}" for k, v in TINY_MODEL.items()] + ["--class_cond=true", "--num_classes=10"]
    export.main(flags + ["--model_path", str(tmp_path / "model.safetensors"), "--output_dir", str(tmp_path / "hf")])
    importer.main(["--diffusers_dir", str(tmp_path / "hf"), "--output", str(tmp_path / "back.pt")])
    assert state_equal(model.state_dict(), load_checkpoint(str(tmp_path / "back.pt")))
    with open(tmp_path / "back.yaml") as f:
        config = yaml.safe_load(f)
    assert config["class_cond"] is True and config["num_classes"] == 10 and config["steps"] == 40

    def sample(ckpt, extra_flags, out):
        argv = extra_flags + ["--model_path", ckpt, "--log_dir", str(out), "--sampler", "onestep",
                              "--num_samples", "4", "--batch_size", "4", "--grid", "none", "--channels_last", "false"]
        with np.load(image_sample.main(argv)) as data:
            return data["arr_0"], data["arr_1"]

    original = sample(str(tmp_path / "model.safetensors"), flags + ["--training_mode", "consistency_distillation"],
                      tmp_path / "s1")
    imported = sample(str(tmp_path / "back.pt"), ["--config", str(tmp_path / "back.yaml")], tmp_path / "s2")
    assert all(np.array_equal(a, b) for a, b in zip(original, imported))
    fresh, _ = tiny_model_and_diffusion(class_cond=True, num_classes=10)
    load_model_checkpoint(fresh, str(tmp_path / "back.pt"))


@needs_diffusers
def test_export_script_refuses_non_consistency_models_in_one_line(tmp_path, capsys):
    export = load_script("export_diffusers")
    model, _ = tiny_model_and_diffusion()
    save_checkpoint(model.state_dict(), str(tmp_path / "m.pt"))
    flags = [f"--{k}={v}" for k, v in TINY_MODEL.items()]
    with pytest.raises(SystemExit):
        export.main(flags + ["--model_path", str(tmp_path / "m.pt"), "--output_dir", str(tmp_path / "o"),
                             "--training_mode", "edm"])
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "boundary scalings" in err


def test_exported_files_get_the_mode_of_other_outputs(tmp_path):
    model, _ = random_consistency_model(**CONFIGS[next(iter(CONFIGS))])
    di.export_diffusers(model, str(tmp_path))
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*") if p.is_file()}
    assert "unet/diffusion_pytorch_model.safetensors" in modes
    assert set(modes.values()) == {di.default_file_mode()}, modes
