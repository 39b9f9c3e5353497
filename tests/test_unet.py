import hashlib
import io
import json
import os

import numpy as np
import pytest
import torch

from cm.script_util import create_model
from cm.unet import UNetModel, attention_heads, convert_qkv_layout

DATA = os.path.join(os.path.dirname(__file__), "data")


def tiny(**overrides):
    kw = dict(
        image_size=16,
        in_channels=3,
        model_channels=32,
        out_channels=3,
        num_res_blocks=1,
        attention_resolutions=(2, 4),
        channel_mult=(1, 2, 2),
        num_head_channels=16,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )
    kw.update(overrides)
    return UNetModel(**kw)


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize(
    "image_size, attn, classes, updown",
    [(8, "4", None, False), (16, "8,4", 10, True), (32, "16,8", None, True), (64, "32,16,8", 7, False)],
)
def test_output_shape(image_size, attn, classes, updown):
    model = create_model(
        image_size,
        32,
        1,
        attention_resolutions=attn,
        num_head_channels=16,
        class_cond=classes is not None,
        num_classes=classes or 1000,
        resblock_updown=updown,
        use_scale_shift_norm=True,
    )
    x = torch.randn(2, 3, image_size, image_size)
    y = torch.tensor([0, 1]) if classes else None
    assert model(x, torch.tensor([1.0, -300.0]), y=y).shape == x.shape


def test_learn_sigma_doubles_the_output_channels():
    model = create_model(8, 32, 1, attention_resolutions="4", learn_sigma=True)
    assert model(torch.randn(1, 3, 8, 8), torch.zeros(1)).shape == (1, 6, 8, 8)


def test_save_load_round_trip_is_bit_equal():
    a = randomize(tiny(num_classes=5))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = tiny(num_classes=5)
    b.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3.0, -100.0]), torch.tensor([1, 4])
    assert torch.equal(a(x, t, y), b(x, t, y))


def test_the_two_qkv_layouts_compute_the_same_function_after_permutation():
    flash = randomize(tiny(num_head_channels=8), seed=3).eval()
    guided = tiny(num_head_channels=8, attention_type="guided").eval()
    guided.load_state_dict(convert_qkv_layout(flash.state_dict(), attention_heads(flash), "guided"))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 200.0])
    assert torch.allclose(flash(x, t), guided(x, t), atol=1e-5)
    # without the permutation the functions differ (the layouts really are different)
    guided.load_state_dict(flash.state_dict())
    assert not torch.allclose(flash(x, t), guided(x, t), atol=1e-3)
    heads = attention_heads(flash)
    back = convert_qkv_layout(convert_qkv_layout(flash.state_dict(), heads, "guided"), heads, "flash")
    assert all(torch.equal(back[k], v) for k, v in flash.state_dict().items())


def test_legacy_reads_the_flash_layout_like_the_reference():
    flash = randomize(tiny(num_head_channels=8), seed=6).eval()
    legacy = tiny(num_head_channels=8, attention_type="legacy").eval()
    legacy.load_state_dict(flash.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 200.0])
    assert torch.equal(flash(x, t), legacy(x, t))


def test_new_attention_order_uses_the_flash_layout():
    a = randomize(tiny(), seed=5).eval()
    b = tiny(attention_type="guided", use_new_attention_order=True).eval()
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10.0])
    assert torch.allclose(a(x, t), b(x, t), atol=1e-6)


def _fixture_model(data, name, attention_type):
    cfg = json.loads(str(data[f"{name}_config"]))
    model = UNetModel(**cfg, attention_type=attention_type).eval()
    g = torch.Generator().manual_seed(1234)
    sd = model.state_dict()
    sd = {k: torch.randn(sd[k].shape, generator=g) * 0.1 for k in sorted(sd)}
    if attention_type == "guided":
        sd = convert_qkv_layout(sd, attention_heads(model), "guided")
    model.load_state_dict(sd, strict=True)
    return model


