"""Flash-attention JVP: value and tangent of softmax(q k^T / sqrt(d)) v in one tiled pass (Triton).

With S = q k^T / sqrt(d), P = softmax(S), o = P v and a tangent (dq, dk, dv):
    dS = (dq k^T + q dk^T) / sqrt(d),
    do_i = sum_j P_ij dS_ij v_j - (sum_j P_ij dS_ij) o_i + sum_j P_ij dv_j.
A query tile walks the key tiles once with the online softmax (running max m, running sum l), carrying
    acc_o = sum_j e^(S_ij - m) v_j,   acc_t = sum_j e^(S_ij - m) (dS_ij v_j + dv_j),   r = sum_j e^(S_ij - m) dS_ij,
all rescaled by e^(m_old - m_new) when the running max moves. At the end o = acc_o / l,
do = acc_t / l - (r / l) o and the log-sum-exp is m + log l. Memory is O(T d), never O(T^2).

Gradients: the kernel computes no backward. sCM needs the tangent without a gradient (the call runs under
torch.no_grad()); a loss that needs the value's gradient (MeanFlow) takes it from the ordinary fused SDPA,
whose value is the same function (cm.nn.scaled_dot_product_attention keeps the value and backward on SDPA and
uses this kernel for the tangent only).

Triton is imported lazily: `available()` says whether the kernel can run (Triton installed, and a CUDA device
or TRITON_INTERPRET=1 for the CPU interpreter used in tests).
"""

import functools
import os

import torch

BLOCK_M = 32  # query rows per program
BLOCK_N = 32  # key rows per inner step
MIN_BLOCK_D = 16  # tl.dot needs inner dimensions of at least 16
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def _triton():
    """The triton module, or None when it is not installed."""
    try:
        import triton
    except ImportError:
        return None
    return triton


def interpreted():
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device):
    """True when the kernel can run on tensors of `device`: Triton installed, and CUDA (or the interpreter on CPU)."""
    if _triton() is None:
        return False
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and interpreted())


@functools.lru_cache(maxsize=None)
def _kernel():
    """Compile-time definition of the Triton kernel (built on first use, so importing cm needs no Triton)."""
    triton = _triton()
    import triton.language as tl

    @triton.jit
    def attention_jvp_kernel(
        Q, K, V, DQ, DK, DV, O, DO, LSE,
        stride_qb, stride_qt, stride_kb, stride_kt, stride_ob, stride_ot,
        len_q, len_k, head_dim, scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        batch = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < len_q
        col_ok = cols < head_dim
        q_offsets = batch * stride_qb + rows[:, None] * stride_qt + cols[None, :]
        q_mask = row_ok[:, None] & col_ok[None, :]
        q = tl.load(Q + q_offsets, mask=q_mask, other=0.0)
        dq = tl.load(DQ + q_offsets, mask=q_mask, other=0.0)
        if UPCAST:
            q, dq = q.to(tl.float32), dq.to(tl.float32)

        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        r = tl.zeros([BLOCK_M], tl.float32)
        acc_o = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, len_k, BLOCK_N):
            keys = start + tl.arange(0, BLOCK_N)
            key_ok = keys < len_k
            kv_offsets = batch * stride_kb + keys[:, None] * stride_kt + cols[None, :]
            kv_mask = key_ok[:, None] & col_ok[None, :]
            k = tl.load(K + kv_offsets, mask=kv_mask, other=0.0)
            v = tl.load(V + kv_offsets, mask=kv_mask, other=0.0)
            dk = tl.load(DK + kv_offsets, mask=kv_mask, other=0.0)
            dv = tl.load(DV + kv_offsets, mask=kv_mask, other=0.0)
            if UPCAST:
                k, v, dk, dv = k.to(tl.float32), v.to(tl.float32), dk.to(tl.float32), dv.to(tl.float32)
            # scores and their tangent for this tile
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            ds = tl.dot(dq, tl.trans(k), input_precision=PRECISION)
            ds = (ds + tl.dot(q, tl.trans(dk), input_precision=PRECISION)) * scale
            s = tl.where(key_ok[None, :], s, float("-inf"))
            # online softmax: move the running max, rescale what was carried
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            pds = p * ds
            l = l * alpha + tl.sum(p, axis=1)
            r = r * alpha + tl.sum(pds, axis=1)
            p_v = p.to(v.dtype)
            acc_o = acc_o * alpha[:, None] + tl.dot(p_v, v, input_precision=PRECISION)
            acc_t = acc_t * alpha[:, None] + tl.dot(pds.to(v.dtype), v, input_precision=PRECISION)
            acc_t += tl.dot(p_v, dv, input_precision=PRECISION)
            m = m_new

        o = acc_o / l[:, None]
        do = acc_t / l[:, None] - (r / l)[:, None] * o
        o_offsets = batch * stride_ob + rows[:, None] * stride_ot + cols[None, :]
        tl.store(O + o_offsets, o.to(O.dtype.element_ty), mask=q_mask)
        tl.store(DO + o_offsets, do.to(DO.dtype.element_ty), mask=q_mask)
        tl.store(LSE + batch * len_q + rows, m + tl.log(l), mask=row_ok)

    return attention_jvp_kernel


