"""Forward-mode derivatives (JVPs) through the ADM UNet and NCSN++: attention, dropout, GroupNorm, FIR resampling,
gradient checkpointing, fp32 / fp64 / bf16 autocast, against central finite differences in float64."""

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from cm.dit import DiT
from cm.ncsnpp import NCSNpp
from cm.nn import math_attention, network_jvp, scaled_dot_product_attention
from cm.unet import UNetModel

from helpers import point, replay


def unet(**overrides):
    kw = dict(
        image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1, attention_resolutions=(1, 2),
        channel_mult=(1, 2), num_head_channels=16, dropout=0.2, use_scale_shift_norm=True, resblock_updown=True,
    )  # fmt: skip
    kw.update(overrides)
    return UNetModel(**kw)


def ncsnpp(**overrides):
    kw = dict(image_size=8, in_channels=3, nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.2)
    kw.update(overrides)
    return NCSNpp(**kw)


NETWORKS = {
    # attention at both resolutions, scale-shift norm, residual up/down blocks
    "unet": unet,
    # the CIFAR-10 layout: BigGAN blocks with FIR resampling, FIR strided-conv input pyramid
    "ncsnpp": ncsnpp,
    # DDPM blocks, FIR up/downsampling layers without weights, output-skip and input-skip pyramids
    "ncsnpp_pyramids": lambda: ncsnpp(resblock_type="ddpm", progressive="output_skip", progressive_input="input_skip"),
}


def build(name):
    """A network in train mode (dropout on) whose zero-initialised output layers are perturbed."""
    torch.manual_seed(0)
    model = NETWORKS[name]()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.train()


def float64(model):
    model = copy.deepcopy(model).double()
    model.dtype = torch.float64
    return model


def central_difference(model, x, t, dx, dt, state, h=1e-5):
    """(F(x + h dx, t + h dt) - F(x - h dx, t - h dt)) / 2h in float64, every evaluation with the same dropout masks."""
    model = float64(model)
    plus = replay(state, model, x + h * dx, t + h * dt)
    minus = replay(state, model, x - h * dx, t - h * dt)
    return (plus - minus) / (2 * h)


def relative_error(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", NETWORKS)
def test_jvp_matches_finite_differences_in_fp64_and_fp32(name):
    model = build(name)
    x, t, dx, dt = point()
    state = torch.get_rng_state()
    reference = central_difference(model, x, t, dx, dt, state)

    _, jvp64 = replay(state, network_jvp, float64(model), (x, t), (dx, dt))
    _, jvp32 = replay(state, network_jvp, model, (x.float(), t.float()), (dx.float(), dt.float()))
    assert jvp32.dtype == torch.float32
    assert relative_error(jvp64, reference) < 1e-7
    assert relative_error(jvp32, reference) < 1e-3
    # other dropout masks give another derivative: the agreement above needs the replayed masks
    _, other = network_jvp(model, (x.float(), t.float()), (dx.float(), dt.float()))
    assert relative_error(other, reference) > 0.1


@pytest.mark.parametrize("name", NETWORKS)
def test_jvp_under_bf16_autocast(name):
    model = build(name)
    x, t, dx, dt = point()
    state = torch.get_rng_state()
    reference = central_difference(model, x, t, dx, dt, state)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, jvp = replay(state, network_jvp, model, (x.float(), t.float()), (dx.float(), dt.float()))
    assert torch.isfinite(jvp).all()
    assert relative_error(jvp, reference) < 0.1  # bf16 keeps 8 bits of mantissa; measured about 0.03


@pytest.mark.parametrize("name", NETWORKS)
def test_jvp_value_uses_the_dropout_masks_of_a_plain_forward(name):
    model = build(name)
    x, t, dx, dt = (v.float() for v in point())
    state = torch.get_rng_state()
    plain = replay(state, model, x, t)
    value, _ = replay(state, network_jvp, model, (x, t), (dx, dt))
    torch.testing.assert_close(value, plain, rtol=1e-6, atol=1e-6)
    assert (model(x, t) - plain).abs().max() > 1e-2  # fresh masks differ


def test_jvp_with_gradient_checkpointing_and_forward_ad_api():
    """use_checkpoint is skipped under a JVP (its recomputation drops tangents); torch.autograd.forward_ad agrees."""
    plain, checkpointed = build("unet"), build("unet")
    for block in checkpointed.modules():
        if hasattr(block, "use_checkpoint"):
            block.use_checkpoint = True
    x, t, dx, dt = (v.float() for v in point())
    state = torch.get_rng_state()
    value, jvp = replay(state, network_jvp, plain, (x, t), (dx, dt))
    value_ckpt, jvp_ckpt = replay(state, network_jvp, checkpointed, (x, t), (dx, dt))
    torch.testing.assert_close(jvp_ckpt, jvp)
    # gradients flow through value and tangent
    (value_ckpt.square().mean() + jvp_ckpt.square().mean()).backward()
    assert all(p.grad is not None for p in checkpointed.parameters() if p.requires_grad)

    torch.set_rng_state(state)
    with fwAD.dual_level():
        out = checkpointed(fwAD.make_dual(x, dx), fwAD.make_dual(t, dt))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent, jvp)