@pytest.mark.parametrize("attention_type", ["legacy", "guided"])
@pytest.mark.parametrize("name", ["cond16", "uncond8"])
def test_legacy_attention_equals_the_reference_legacy_path(name, attention_type):
    """tests/data/reference_legacy_attention.npz holds outputs of the reference's UNetModel with its
    AttentionBlock default set to "legacy" (QKVAttentionLegacy), made by make_legacy_attention_fixture.py:
    out_fp16 as the reference computes it (q, k, v cast to float16), out_fp32 without that cast. Our
    "legacy" reads the same weights; "guided" reads them after convert_qkv_layout."""
    data = np.load(os.path.join(DATA, "reference_legacy_attention.npz"))
    model = _fixture_model(data, name, attention_type)
    x, t = torch.from_numpy(data[f"{name}_x"]), torch.from_numpy(data[f"{name}_t"])
    y = torch.from_numpy(data[f"{name}_y"]) if f"{name}_y" in data else None
    with torch.no_grad():
        out = model(x, t, y)
    for kind in ("fp32", "fp16"):
        expected = torch.from_numpy(data[f"{name}_out_{kind}"])
        assert torch.allclose(out, expected, atol=1e-4, rtol=0), (kind, (out - expected).abs().max())


def test_guided_order_without_permutation_is_not_the_reference_legacy():
    data = np.load(os.path.join(DATA, "reference_legacy_attention.npz"))
    model = _fixture_model(data, "uncond8", "legacy")
    wrong = UNetModel(**json.loads(str(data["uncond8_config"])), attention_type="guided").eval()
    wrong.load_state_dict(model.state_dict())
    x, t = torch.from_numpy(data["uncond8_x"]), torch.from_numpy(data["uncond8_t"])
    with torch.no_grad():
        assert not torch.allclose(wrong(x, t), torch.from_numpy(data["uncond8_out_fp32"]), atol=1e-3)


def test_outputs_equal_the_reference_implementation():
    """tests/data/reference_unet_outputs.npz holds outputs of openai/consistency_models' cm/unet.py
    (flash-attention qkv layout) whose parameters were filled, in sorted state-dict key order, with
    torch.randn(shape, generator=torch.Generator().manual_seed(1234)) * 0.1."""
    data = np.load(os.path.join(DATA, "reference_unet_outputs.npz"))
    for name in ("cond16", "uncond8"):
        cfg = json.loads(str(data[f"{name}_config"]))
        cfg["attention_resolutions"] = tuple(cfg["attention_resolutions"])
        cfg["channel_mult"] = tuple(cfg["channel_mult"])
        model = UNetModel(**cfg).eval()
        g = torch.Generator().manual_seed(1234)
        sd = model.state_dict()
        model.load_state_dict({k: torch.randn(sd[k].shape, generator=g) * 0.1 for k in sorted(sd)}, strict=True)
        x = torch.from_numpy(data[f"{name}_x"])
        t = torch.from_numpy(data[f"{name}_t"])
        y = torch.from_numpy(data[f"{name}_y"]) if f"{name}_y" in data else None
        with torch.no_grad():
            out = model(x, t, y)
        assert torch.allclose(out, torch.from_numpy(data[f"{name}_out"]), atol=1e-5), name


