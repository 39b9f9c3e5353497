import copy
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F

from cm.karras_diffusion import KarrasDenoiser
from cm.ncsnpp import (
    CIFAR10_CONFIG,
    FirConv2d,
    NCSNpp,
    create_ncsnpp_model,
    fir_downsample,
    fir_filter,
    fir_upsample,
    parse_fir_kernel,
)
from cm.script_util import (
    train_defaults,
    cm_train_defaults,
    create_model,
    create_model_and_diffusion,
    load_config,
    model_and_diffusion_defaults,
    ncsnpp_defaults,
)

CIFAR10 = CIFAR10_CONFIG

# Parameter counts of yang-song/score_sde_pytorch `models/ncsnpp.py` NCSNpp (conditional=True, swish,
# 3 data channels), instantiated from its own code with the options below. Its GaussianFourierProjection
# weight W (nf values, requires_grad=False) is a parameter there and a buffer here, so the numbers are
# those of its trainable parameters; with W, score_sde's parameters() total is 56_395_651 for CIFAR-10.
CIFAR10_TRAINABLE = 56_395_523
TINY_SDE_COUNTS = [  # nf 16, ch_mult (1, 2, 2), 1 res block, attention at 8 px, 16 px images
    (dict(fir=True, resblock_type="biggan", progressive="none", progressive_input="residual"), 323_811),
    (dict(fir=False, resblock_type="biggan", progressive="none", progressive_input="residual"), 323_811),
    (dict(fir=True, resblock_type="ddpm", progressive="none", progressive_input="none",
          embedding_type="positional", skip_rescale=False), 276_467),
    (dict(fir=False, resblock_type="ddpm", progressive="output_skip", progressive_input="input_skip",
          progressive_combine="cat"), 310_457),
    (dict(fir=True, resblock_type="biggan", progressive="output_skip", progressive_input="input_skip",
          embedding_type="positional"), 319_753),
    (dict(fir=False, resblock_type="biggan", progressive="residual", progressive_input="input_skip",
          progressive_combine="cat", skip_rescale=False, resamp_with_conv=False), 373_011),
    (dict(fir=True, resblock_type="ddpm", progressive="residual", progressive_input="residual",
          resamp_with_conv=False), 275_699),
    (dict(fir=False, resblock_type="ddpm", progressive="residual", progressive_input="residual"), 305_763),
    (dict(fir=True, resblock_type="biggan", progressive="residual", progressive_input="none"), 341_907),
]  # fmt: skip


