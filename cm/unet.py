"""ADM UNet (Dhariwal & Nichol 2021) as used by the consistency-model checkpoints.

Parameter names and shapes equal those of openai/consistency_models' `cm/unet.py` for every
configuration, so its released checkpoints load with `strict=True`. Attention is computed with
`torch.nn.functional.scaled_dot_product_attention` for both qkv channel layouts:

* ``attention_type="flash"`` (the reference's default, used by every released checkpoint) and
  ``attention_type="legacy"`` (the reference's ``QKVAttentionLegacy``, which reads the same order):
  the 3C qkv channels are ordered ``(three, heads, head_dim)``: all query heads, then all key heads,
  then all value heads.
* ``attention_type="guided"``: guided-diffusion's ``QKVAttentionLegacy`` order
  ``(heads, three, head_dim)``: q, k, v of head 0, then of head 1, ...; with
  ``use_new_attention_order=True`` it reads ``(three, heads, head_dim)`` as guided-diffusion's
  ``QKVAttention`` does.

`convert_qkv_layout` permutes a state dict from one layout to the other; the two models then
compute the same function.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .half_precision import HalfPrecisionBody
from .nn import (
    at_least_float32,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    float32_time_embedding,
    linear,
    normalization,
    pixel_norm,
    scaled_dot_product_attention,
    timestep_embedding,
    zero_module,
)

ATTENTION_TYPES = ("flash", "legacy", "guided")


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x, emb):  # pragma: no cover - interface
        raise TypeError(f"{type(self).__name__} must override forward(x, emb)")


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """nn.Sequential that hands the timestep embedding to the children that take it."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class _Resample(nn.Module):
    """What Upsample and Downsample both record: channels in and out, learned or not, 1-D / 2-D / 3-D."""

    def __init__(self, channels, use_conv, dims, out_channels):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims


class Upsample(_Resample):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 convolution."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__(channels, use_conv, dims, out_channels)
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(_Resample):
    """2x downsampling by a strided 3x3 convolution or by average pooling."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__(channels, use_conv, dims, out_channels)
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("pooling downsample cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (additive or scale-shift / FiLM).

    :param channels: input channels.
    :param emb_channels: width of the timestep embedding.
    :param dropout: dropout probability before the last convolution.
    :param out_channels: output channels (default: channels).
    :param use_conv: 3x3 instead of 1x1 convolution on the skip path when the width changes.
    :param use_scale_shift_norm: condition as norm(h) * (1 + scale) + shift.
    :param adaptive_double_norm: with use_scale_shift_norm, norm(h) * pnorm(1 + scale) + pnorm(shift) (sCM Sec. 4.1,
        pnorm = pixel_norm over channels); no parameters of its own.
    :param dims: 1, 2 or 3 spatial dimensions.
    :param use_checkpoint: recompute activations in backward to save memory.
    :param up, down: make this block resample by 2.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
        adaptive_double_norm=False,
    ):
        super().__init__()
        if adaptive_double_norm and not use_scale_shift_norm:
            raise ValueError("adaptive_double_norm normalises the scale and shift of use_scale_shift_norm; set both")
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.adaptive_double_norm = adaptive_double_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), (), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out[(...,) + (None,) * (h.ndim - emb_out.ndim)]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            scale = 1 + scale
            if self.adaptive_double_norm:
                scale, shift = pixel_norm(scale), pixel_norm(shift)
            h = self.out_layers[0](h) * scale + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def split_qkv(qkv, num_heads, layout):
    """Split [B, 3*H*D, T] qkv channels into q, k, v of shape [B, H, T, D]: (three, H, D) for "flash" and
    "legacy" (the reference's einops pattern "b (three h d) s"), (H, three, D) for "guided"."""
    if layout not in ATTENTION_TYPES:
        raise ValueError(f"unknown qkv layout {layout!r}; allowed: {', '.join(ATTENTION_TYPES)}")
    b, width, length = qkv.shape
    d = width // (3 * num_heads)
    if layout == "guided":
        q, k, v = qkv.reshape(b, num_heads, 3, d, length).unbind(2)
    else:
        q, k, v = qkv.reshape(b, 3, num_heads, d, length).unbind(1)
    # contiguous [B, H, T, D] lets SDPA use its fast kernel
    return q.transpose(-1, -2).contiguous(), k.transpose(-1, -2).contiguous(), v.transpose(-1, -2).contiguous()


def qkv_attention(qkv, num_heads, layout="flash", encoder_kv=None):
    """Multi-head self-attention softmax(q k^T / sqrt(d)) v on [B, 3*H*D, T]; returns [B, H*D, T].

    :param encoder_kv: optional [B, 2*H*D, S] keys and values, (two, H, D) ordered, attended to before the
        T positions (the reference's QKVAttention).
    """
    q, k, v = split_qkv(qkv, num_heads, layout)
    if encoder_kv is not None:
        b, _, s = encoder_kv.shape
        ek, ev = encoder_kv.reshape(b, 2, num_heads, -1, s).transpose(-1, -2).unbind(1)
        k, v = torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=2)
    out = scaled_dot_product_attention(q, k, v)
    b, h, t, d = out.shape
    return out.transpose(-1, -2).reshape(b, h * d, t)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection: x + proj_out(attention(qkv(norm(x)))).

    :param channels: width C; split into heads of num_head_channels (or num_heads heads).
    :param attention_type: "flash" or "legacy" (the reference's two, both the (three, heads, head_dim)
        qkv layout of the released checkpoints) or "guided" (guided-diffusion's (heads, three, head_dim)).
    :param use_new_attention_order: with "guided", read (three, heads, head_dim) (guided-diffusion's QKVAttention).
    :param encoder_channels: width of an optional encoder sequence [B, encoder_channels, S] that forward's
        encoder_out adds to the keys and values (the reference accepts it but its legacy path cannot run it).
    :param channels_last: accepted for the reference's signature, which ignores it too (memory format
        follows the input).
    """

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        attention_type="flash",
        encoder_channels=None,
        dims=2,
        channels_last=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"unknown attention_type {attention_type!r}; allowed: {', '.join(ATTENTION_TYPES)}")
        self.channels = channels
        if num_head_channels == -1:
            if channels % num_heads:
                raise ValueError(f"num_heads {num_heads} does not divide the attention width {channels}")
            self.num_heads = num_heads
        else:
            if num_head_channels <= 0 or channels % num_head_channels:
                raise ValueError(
                    f"num_head_channels {num_head_channels} does not divide the attention width {channels}"
                )
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.attention_type = attention_type
        self.layout = "flash" if (attention_type == "guided" and use_new_attention_order) else attention_type
        self.norm = normalization(channels)
        self.qkv = conv_nd(dims, channels, channels * 3, 1)
        if encoder_channels is not None:
            self.encoder_kv = conv_nd(1, encoder_channels, channels * 2, 1)
        self.proj_out = zero_module(conv_nd(dims, channels, channels, 1))

    def forward(self, x, encoder_out=None):
        if encoder_out is None:
            return checkpoint(self._forward, (x,), (), self.use_checkpoint)
        return checkpoint(self._forward, (x, encoder_out), (), self.use_checkpoint)

    def _forward(self, x, encoder_out=None):
        b, c, *spatial = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3 * c, -1)
        encoder_kv = None
        if encoder_out is not None:
            if not hasattr(self, "encoder_kv"):
                raise ValueError("encoder_out needs an AttentionBlock built with encoder_channels")
            encoder_kv = self.encoder_kv(encoder_out)
        h = qkv_attention(qkv, self.num_heads, self.layout, encoder_kv).reshape(b, c, *spatial)
        return x + self.proj_out(h)


def count_flops_attn(model, _x, y):
    """thop counter for an attention module: 2 b T^2 c multiply-adds (q k^T and the weighted sum of v)."""
    b, c, *spatial = y[0].shape
    tokens = math.prod(spatial)
    model.total_ops += torch.DoubleTensor([2 * b * tokens**2 * c])


class QKVAttentionLegacy(nn.Module):
    """The reference's legacy attention: [N, 3*H*C, T] qkv read as (three, H, C) -> [N, H*C, T], by SDPA.

    The reference casts q, k, v to float16 and returns float32; this computes in the input's dtype.
    """

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        return qkv_attention(qkv, self.n_heads, "legacy")

    @staticmethod
    def count_flops(model, _x, y):
        return count_flops_attn(model, _x, y)


class QKVAttention(nn.Module):
    """The reference's QKVAttention: [N, 3*H*C, T] qkv read as (three, H, C), optional encoder keys and values
    [N, 2*H*C, S] attended to first -> [N, H*C, T], by SDPA."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv, encoder_kv=None):
        return qkv_attention(qkv, self.n_heads, "flash", encoder_kv)

    @staticmethod
    def count_flops(model, _x, y):
        return count_flops_attn(model, _x, y)


class QKVFlashAttention(nn.Module):
    """The reference's flash-attn module, by SDPA on any device and dtype: [N, 3*H*D, T] qkv in the
    "b (three h d) s" order -> [N, H*D, T]. The reference's head-size limit (16, 32, 64) does not apply.

    :param attention_dropout: dropout on the attention weights while training.
    :param causal: position t attends to positions <= t only.
    """

    def __init__(
        self,
        embed_dim,
        num_heads,
        batch_first=True,
        attention_dropout=0.0,
        causal=False,
        device=None,
        dtype=None,
        **kwargs,
    ):
        super().__init__()
        if not batch_first:
            raise ValueError("QKVFlashAttention supports batch_first=True only (as the reference)")
        if embed_dim % num_heads:
            raise ValueError(f"num_heads {num_heads} does not divide embed_dim {embed_dim}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.attention_dropout = attention_dropout
        self.causal = causal

    def forward(self, qkv, attn_mask=None, key_padding_mask=None, need_weights=False):
        """need_weights is accepted and no weights are returned (as the reference). Masks are boolean, True
        where attending is allowed: attn_mask [T, T] or [N, H, T, T], key_padding_mask [N, T]."""
        dropout = self.attention_dropout if self.training else 0.0
        if attn_mask is None and key_padding_mask is None and not self.causal and not dropout:
            return qkv_attention(qkv, self.num_heads, "flash")
        q, k, v = split_qkv(qkv, self.num_heads, "flash")
        length = q.shape[2]
        mask = torch.ones(length, length, dtype=torch.bool, device=qkv.device)
        if self.causal:
            mask = mask.tril()
        if attn_mask is not None:
            mask = mask & attn_mask.bool()
        if key_padding_mask is not None:
            mask = mask & key_padding_mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        b, h, t, d = out.shape
        return out.transpose(-1, -2).reshape(b, h * d, t)


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling (the reference keeps it, unused by the UNet): the mean token, with learned
    position embeddings, attends over all positions; returns [N, output_dim]."""

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        return self.c_proj(self.attention(self.qkv_proj(x)))[:, :, 0]


def convert_qkv_layout(state_dict, num_heads_of, to_layout):
    """Permute every attention block's qkv weights between the (three, heads, dim) and (heads, three, dim) layouts.

    :param state_dict: a UNetModel state dict (not modified; a new dict is returned).
    :param num_heads_of: maps an attention block prefix (e.g. "input_blocks.4.1.") to its head count.
    :param to_layout: the attention_type the returned state dict is for: "guided" permutes from
        (three, heads, dim) to (heads, three, dim); "flash" and "legacy" permute back.
    """
    if to_layout not in ATTENTION_TYPES:
        raise ValueError(f"unknown layout {to_layout!r}; allowed: {', '.join(ATTENTION_TYPES)}")
    out = dict(state_dict)
    for prefix, heads in num_heads_of.items():
        for suffix in ("qkv.weight", "qkv.bias"):
            w = state_dict[prefix + suffix]
            width = w.shape[0]
            d = width // (3 * heads)
            rest = w.shape[1:]
            if to_layout == "guided":  # (three h d) -> (h three d)
                w = w.reshape(3, heads, d, *rest).transpose(0, 1)
            else:  # (h three d) -> (three h d)
                w = w.reshape(heads, 3, d, *rest).transpose(0, 1)
            out[prefix + suffix] = w.reshape(width, *rest).contiguous()
    return out


def attention_heads(model):
    """Map each AttentionBlock's state-dict prefix in `model` to its number of heads."""
    return {f"{name}.": m.num_heads for name, m in model.named_modules() if isinstance(m, AttentionBlock)}


GUIDANCE_EMBED_SCALE = 1000.0  # LCM's guidance-scale embedding multiplies w by 1000 before the sinusoids


def guidance_features(w, dim):
    """Sinusoidal features of guidance scales w [N] (LCM's w-embedding: timestep_embedding of 1000 w)."""
    return timestep_embedding(GUIDANCE_EMBED_SCALE * w.float(), dim)


def check_conditioning(x, y, guidance, num_classes, guidance_embed, second_time=None, second_time_embed=False):
    """One line when labels, guidance scales or second times are given to a network that takes none (or missing where
    it does), or labels are not one per image of x."""
    if (second_time is not None) != second_time_embed:
        raise ValueError(
            "pass a second time if and only if the model was built with second_time_embed "
            f"(second_time_embed={second_time_embed}, second_time {'given' if second_time is not None else 'missing'})"
        )
    if (y is not None) != (num_classes is not None):
        raise ValueError(
            "pass class labels y if and only if the model is class-conditional "
            f"(num_classes={num_classes}, y {'given' if y is not None else 'missing'})"
        )
    if (guidance is not None) != guidance_embed:
        raise ValueError(
            "pass guidance scales if and only if the model was built with guidance_embed "
            f"(guidance_embed={guidance_embed}, guidance {'given' if guidance is not None else 'missing'})"
        )
    if y is not None and y.shape != (x.shape[0],):
        raise ValueError(f"labels y must have shape ({x.shape[0]},), got {tuple(y.shape)}")


def downsample_rates(channel_mult):
    """Downsample rates 1, 2, 4, ... that a UNet with these channel multipliers passes through."""
    return [2**i for i in range(len(channel_mult))]


class UNetModel(HalfPrecisionBody, nn.Module):
    """The ADM UNet with timestep (and optional class) conditioning.

    :param image_size: input resolution (used for validation and bookkeeping).
    :param in_channels: channels of the input image.
    :param model_channels: base width; level i has channel_mult[i] * model_channels channels.
    :param out_channels: channels of the output.
    :param num_res_blocks: residual blocks per resolution level.
    :param attention_resolutions: downsample rates (1, 2, 4, ...) at which to apply attention.
    :param dropout: dropout probability in every residual block.
    :param channel_mult: width multiplier per level; the UNet halves resolution len-1 times.
    :param conv_resample: learned 3x3 convolutions for up/downsampling (else nearest / avg-pool).
    :param dims: 1, 2 or 3 spatial dimensions.
    :param num_classes: number of classes for class conditioning (None: unconditional).
    :param use_checkpoint: gradient checkpointing in residual and attention blocks.
    :param use_fp16: self.dtype float16; convert_to_fp16 (as the sampling scripts do) makes the body run in it,
        before that the network runs in float32 (the trainer autocasts instead).
    :param num_heads: attention heads when num_head_channels is -1.
    :param num_head_channels: fixed width per attention head (-1: use num_heads).
    :param num_heads_upsample: heads in the decoder (-1: same as num_heads).
    :param use_scale_shift_norm: FiLM-like conditioning in residual blocks.
    :param adaptive_double_norm: sCM's adaptive double normalisation of that conditioning (see ResBlock); the
        parameters stay the reference's.
    :param resblock_updown: residual blocks (instead of plain layers) for up/downsampling.
    :param use_new_attention_order: with attention_type "guided", the (three, heads, head_dim) qkv layout.
    :param attention_type: "flash" or "legacy" (the reference's; the released checkpoints' qkv layout) or
        "guided" (guided-diffusion's (heads, three, head_dim) layout); always SDPA.
    :param null_class: classifier-free guidance: the label embedding gets one more row, the null label
        `num_classes` (`self.null_label`); off, the parameters are the reference's.
    :param guidance_embed: the network also takes a guidance scale w [N] (`guidance=`), embedded like a time and
        projected by a zero-initialised layer onto the time features (LCM, Luo et al. 2023, Sec. 4.2); off, the
        parameters are the reference's.
    :param fp32_time_embedding: compute the time (and label, guidance) embedding in float32 under autocast
        (cm.nn.float32_time_embedding); off, the reference's precision. Parameters are the same either way.
    :param second_time_embed: the network also takes a second time (`second_time=`, a flow map's h = t - r) through
        its own embedding MLP, summed with the first's (MeanFlow, Geng et al. 2025, Sec. 4.3); off, the parameters
        are the reference's.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        attention_type="flash",
        adaptive_double_norm=False,
        null_class=False,
        guidance_embed=False,
        fp32_time_embedding=False,
        second_time_embed=False,
    ):
        super().__init__()
        if null_class and num_classes is None:
            raise ValueError("null_class (classifier-free guidance) needs a class-conditional model (class_cond true)")
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"unknown attention_type {attention_type!r}; allowed: {', '.join(ATTENTION_TYPES)}")
        levels = downsample_rates(channel_mult)
        unreached = sorted(set(attention_resolutions) - set(levels))
        if unreached:
            raise ValueError(
                f"attention at downsample rate(s) {unreached} is never reached; "
                f"this UNet passes through rates {levels}"
            )
        if image_size % levels[-1]:
            raise ValueError(
                f"image_size {image_size} is not divisible by {levels[-1]}, "
                f"the total downsampling of channel_mult {tuple(channel_mult)}"
            )
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.null_label = num_classes if null_class else None
        self.fp32_time_embedding = fp32_time_embedding
        self.two_times = second_time_embed
        self.guidance_embed = guidance_embed
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.attention_type = attention_type

        def res_block(ch, out_ch, **kw):
            return ResBlock(
                ch,
                time_embed_dim,
                dropout,
                out_channels=out_ch,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                adaptive_double_norm=adaptive_double_norm,
                **kw,
            )

        def attention(ch, heads):
            return AttentionBlock(
                ch,
                use_checkpoint=use_checkpoint,
                num_heads=heads,
                num_head_channels=num_head_channels,
                attention_type=attention_type,
                dims=dims,
                use_new_attention_order=use_new_attention_order,
            )

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + int(null_class), time_embed_dim)
        if guidance_embed:
            self.guidance_proj = zero_module(linear(model_channels, model_channels, bias=False))
        if second_time_embed:
            self.second_time_embed = nn.Sequential(
                linear(model_channels, time_embed_dim),
                nn.SiLU(),
                linear(time_embed_dim, time_embed_dim),
            )

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = (
                    res_block(ch, ch, down=True)
                    if resblock_updown
                    else Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, None),
            attention(ch, num_heads),
            res_block(ch, None),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [res_block(ch + ich, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    up = (
                        res_block(ch, ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, input_ch, out_channels, 3, padding=1)),
        )

    def body(self):
        """The parts that convert_to_fp16 runs in half precision (the embeddings and the output head stay)."""
        return (self.input_blocks, self.middle_block, self.output_blocks)

    def embed(self, timesteps, y=None, guidance=None, second_time=None):
        """The conditioning vector emb [N, 4 model_channels] of timesteps, labels, guidance scales and second times."""
        if self.fp32_time_embedding:
            timesteps = at_least_float32(timesteps)
            second_time = None if second_time is None else at_least_float32(second_time)
        features = timestep_embedding(timesteps, self.model_channels)
        if self.guidance_embed:
            guidance_emb = guidance_features(guidance, self.model_channels).to(features.dtype)
            features = features + self.guidance_proj(guidance_emb)
        emb = self.time_embed(features)
        if self.two_times:
            emb = emb + self.second_time_embed(timestep_embedding(second_time, self.model_channels).to(features.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        return emb

    def forward(self, x, timesteps, y=None, guidance=None, second_time=None):
        """Apply the UNet to x [N, C, ...] at timesteps [N] (rescaled noise levels), labels y [N], guidance scales
        guidance [N] (models with guidance_embed), second times [N] (models with second_time_embed)."""
        check_conditioning(x, y, guidance, self.num_classes, self.guidance_embed, second_time, self.two_times)
        with float32_time_embedding(self.fp32_time_embedding, x.device):
            emb = self.embed(timesteps, y, guidance, second_time)

        hs = []
        h = x.type(self.body_dtype())
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for module in self.output_blocks:
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))