def _key_signature(model):
    lines = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(model.state_dict().items()))
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.mark.parametrize(
    "flags, params, signature",
    [
        # ImageNet-64 (cd_imagenet64_l2 / cd_imagenet64_lpips / ct_imagenet64 / edm_imagenet64_ema)
        (
            dict(image_size=64, num_channels=192, num_res_blocks=3, attention_resolutions="32,16,8", class_cond=True,
                 num_head_channels=64, use_scale_shift_norm=True, resblock_updown=True, dropout=0.1),
            295_899_267,
            "3b1ec52ff874f8c6506e76cadcee1561843ba6014e1e2c9deb913f823c07b68c",
        ),
        # LSUN 256 (cd/ct_bedroom256, ct_cat256, edm_bedroom256_ema)
        (
            dict(image_size=256, num_channels=256, num_res_blocks=2, attention_resolutions="32,16,8", class_cond=False,
                 num_head_channels=64, use_scale_shift_norm=False, resblock_updown=True, dropout=0.1),
            526_304_771,
            "6bc53d3abe23f6896ddc8141c541fbe36f8134931843f71b558230d2bcb25845",
        ),
    ],
)
def test_reference_configs_have_the_reference_parameters(flags, params, signature):
    """Counts and the sha256 of sorted 'name:shape' lines were computed by instantiating the reference's
    UNetModel (openai/consistency_models cm/unet.py) with the same flags on the meta device."""
    with torch.device("meta"):
        model = create_model(**flags)
    assert sum(p.numel() for p in model.parameters()) == params
    assert _key_signature(model) == signature


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_fp16_and_bf16_bodies_run_and_stay_close_to_fp32(half):
    model = randomize(tiny(), seed=1).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 50.0])
    ref = model(x, t)
    model.convert_to_fp16(half)
    assert model.input_blocks[0][0].weight.dtype == half
    assert model.time_embed[0].weight.dtype == torch.float32
    out = model(x, t)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
    model.convert_to_fp32()
    assert model.input_blocks[0][0].weight.dtype == torch.float32 and model.dtype == torch.float32


def test_gradient_checkpointing_gives_the_same_gradients():
    a = randomize(tiny(dropout=0.0), seed=2)
    b = tiny(dropout=0.0, use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 50.0])
    a(x, t).square().mean().backward()
    b(x, t).square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_channels_last_input_gives_the_same_output():
    model = randomize(tiny(), seed=4).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 50.0])
    ref = model(x, t)
    model = model.to(memory_format=torch.channels_last)
    assert torch.allclose(model(x.to(memory_format=torch.channels_last), t), ref, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(attention_type="xformers"), "attention_type 'xformers'"),
        (dict(num_head_channels=24), "num_head_channels 24 does not divide"),
        (dict(attention_resolutions=(8,)), "never reached"),
        (dict(image_size=10), "not divisible"),
    ],
)
def test_bad_configurations_give_one_clear_error(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        tiny(**kwargs)


def test_attention_resolution_that_does_not_divide_the_image_size():
    with pytest.raises(ValueError, match="attention resolution 5 does not divide image_size 16"):
        create_model(16, 32, 1, attention_resolutions="5")


def test_class_labels_must_match_the_model():
    model = tiny(num_classes=3)
    with pytest.raises(ValueError, match="class-conditional"):
        model(torch.randn(1, 3, 16, 16), torch.zeros(1))


def test_a_use_fp16_network_runs_outside_the_trainer():
    """The reference casts the input to self.dtype (float16 for use_fp16), so its network fails until
    convert_to_fp16; here the input follows the body's weights: float32 before, float16 after."""
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1.0, 50.0])
    plain = randomize(tiny(), seed=7).eval()
    model = tiny(use_fp16=True).eval()
    model.load_state_dict(plain.state_dict())
    assert model.dtype == torch.float16
    out = model(x, t)
    assert out.dtype == torch.float32 and torch.equal(out, plain(x, t))
    model.convert_to_fp16()
    half = model(x, t)
    assert half.dtype == torch.float32 and (half - out).abs().max() < 0.05 * out.abs().max() + 0.05


def test_cpu_bf16_training_attention_runs_in_fp32_and_sampling_stays_bf16():
    import torch.nn.functional as F

    from cm.nn import scaled_dot_product_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, generator=g).bfloat16() for _ in range(3))
    with torch.no_grad():  # sampling: the bfloat16 kernel (faster there)
        assert torch.equal(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    q.requires_grad_(True)
    out = scaled_dot_product_attention(q, k, v)  # training: float32 inside, bfloat16 out
    expected = F.scaled_dot_product_attention(q.detach().float(), k.float(), v.float()).bfloat16()
    assert out.dtype == torch.bfloat16 and torch.equal(out.detach(), expected)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()