def _check(q, k, v, dq, dk, dv):
    """One-line errors for inputs the kernel cannot take."""
    if not available(q.device):
        raise RuntimeError(
            f"the Triton attention JVP needs Triton and a CUDA device (or TRITON_INTERPRET=1 on CPU); got "
            f"{q.device.type} with Triton {'installed' if _triton() else 'missing'}: use cm.nn.math_attention's JVP"
        )
    if q.ndim < 2 or k.shape != v.shape or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"attention wants q [..., Tq, D] and k, v [..., Tk, D] with equal leading dims, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    for name, (primal, tangent) in {"q": (q, dq), "k": (k, dk), "v": (v, dv)}.items():
        if tangent.shape != primal.shape:
            raise ValueError(
                f"tangent d{name} has shape {tuple(tangent.shape)}, its primal {tuple(primal.shape)}"
            )
    if len({t.dtype for t in (q, k, v, dq, dk, dv)}) != 1 or q.dtype not in DTYPES:
        raise ValueError(
            f"q, k, v and their tangents must share one dtype of {', '.join(map(str, DTYPES))}, got "
            f"{sorted({str(t.dtype) for t in (q, k, v, dq, dk, dv)})}; cast them first"
        )


def attention_jvp(q, k, v, dq, dk, dv):
    """(o, do, lse) of o = softmax(q k^T / sqrt(d)) v at tangent (dq, dk, dv), in one tiled pass.

    q [..., Tq, D], k and v [..., Tk, D]; o and do come in q's dtype, the log-sum-exp lse [..., Tq] in float32.
    Accumulation is in float32; float32 inputs use full-precision (IEEE, not TF32) products.
    """
    _check(q, k, v, dq, dk, dv)
    triton = _triton()
    *lead, len_q, head_dim = q.shape
    len_k = k.shape[-2]
    flat = lambda t, n: t.reshape(-1, n, head_dim).contiguous()  # noqa: E731
    q, dq = flat(q, len_q), flat(dq, len_q)
    k, v, dk, dv = (flat(t, len_k) for t in (k, v, dk, dv))
    out, d_out = torch.empty_like(q), torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    block_d = max(MIN_BLOCK_D, triton.next_power_of_2(head_dim))
    grid = (triton.cdiv(len_q, BLOCK_M), q.shape[0])
    _kernel()[grid](
        q, k, v, dq, dk, dv, out, d_out, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        len_q, len_k, head_dim, head_dim**-0.5,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        PRECISION="ieee",
        # the interpreter's half-precision tl.dot is wrong (Triton 3.8): it multiplies float32 copies instead
        UPCAST=interpreted() and q.dtype != torch.float32,
    )  # fmt: skip
    shape = (*lead, len_q, head_dim)
    return out.reshape(shape), d_out.reshape(shape), lse.reshape(*lead, len_q)
