"""--fp32_time_embedding: the time embedding runs in float32 under bf16 autocast and half-precision bodies (ADM UNet,
NCSN++ and DiT), the parameters and the float32 outputs stay the same, and the JVP goes through it."""

import pytest
import torch

from cm.nn import network_jvp
from cm.script_util import create_model, ncsnpp_defaults

TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
            num_head_channels=16, use_scale_shift_norm=True)  # fmt: skip
NETWORKS = {
    "adm": dict(TINY, model_type="adm", class_cond=True, num_classes=3),
    "ncsnpp": dict(TINY, **ncsnpp_defaults(), model_type="ncsnpp", num_channels=16),
    "dit": dict(image_size=8, num_channels=32, num_res_blocks=1, model_type="dit", dit_size="2x32x2/2", class_cond=True,
                num_classes=3),
}


def embedding_module(model):
    """The MLP after the sinusoidal / Fourier features."""
    for name in ("time_embed", "temb_mlp", "t_embedder"):
        if hasattr(model, name):
            return getattr(model, name)


def build(name, fp32_time_embedding):
    torch.manual_seed(0)
    model = create_model(**NETWORKS[name], fp32_time_embedding=fp32_time_embedding)
    with torch.no_grad():  # perturb the zero-initialised output layers so outputs depend on every part
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def inputs(name):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([-1.5, 0.3, 120.0, 700.0])  # rescaled times: where bf16 loses the most in the sin/cos
    kwargs = {"y": torch.tensor([0, 1, 2, 0])} if name in ("adm", "dit") else {}
    return x, t, kwargs


def embedding_and_output(model, x, t, kwargs, autocast):
    """(embedding MLP output, network output) of one forward, under bf16 CPU autocast or not."""
    seen = []
    hook = embedding_module(model).register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, t, **kwargs)
    hook.remove()
    return seen[0], out


def relative(a, b):
    return ((a.float() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", NETWORKS)
def test_float32_embedding_under_bf16_autocast(name):
    on, off = build(name, True), build(name, False)
    assert on.state_dict().keys() == off.state_dict().keys()
    x, t, kwargs = inputs(name)
    emb_fp32, out_fp32 = embedding_and_output(off, x, t, kwargs, autocast=False)
    # without autocast the flag changes nothing
    emb_on, out_on = embedding_and_output(on, x, t, kwargs, autocast=False)
    assert torch.equal(emb_on, emb_fp32) and torch.equal(out_on, out_fp32)
    # under bf16 autocast: the reference's embedding is bfloat16, ours float32 and equal to the float32 one
    emb_bf16, out_bf16 = embedding_and_output(off, x, t, kwargs, autocast=True)
    emb_mixed, out_mixed = embedding_and_output(on, x, t, kwargs, autocast=True)
    assert emb_bf16.dtype == torch.bfloat16 and emb_mixed.dtype == torch.float32
    assert relative(emb_mixed, emb_fp32) < 1e-6 < 1e-3 < relative(emb_bf16, emb_fp32)
    # the body stays bf16: outputs agree with float32 at bf16 tolerance, and no worse than without the flag
    assert relative(out_mixed, out_fp32) < 0.05
    assert relative(out_mixed, out_fp32) <= relative(out_bf16, out_fp32) * 1.5


@pytest.mark.parametrize("name", NETWORKS)
def test_float32_embedding_with_a_half_precision_body(name):
    model = build(name, True)
    model.convert_to_fp16(torch.bfloat16)
    x, t, kwargs = inputs(name)
    emb, out = embedding_and_output(model, x, t, kwargs, autocast=False)
    assert emb.dtype == torch.float32 and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NETWORKS)
def test_jvp_through_the_float32_embedding_under_autocast(name):
    model = build(name, True)
    x, t, kwargs = inputs(name)
    dx, dt = torch.randn_like(x), torch.ones_like(t)

    def fn(x, t):
        return model(x, t, **kwargs)

    with torch.no_grad():
        _, exact = network_jvp(fn, (x, t), (dx, dt))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, mixed = network_jvp(fn, (x, t), (dx, dt))
    assert torch.isfinite(mixed).all() and relative(mixed, exact) < 0.1
