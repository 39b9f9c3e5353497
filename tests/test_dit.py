"""DiT (Peebles & Xie 2023): the paper's parameter counts, the forward at 32x32x4 latents, adaLN-Zero, state dicts,
half precision, the JVP against float64 central differences, and training steps through the command line."""

import copy

import pytest
import torch

from cm.dit import DIT_SIZES, DiT, dit_size, sincos_position_embedding
from cm.nn import network_jvp
from cm.script_util import create_model
from cm.train_cli import main

from helpers import point, replay, tiny_argv

TINY_DIT = dict(model_type="dit", dit_size="2x32x2/2")  # 2 blocks, 32 wide, 2 heads, patch 2


def dit(**overrides):
    kw = dict(image_size=8, in_channels=3, out_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=2,
              num_classes=10, null_class=True, dropout=0.2)  # fmt: skip
    kw.update(overrides)
    return DiT(**kw)


def randomize(model, seed=1, scale=0.05):
    """Perturb every parameter so the zero-initialised adaLN-Zero layers do not hide the blocks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def paper_dit(size):
    """The DiT of the paper's ImageNet-256 runs on the meta device: 32 x 32 x 4 latents, 1000 classes plus the
    null class of classifier-free guidance, learned sigma (8 output channels)."""
    with torch.device("meta"):
        return create_model(image_size=32, num_channels=0, num_res_blocks=0, model_type="dit", dit_size=size,
                            in_channels=4, learn_sigma=True, class_cond=True, num_classes=1000, null_class=True)


@pytest.mark.parametrize("size, trainable, paper", [("B/2", 130_315_808, "130.5M"), ("XL/2", 674_834_720, "675.1M")])
def test_parameter_counts_equal_the_dit_papers(size, trainable, paper):
    """DiT Table 4 counts the class-conditional, learned-sigma model (1001 class rows, 8 output channels) with its
    fixed position embedding, which DiT's code keeps as a frozen parameter and this one as a buffer outside the
    state dict: trainable + position embedding = 130,512,416 (B/2) and 675,129,632 (XL/2, the count DiT's train.py
    prints)."""
    model = paper_dit(size)
    count = sum(p.numel() for p in model.parameters())
    assert count == trainable
    with_positions = count + model.pos_embed.numel()
    assert f"{with_positions / 1e6:.1f}M" == paper
    assert "pos_embed" not in model.state_dict()
    depth, width, heads, patch = dit_size(size)
    assert len(model.blocks) == depth and model.pos_embed.shape == (1, (32 // patch) ** 2, width)
    assert model.blocks[0].attn.heads == heads and model.final_layer.linear.out_features == patch * patch * 8


def test_sizes_follow_dit_table_1():
    assert dit_size("S/2") == (12, 384, 6, 2) and dit_size("B/4") == (12, 768, 12, 4)
    assert dit_size("L/8") == (24, 1024, 16, 8) and dit_size("XL/2") == (28, 1152, 16, 2)
    assert len(DIT_SIZES) == 12 and dit_size("2x64x4/2") == (2, 64, 4, 2)
    with pytest.raises(ValueError, match="unknown dit_size 'XXL/2'"):
        dit_size("XXL/2")


def test_xl2_forward_shape_at_32x32x4_latents_on_meta():
    model = paper_dit("XL/2")
    out = model(torch.randn(2, 4, 32, 32, device="meta"), torch.zeros(2, device="meta"),
                y=torch.zeros(2, dtype=torch.long, device="meta"))
    assert out.shape == (2, 8, 32, 32)


def test_forward_at_32x32x4_latents_and_adaln_zero_start():
    torch.manual_seed(0)
    model = create_model(image_size=32, num_channels=0, num_res_blocks=0, in_channels=4, class_cond=True,
                         num_classes=1000, null_class=True, **TINY_DIT)
    x, t, y = torch.randn(3, 4, 32, 32), torch.tensor([-500.0, 0.0, 700.0]), torch.tensor([0, 999, 1000])
    out = model(x, t, y=y)
    assert out.shape == (3, 4, 32, 32) and torch.equal(out, torch.zeros_like(out))  # adaLN-Zero: output layer zero
    tokens = model.x_embedder(x).flatten(2).transpose(1, 2) + model.pos_embed
    c = model.condition(t, y, None)
    for block in model.blocks:  # zero gates: every block starts as the identity
        assert torch.equal(block(tokens, c), tokens)
    randomize(model)
    out = model(x, t, y=y)
    assert torch.isfinite(out).all() and out.abs().mean() > 1e-3
    assert not torch.allclose(model(x, t, y=torch.tensor([1, 2, 3])), out)  # the class is seen


def test_unpatchify_inverts_the_patch_layout():
    model = dit(image_size=8, patch_size=4, out_channels=3)
    x = torch.randn(2, 3, 8, 8)
    # token (r, c) of a p x p grid holds its patch's pixels in (row, column, channel) order
    tokens = x.reshape(2, 3, 2, 4, 2, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 4, 48)
    assert torch.equal(model.unpatchify(tokens), x)


def test_position_embedding_is_fixed_sin_cos():
    pos = sincos_position_embedding(8, 3)
    assert pos.shape == (9, 8)
    # token 4 is row 1, column 1; frequencies 1 and 1/100 for a width of 8
    expected = torch.tensor([torch.sin(torch.tensor(1.0)), torch.sin(torch.tensor(0.01)), torch.cos(torch.tensor(1.0)),
                             torch.cos(torch.tensor(0.01))])
    torch.testing.assert_close(pos[4], torch.cat([expected, expected]))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(6, 2)


def test_mlp_ratio_flag_sets_the_hidden_width_and_defaults_to_dits():
    kw = dict(image_size=16, num_channels=0, num_res_blocks=0, model_type="dit", dit_size="2x32x2/8")
    assert create_model(**kw).blocks[0].mlp.fc1.out_features == 128  # DiT's 4 x width
    narrow = create_model(**kw, dit_mlp_ratio=2.0)
    assert narrow.blocks[1].mlp.fc1.out_features == narrow.blocks[1].mlp.fc2.in_features == 64


def test_final_conv_starts_as_the_same_dit_and_blends_neighbouring_patches():
    """--dit_final_conv: the same seed gives the same DiT weights plus a 3x3 convolution that starts as the identity
    (so the outputs agree); once trained, one patch's output reaches across into its neighbour's pixels."""
    torch.manual_seed(0)
    plain = dit()
    torch.manual_seed(0)
    conv = dit(final_conv=True)
    extra = set(conv.state_dict()) - set(plain.state_dict())
    assert extra == {"final_conv.weight", "final_conv.bias"}
    assert all(torch.equal(v, conv.state_dict()[k]) for k, v in plain.state_dict().items())
    randomize(plain)
    conv.load_state_dict(plain.state_dict(), strict=False)
    plain.eval(), conv.eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([1, 10])
    torch.testing.assert_close(conv(x, t, y), plain(x, t, y), rtol=0, atol=0)
    with torch.device("meta"):
        assert dit(final_conv=True).final_conv.weight.is_meta
    # a token whose patch is rows/cols 0-1 moves pixels of the next patch only through the convolution
    randomize(conv.final_conv, seed=2, scale=0.3)
    h = torch.zeros(1, 16, 2 * 2 * 3)
    h[0, 0] = 1.0
    no_conv = plain.unpatchify(h)
    with_conv = conv.final_conv(conv.unpatchify(h)) - conv.final_conv.bias.view(1, 3, 1, 1)
    assert no_conv[..., 2, :].abs().max() == 0 and with_conv[..., 2, :].abs().max() > 0


def test_state_dict_keys_are_clean_and_round_trip_bit_equal(tmp_path):
    torch.manual_seed(1)
    a = randomize(create_model(image_size=8, num_channels=0, num_res_blocks=0, class_cond=True, num_classes=10,
                               null_class=True, logvar_channels=8, **TINY_DIT))
    torch.save(a.state_dict(), tmp_path / "model.pt")
    torch.manual_seed(2)
    b = create_model(image_size=8, num_channels=0, num_res_blocks=0, class_cond=True, num_classes=10,
                     null_class=True, logvar_channels=8, **TINY_DIT)
    b.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert {"x_embedder.weight", "y_embedder.weight", "t_embedder.0.weight", "blocks.1.attn.qkv.weight",
            "blocks.0.adaLN_modulation.1.weight", "final_layer.linear.weight", "logvar_head.linear.weight"} <= set(sa)
    assert sa["y_embedder.weight"].shape == (11, 32)  # 10 classes + the null class
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([3, 10])
    assert torch.equal(a.eval()(x, t, y=y), b.eval()(x, t, y=y))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_body_and_bf16_autocast_stay_close_to_fp32(half):
    torch.manual_seed(3)
    model = randomize(dit(dropout=0.0), seed=3).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 50.0]), torch.tensor([0, 10])
    ref = model(x, t, y=y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model(x, t, y=y)
    assert (auto.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
    model.convert_to_fp16(half)
    assert model.blocks[0].attn.qkv.weight.dtype == half and model.x_embedder.weight.dtype == half
    assert model.t_embedder[0].weight.dtype == torch.float32 and model.final_layer.linear.weight.dtype == torch.float32
    out = model(x, t, y=y)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.05 * ref.abs().max() + 0.05
    model.convert_to_fp32()
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float32 and model.dtype == torch.float32


def test_guidance_input_starts_without_effect_then_acts():
    """--guidance_embed (LCM students): w is embedded like a time through a zero-initialised projection."""
    model = dit(guidance_embed=True, dropout=0.0).eval()
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 50.0]), torch.tensor([0, 10])
    c1 = model.condition(t, y, torch.tensor([1.0, 1.0]))
    assert torch.equal(c1, model.condition(t, y, torch.tensor([3.0, 5.0])))
    randomize(model, seed=5)
    assert not torch.allclose(model(x, t, y=y, guidance=torch.tensor([1.0, 1.0])),
                              model(x, t, y=y, guidance=torch.tensor([3.0, 5.0])))
    with pytest.raises(ValueError, match="guidance_embed"):
        model(x, t, y=y)


def test_gradient_checkpointing_gives_the_same_gradients():
    a = randomize(dit(dropout=0.0), seed=4)
    b = dit(dropout=0.0, use_checkpoint=True)
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 50.0]), torch.tensor([0, 10])
    a(x, t, y=y).square().mean().backward()
    b(x, t, y=y).square().mean().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_bad_inputs_give_one_clear_error():
    model = dit()
    with pytest.raises(ValueError, match="class-conditional"):
        model(torch.randn(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match=r"built for 3 x 8 x 8 inputs got 4 x 8 x 8 \(check --in_channels"):
        model(torch.randn(1, 4, 8, 8), torch.zeros(1), y=torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible by the DiT patch size"):
        dit(image_size=9)
    with pytest.raises(ValueError, match="adaLN-Zero"):
        create_model(image_size=8, num_channels=0, num_res_blocks=0, adaptive_double_norm=True, **TINY_DIT)


# ----- JVP (sCM) -----


def float64(model):
    model = copy.deepcopy(model).double()
    model.dtype = torch.float64
    return model


def relative_error(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("final_conv", [False, True])
def test_jvp_through_the_transformer_matches_float64_central_differences(final_conv):
    """Attention (the explicit JVP rule of the fused kernel), adaLN, LayerNorm, GELU, dropout, the embeddings (and the
    optional final convolution)."""
    torch.manual_seed(0)
    model = randomize(dit(final_conv=final_conv), seed=1, scale=0.1).train()
    y = torch.tensor([4, 10])
    fn = lambda x, t: model(x, t, y=y)  # noqa: E731
    model64 = float64(model)
    fn64 = lambda x, t: model64(x, t, y=y)  # noqa: E731
    x, t, dx, dt = point()
    state = torch.get_rng_state()
    h = 1e-5
    reference = (replay(state, fn64, x + h * dx, t + h * dt) - replay(state, fn64, x - h * dx, t - h * dt)) / (2 * h)
    _, jvp64 = replay(state, network_jvp, fn64, (x, t), (dx, dt))
    _, jvp32 = replay(state, network_jvp, fn, (x.float(), t.float()), (dx.float(), dt.float()))
    assert relative_error(jvp64, reference) < 1e-7
    assert relative_error(jvp32, reference) < 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, jvp16 = replay(state, network_jvp, fn, (x.float(), t.float()), (dx.float(), dt.float()))
    assert torch.isfinite(jvp16).all() and relative_error(jvp16, reference) < 0.1
    value, _ = replay(state, network_jvp, fn, (x.float(), t.float()), (dx.float(), dt.float()))
    torch.testing.assert_close(value, replay(state, fn, x.float(), t.float()), rtol=1e-6, atol=1e-6)


# ----- training through the command line -----


@pytest.mark.parametrize("mode, flags", [
    ("edm", dict(class_cond="true", num_classes=10, null_class="true", class_dropout_prob=0.2)),
    ("consistency_training", dict(loss_norm="l2")),
    ("sct", dict(logvar_channels=16, tangent_warmup_steps=1, time_conditioning="trigflow", adaptive_double_norm="false")),
])  # fmt: skip
def test_a_tiny_dit_trains_through_the_training_entry(tmp_path, mode, flags):
    loop = main(mode, tiny_argv(log_dir=tmp_path, total_training_steps=1, **TINY_DIT, **flags))
    assert loop.step == 1 and isinstance(loop.model, DiT)
    saved = torch.load(tmp_path / "model000001.pt", weights_only=True)
    assert set(saved) == set(loop.model.state_dict())
    moved = [k for k in saved if k.startswith("final_layer.linear")]
    assert moved and any(saved[k].abs().sum() > 0 for k in moved)  # the zero output layer learned


CFG_DIT = dict(TINY_DIT, class_cond="true", num_classes=10, null_class="true")


@pytest.fixture(scope="module")
def dit_teacher(tmp_path_factory):
    """A one-step class-conditional DiT EDM teacher with a null class."""
    log_dir = tmp_path_factory.mktemp("dit_teacher")
    main("edm", tiny_argv(log_dir=log_dir, total_training_steps=1, class_dropout_prob=0.2, **CFG_DIT))
    return str(log_dir / "model000001.pt")


@pytest.mark.parametrize("mode, flags", [
    ("consistency_distillation", dict(loss_norm="l2")),
    ("consistency_tuning", dict(ect_stage_steps=1)),
    ("scd", dict(logvar_channels=16, adaptive_double_norm="false", time_conditioning="edm", init_from_teacher="true")),
    ("lcm", dict(guidance_embed="true", w_min=1.0, w_max=3.0, skip_steps=3, start_scales=10)),
])  # fmt: skip
def test_every_distillation_mode_trains_a_dit_student_from_a_dit_teacher(tmp_path, dit_teacher, mode, flags):
    loop = main(mode, tiny_argv(log_dir=tmp_path, total_training_steps=1, teacher_model_path=dit_teacher,
                                **CFG_DIT, **flags))
    assert loop.step == 1 and isinstance(loop.model, DiT)
    if mode != "consistency_tuning":  # ECT's teacher only initialises the student
        assert isinstance(loop.teacher_model, DiT)


@pytest.mark.parametrize("precision", ["use_bf16", "use_fp16"])
def test_a_tiny_dit_trains_in_reduced_precision(tmp_path, precision):
    loop = main("edm", tiny_argv(log_dir=tmp_path, total_training_steps=2, **TINY_DIT, **{precision: "true"}))
    assert loop.step == 2
    assert all(torch.isfinite(p).all() for p in loop.model.parameters())