def tiny(image_size=16, **overrides):
    kw = dict(
        image_size=image_size,
        nf=16,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(image_size // 2,),
        init_scale=1.0,
        progressive_input="residual",
    )
    kw.update(overrides)
    return NCSNpp(**kw)


def rescaled_t(sigma):
    return 1000 * 0.25 * torch.log(torch.as_tensor(sigma) + 1e-44)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


SHAPE_CASES = [
    dict(),
    dict(fir=False),
    dict(resblock_type="ddpm"),
    dict(resblock_type="ddpm", fir=False, resamp_with_conv=False),
    dict(progressive="output_skip"),
    dict(progressive="residual", progressive_input="none"),
    dict(progressive_input="input_skip", progressive_combine="cat"),
    dict(progressive_input="input_skip", progressive_combine="sum", fir=False),
    dict(embedding_type="positional"),
    dict(num_classes=5),
    dict(skip_rescale=False, fir_kernel="1,2,1"),
    dict(conditional=False),
    dict(out_channels=6, progressive="output_skip", progressive_input="input_skip"),
]


@pytest.mark.parametrize("image_size", [16, 32])
@pytest.mark.parametrize("options", SHAPE_CASES)
def test_output_shape(image_size, options):
    model = tiny(image_size, ch_mult=(1, 2) if image_size == 16 else (1, 2, 2), **options)
    x = torch.randn(2, 3, image_size, image_size)
    y = torch.tensor([0, 4]) if options.get("num_classes") else None
    out = model(x, rescaled_t([0.01, 40.0]), y=y)
    assert out.shape == (2, options.get("out_channels", 3), image_size, image_size)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_cifar10_parameter_count_matches_score_sde():
    with torch.device("meta"):
        model = NCSNpp(**CIFAR10)
    assert n_params(model) == CIFAR10_TRAINABLE
    fourier_w = model.noise_embed.W.numel()
    assert fourier_w == 128 and n_params(model) + fourier_w == 56_395_651


def test_factory_builds_the_cifar10_network_from_flags():
    flags = dict(ncsnpp_defaults(), embedding_type="fourier")
    with torch.device("meta"):
        model = create_model(32, 128, 4, channel_mult="2,2,2", attention_resolutions="16", model_type="ncsnpp", **flags)
    assert isinstance(model, NCSNpp) and n_params(model) == CIFAR10_TRAINABLE


@pytest.mark.parametrize("options, expected", TINY_SDE_COUNTS)
def test_parameter_counts_match_score_sde_for_every_mode(options, expected):
    with torch.device("meta"):
        model = tiny(16, attn_resolutions=(8,), **options)
    assert n_params(model) == expected


@pytest.mark.parametrize(
    "options",
    [dict(), dict(resblock_type="ddpm", progressive="output_skip", progressive_input="input_skip",
                  progressive_combine="cat", embedding_type="positional", num_classes=3),
     dict(progressive="residual", fir=False)],
)  # fmt: skip
def test_gradients_reach_every_parameter(options):
    model = tiny(16, **options)
    x = torch.randn(3, 3, 16, 16)
    y = torch.tensor([0, 1, 2]) if options.get("num_classes") else None
    model(x, rescaled_t([0.02, 1.0, 30.0]), y=y).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_zero_init_scale_still_trains_every_parameter():
    model = tiny(16, init_scale=0.0)
    model(torch.randn(2, 3, 16, 16), rescaled_t([0.1, 5.0])).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_deterministic_under_a_seed():
    def run(seed):
        torch.manual_seed(seed)
        model = tiny(16, dropout=0.1)
        x = torch.randn(2, 3, 16, 16)
        torch.manual_seed(seed + 1)
        return model(x, rescaled_t([0.5, 2.0]))  # training mode: dropout draws from the seeded RNG

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_save_load_round_trip_is_bit_equal():
    torch.manual_seed(1)
    model = tiny(16, num_classes=4).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    torch.manual_seed(2)
    restored = tiny(16, num_classes=4).eval()
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert "noise_embed.W" in model.state_dict()
    x, t, y = torch.randn(2, 3, 16, 16), rescaled_t([0.3, 9.0]), torch.tensor([1, 3])
    assert torch.equal(model(x, t, y=y), restored(x, t, y=y))


def test_fourier_embedding_sees_quarter_log_sigma():
    model = tiny(16)
    sigma = torch.tensor([0.002, 1.0, 80.0])
    features = model.noise_embed(rescaled_t(sigma))
    proj = 0.25 * torch.log(sigma)[:, None] * model.noise_embed.W[None] * 2 * math.pi
    torch.testing.assert_close(features, torch.cat([proj.sin(), proj.cos()], dim=1))


def test_positional_embedding_separates_noise_levels():
    model = tiny(16, embedding_type="positional")
    features = model.noise_embed(rescaled_t(torch.tensor([0.002, 0.0021, 80.0])))
    assert features.shape == (3, 16) and torch.isfinite(features).all()
    assert (features[0] - features[1]).abs().max() > 1e-3


def test_karras_denoiser_uses_it_unchanged():
    model = tiny(16).eval()
    x = torch.randn(2, 3, 16, 16)
    denoiser = KarrasDenoiser(distillation=True, loss_norm="l2")
    _, at_min = denoiser.denoise(model, x, torch.full((2,), denoiser.sigma_min))
    assert torch.equal(at_min, x)  # boundary condition f(x, eps) = x
    output, denoised = denoiser.denoise(model, x, torch.tensor([0.5, 20.0]))
    assert output.shape == denoised.shape == x.shape


def test_consistency_loss_trains_it():
    model = tiny(16, dropout=0.1)
    x = torch.randn(2, 3, 16, 16).clamp(-1, 1)
    losses = KarrasDenoiser(distillation=True, loss_norm="l2").consistency_losses(
        model, x, 10, target_model=copy.deepcopy(model)
    )
    loss = losses["loss"]
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert model.stem.weight.grad is not None


def test_channels_last_input_gives_the_same_output():
    model = tiny(16).eval()
    x = torch.randn(2, 3, 16, 16)
    t = rescaled_t([0.1, 3.0])
    torch.testing.assert_close(model(x.to(memory_format=torch.channels_last), t), model(x, t))
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    torch.testing.assert_close(model_cl(x.to(memory_format=torch.channels_last), t), model(x, t))


def test_half_precision_body_and_back():
    model = tiny(16).eval()
    x, t = torch.randn(2, 3, 16, 16), rescaled_t([0.1, 3.0])
    reference = model(x, t)
    model.convert_to_bf16()
    assert model.dtype == torch.bfloat16 and model.stem.weight.dtype == torch.bfloat16
    assert model.middle[0].norm0.weight.dtype == torch.float32
    assert model.temb_mlp[0].weight.dtype == torch.float32
    out = model(x, t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference, atol=0.1, rtol=0.1)
    model.convert_to_fp32()
    assert model.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fir_with_a_box_kernel_is_nearest_and_average_pooling():
    x = torch.randn(2, 4, 6, 6)
    box = fir_filter((1, 1))
    torch.testing.assert_close(fir_upsample(x, box), F.interpolate(x, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(fir_downsample(x, box), F.avg_pool2d(x, 2))
    conv = FirConv2d(4, 5, "up", (1, 1))
    expected = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(conv(x), expected)


def test_fir_resampling_preserves_constants_inside_the_image():
    x = torch.ones(1, 2, 8, 8)
    k = fir_filter(parse_fir_kernel("1,3,3,1"))
    assert k.sum().item() == pytest.approx(1.0)
    assert torch.allclose(fir_upsample(x, k)[..., 2:-2, 2:-2], torch.ones(1, 2, 12, 12))
    assert torch.allclose(fir_downsample(x, k)[..., 1:-1, 1:-1], torch.ones(1, 2, 2, 2))


def test_create_ncsnpp_model_signature_and_sequence_kernel():
    model = create_ncsnpp_model(
        image_size=16, num_channels=16, num_res_blocks=1, channel_mult=(1, 2), attention_resolutions=(8,),
        dropout=0.0, num_classes=None, in_channels=3, out_channels=6, fir=True, fir_kernel=[1, 3, 3, 1],
        skip_rescale=True, resblock_type="biggan", progressive="none", progressive_input="residual",
        progressive_combine="sum", embedding_type="fourier", fourier_scale=16.0, init_scale=0.0,
        resamp_with_conv=True,
    )  # fmt: skip
    assert model(torch.randn(1, 3, 16, 16), rescaled_t([1.0])).shape == (1, 6, 16, 16)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(resblock_type="resnet"), r"unknown resblock_type 'resnet' \(allowed: biggan, ddpm\)"),
        (dict(progressive="skip"), r"allowed: none, output_skip, residual"),
        (dict(progressive_input="pyramid"), r"allowed: none, input_skip, residual"),
        (dict(progressive_combine="max"), r"allowed: sum, cat"),
        (dict(embedding_type="learned"), r"allowed: fourier, positional"),
        (dict(progressive_input="residual", progressive_combine="cat"), r"'cat' only applies to .*'input_skip'"),
        (dict(attn_resolutions=(16, 5)), r"attention resolution\(s\) \[5\] are never reached.*\[32, 16, 8\]"),
        (dict(image_size=30), r"image_size 30 is not divisible by 4"),
        (dict(fir_kernel="1,x,1"), r"fir_kernel must be a comma list"),
        (dict(nf=2), r"channel widths \[2\] "),
        (dict(dropout=1.5), r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_options_raise_one_clear_error(options, message):
    kw = dict(image_size=32, nf=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(16,))
    kw.update(options)
    with pytest.raises(ValueError, match=message):
        NCSNpp(**kw)


def test_several_bad_options_are_named_together():
    with pytest.raises(ValueError) as info:
        NCSNpp(image_size=30, resblock_type="x", progressive_combine="cat", progressive_input="none")
    text = str(info.value)
    assert "resblock_type" in text and "'cat'" in text and "image_size 30" in text


def test_labels_must_match_the_conditioning():
    x, t = torch.randn(2, 3, 16, 16), rescaled_t([1.0, 2.0])
    with pytest.raises(ValueError, match="class-conditional"):
        tiny(16, num_classes=3)(x, t)
    with pytest.raises(ValueError, match="class-conditional"):
        tiny(16)(x, t, y=torch.tensor([0, 1]))


CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TRAINING_FLAGS = set(train_defaults())


@pytest.mark.parametrize("name", ["edm", "cd_lpips", "cd_l2", "ct"])
def test_cifar10_configs_build_the_paper_network(name):
    values = load_config(os.path.join(CONFIGS, f"cifar10_{name}.yaml"))
    allowed = set(model_and_diffusion_defaults()) | set(cm_train_defaults()) | TRAINING_FLAGS
    assert set(values) <= allowed, sorted(set(values) - allowed)
    assert values["model_type"] == "ncsnpp" and values["global_batch_size"] == 512
    flags = {k: values.get(k, v) for k, v in model_and_diffusion_defaults().items()}
    with torch.device("meta"):
        model, diffusion = create_model_and_diffusion(**flags, distillation=name != "edm")
    assert isinstance(model, NCSNpp) and n_params(model) == CIFAR10_TRAINABLE
    assert diffusion.weight_schedule == ("karras" if name == "edm" else "uniform")
