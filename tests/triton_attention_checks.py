"""The tiled Triton attention JVP (cm.attention_jvp), run in Triton's CPU interpreter, against the float64 JVP of
math attention; and its use by cm.nn's attention under forward AD.

Triton chooses interpreter or compiler when it is imported, so these checks run in their own process with
TRITON_INTERPRET=1 (tests/test_attention_jvp.py starts it); the file name keeps pytest from collecting it there.
"""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("error: run these checks with TRITON_INTERPRET=1 (tests/test_attention_jvp.py does)")

from cm import attention_jvp as aj
from cm.nn import math_attention, network_jvp, scaled_dot_product_attention

triton = pytest.importorskip("triton")


def inputs(shape_q, len_k, dtype=torch.float32, seed=0):
    """q, k, v and tangents dq, dk, dv: q-like tensors [..., Tq, D], k-like [..., Tk, D]."""
    g = torch.Generator().manual_seed(seed)
    shape_k = (*shape_q[:-2], len_k, shape_q[-1])
    return [torch.randn(s, generator=g).to(dtype) for s in (shape_q, shape_k, shape_k, shape_q, shape_k, shape_k)]


def float64_jvp(q, k, v, dq, dk, dv):
    """(value, tangent) of math attention by torch.func.jvp in float64."""
    f64 = [t.double() for t in (q, k, v, dq, dk, dv)]
    return torch.func.jvp(math_attention, tuple(f64[:3]), tuple(f64[3:]))


def relative(a, b):
    """max |a - b| / max |b|."""
    return ((a.double() - b).abs().max() / b.abs().max()).item()


# [B, H, Tq, D] and Tk: lengths below, at and across the 32-row tile, head dims 16 to 64 including non-powers of 2
SHAPES = [
    ((1, 2, 17, 16), 17),
    ((2, 1, 32, 32), 32),
    ((1, 2, 50, 24), 37),
    ((1, 1, 70, 40), 65),
    ((1, 1, 64, 64), 100),
    ((3, 5, 8), 9),  # one leading dim, head dim 8 (padded to the 16-wide dot)
]


@pytest.mark.parametrize("shape_q,len_k", SHAPES)
def test_value_tangent_and_lse_match_float64_math_attention(shape_q, len_k):
    q, k, v, dq, dk, dv = inputs(shape_q, len_k)
    out, d_out, lse = aj.attention_jvp(q, k, v, dq, dk, dv)
    want_out, want_tangent = float64_jvp(q, k, v, dq, dk, dv)
    want_lse = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * shape_q[-1] ** -0.5, dim=-1)
    assert out.dtype == d_out.dtype == torch.float32 and out.shape == d_out.shape == q.shape
    assert relative(out, want_out) < 1e-4
    assert relative(d_out, want_tangent) < 1e-4
    assert relative(lse, want_lse) < 1e-4


@pytest.mark.parametrize("dtype,tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_half_precision_inputs_accumulate_in_float32(dtype, tolerance):
    q, k, v, dq, dk, dv = inputs((1, 2, 40, 32), 40, dtype)
    out, d_out, _ = aj.attention_jvp(q, k, v, dq, dk, dv)
    want_out, want_tangent = float64_jvp(q, k, v, dq, dk, dv)
    assert out.dtype == d_out.dtype == dtype
    assert relative(out, want_out) < tolerance and relative(d_out, want_tangent) < tolerance


def test_bad_inputs_give_one_line_errors():
    q, k, v, dq, dk, dv = inputs((1, 1, 8, 16), 8)
    with pytest.raises(ValueError, match="tangent dk has shape"):
        aj.attention_jvp(q, k, v, dq, dk[..., :4, :], dv)
    with pytest.raises(ValueError, match="share one dtype"):
        aj.attention_jvp(q, k, v, dq.double(), dk, dv)
    with pytest.raises(ValueError, match="equal leading dims"):
        aj.attention_jvp(q, k[..., :8], v, dq, dk, dv)


def test_unavailable_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not aj.available("cpu")
    q, k, v, dq, dk, dv = inputs((1, 1, 8, 16), 8)
    with pytest.raises(RuntimeError, match="needs Triton and a CUDA device"):
        aj.attention_jvp(q, k, v, dq, dk, dv)


def attention_tangent(q, k, v, dq, dk, dv):
    """The tangent cm.nn's attention gives under torch.func.jvp (the networks' route)."""
    return network_jvp(scaled_dot_product_attention, (q, k, v), (dq, dk, dv))[1]


def test_networks_attention_uses_the_kernel_for_a_tangent_without_gradient(monkeypatch):
    calls = []
    kernel = aj.attention_jvp
    monkeypatch.setattr(aj, "attention_jvp", lambda *a: calls.append(1) or kernel(*a))
    q, k, v, dq, dk, dv = inputs((2, 2, 33, 16), 33)
    want = float64_jvp(q, k, v, dq, dk, dv)[1]
    with torch.no_grad():
        tangent = attention_tangent(q, k, v, dq, dk, dv)
    assert calls == [1] and relative(tangent, want) < 1e-4
    # a tangent that must carry a gradient goes through math attention (the kernel has no backward)
    q.requires_grad_()
    tangent = attention_tangent(q, k, v, dq, dk, dv)
    assert calls == [1] and relative(tangent.detach(), want) < 1e-4
    tangent.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