def test_attention_jvp_rule_and_backward_match_math_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v, dq, dk, dv = torch.randn(6, 2, 3, 10, 8, dtype=torch.float64, generator=g)
    want_value, want_jvp = torch.func.jvp(math_attention, (q, k, v), (dq, dk, dv))
    value, jvp = torch.func.jvp(scaled_dot_product_attention, (q, k, v), (dq, dk, dv))
    torch.testing.assert_close(value, want_value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jvp, want_jvp, rtol=1e-12, atol=1e-12)
    # only some inputs with a tangent
    _, jvp_k = torch.func.jvp(lambda k_: scaled_dot_product_attention(q, k_, v), (k,), (dk,))
    _, want_k = torch.func.jvp(lambda k_: math_attention(q, k_, v), (k,), (dk,))
    torch.testing.assert_close(jvp_k, want_k, rtol=1e-12, atol=1e-12)

    # backward of a JVP pass (value and tangent) equals math attention's
    def grads(attention):
        inputs = [a.clone().requires_grad_() for a in (q, k, v)]
        out, tangent = torch.func.jvp(attention, tuple(inputs), (dq, dk, dv))
        return torch.autograd.grad((out * dv).sum() + tangent.square().sum(), inputs)

    for got, want in zip(grads(scaled_dot_product_attention), grads(math_attention)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)

    # without tangents it is the fused kernel itself
    q32, k32, v32 = q.float(), k.float(), v.float()
    assert torch.equal(scaled_dot_product_attention(q32, k32, v32), F.scaled_dot_product_attention(q32, k32, v32))


def test_network_jvp_checks_its_arguments():
    model = build("unet")
    x, t, dx, dt = (v.float() for v in point())
    with pytest.raises(ValueError, match="one tangent per primal"):
        network_jvp(model, (x, t), (dx,))
    with pytest.raises(ValueError, match="does not match"):
        network_jvp(model, (x, t), (dx, dt[:1]))


TWO_TIME = {
    "unet": unet,
    "ncsnpp": ncsnpp,
    "dit": lambda **kw: DiT(8, 3, 3, patch_size=2, hidden_size=32, depth=2, num_heads=2, dropout=0.2, **kw),
}


@pytest.mark.parametrize("name", TWO_TIME)
def test_two_time_network_jvp_through_both_times_matches_finite_differences(name):
    """F(x, t, second_time=h) of a flow map's network: one JVP along (dx, dt, dh) against float64 central
    differences, and the h input really changes the output."""
    torch.manual_seed(0)
    model = TWO_TIME[name](second_time_embed=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.train()
    x, t, dx, dt = point()
    h, dh = torch.tensor([0.2, 0.9], dtype=torch.float64), torch.randn(2, dtype=torch.float64, generator=g)

    def two_time(m):
        return lambda x_, t_, h_: m(x_, t_, second_time=h_)

    state = torch.get_rng_state()
    eps, m64 = 1e-5, float64(model)
    plus = replay(state, two_time(m64), x + eps * dx, t + eps * dt, h + eps * dh)
    minus = replay(state, two_time(m64), x - eps * dx, t - eps * dt, h - eps * dh)
    reference = (plus - minus) / (2 * eps)
    _, jvp64 = replay(state, network_jvp, two_time(m64), (x, t, h), (dx, dt, dh))
    _, jvp32 = replay(state, network_jvp, two_time(model), (x.float(), t.float(), h.float()),
                      (dx.float(), dt.float(), dh.float()))
    assert relative_error(jvp64, reference) < 1e-7
    assert relative_error(jvp32, reference) < 1e-3
    # the h tangent alone is nonzero: the second embedding reaches the output
    zero = torch.zeros_like
    _, only_h = replay(state, network_jvp, two_time(m64), (x, t, h), (zero(dx), zero(dt), dh))
    assert only_h.norm() > 1e-3 * reference.norm()


def test_the_first_jvp_prints_no_torch_jit_deprecation_warning():
    """torch loads its JVP decompositions through torch.jit.script on the first forward-mode call (once per process)."""
    import subprocess
    import sys

    code = ("import torch; from cm.nn import network_jvp; "
            "print(network_jvp(torch.sin, (torch.zeros(3),), (torch.ones(3),))[1].tolist())")
    result = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[1.0, 1.0, 1.0]", result.stderr[-1500:]
