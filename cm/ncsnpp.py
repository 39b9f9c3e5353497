"""NCSN++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs", Sec. 4.4 and App. H).

The network of the CM paper's CIFAR-10 experiments (Song et al. 2023), as configured in
openai/consistency_models_cifar10 (56.4M parameters). Same call convention as the ADM UNet:
``net(c_in * x, rescaled_t, y=None)`` with ``rescaled_t = 1000 * 0.25 * log(sigma)``, the c_noise that
`cm.karras_diffusion.KarrasDenoiser.denoise` feeds every network. The network never preconditions.

Noise-level embedding (``embedding_type``):

* ``fourier``: Gaussian Fourier features of ``rescaled_t / 1000 = 0.25 * log(sigma)``. This is exactly the
  ``cond_t = 0.25 * log(t)`` that openai/consistency_models_cifar10 hands its NCSN++ (whose Fourier layer
  takes the conditioning value as is), so a scale of 16 sees the same frequencies as in the paper's runs.
* ``positional``: the DDPM / Transformer sinusoidal embedding of ``rescaled_t`` itself, the input the
  ADM UNet embeds; its range (about -1550 to 1100 for sigma in [0.002, 80]) is the scale of DDPM step
  indices that this embedding was designed for, whereas 0.25 * log(sigma) would leave its low frequencies
  flat.

Parameter counts equal those of score_sde_pytorch's ``NCSNpp`` for every option here with
``conditional=True`` (its Fourier weights W, a frozen parameter there, are a buffer here). FIR resampling
(StyleGAN2's ``upfirdn2d``) is written as plain PyTorch matrix products, so it runs on every device and dtype.
"""

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .half_precision import HalfPrecisionBody
from .nn import C_NOISE_SCALE, GroupNorm32, at_least_float32, float32_time_embedding, scaled_dot_product_attention

RESBLOCK_TYPES = ("biggan", "ddpm")
PROGRESSIVE_MODES = ("none", "output_skip", "residual")
PROGRESSIVE_INPUT_MODES = ("none", "input_skip", "residual")
PROGRESSIVE_COMBINES = ("sum", "cat")
EMBEDDING_TYPES = ("fourier", "positional")

SKIP_SCALE = 1 / math.sqrt(2)  # skip_rescale: (x + h) / sqrt(2) keeps the variance of a residual sum


# ----- initialisation --------------------------------------------------------------------------


def ddpm_init_(weight, scale=1.0):
    """DDPM's default_init in place: uniform variance scaling, fan_avg mode; scale 0 means 1e-10 (as score_sde)."""
    scale = 1e-10 if scale == 0 else scale
    receptive = weight[0, 0].numel() if weight.ndim > 2 else 1
    fan_avg = (weight.shape[0] + weight.shape[1]) * receptive / 2
    bound = math.sqrt(3 * scale / fan_avg)
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def conv2d(in_ch, out_ch, kernel_size, init_scale=1.0, **kwargs):
    """A convolution with DDPM initialisation and zero bias (score_sde's ddpm_conv3x3 / ddpm_conv1x1 / NIN)."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size, padding=kwargs.pop("padding", kernel_size // 2), **kwargs)
    ddpm_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def linear(in_features, out_features):
    """A linear layer with DDPM initialisation and zero bias."""
    layer = nn.Linear(in_features, out_features)
    ddpm_init_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def group_norm(channels):
    """score_sde's normalisation: min(C // 4, 32) groups, eps 1e-6, computed in float32."""
    groups = min(channels // 4, 32)
    if groups < 1 or channels % groups:
        raise ValueError(f"a width of {channels} channels does not fit GroupNorm with min(C // 4, 32) groups")
    return GroupNorm32(groups, channels, eps=1e-6)


# ----- FIR resampling (StyleGAN2 upfirdn2d, plain PyTorch) --------------------------------------


def parse_fir_kernel(fir_kernel):
    """'1,3,3,1' or a sequence of numbers -> tuple of float taps; ValueError for anything else."""
    try:
        if isinstance(fir_kernel, str):
            taps = tuple(float(v) for v in fir_kernel.split(",") if v.strip())
        else:
            taps = tuple(float(v) for v in fir_kernel)
    except (TypeError, ValueError):
        raise ValueError(f"fir_kernel must be a comma list of numbers like '1,3,3,1', got {fir_kernel!r}") from None
    if not taps or sum(taps) == 0:
        raise ValueError(f"fir_kernel needs at least one tap and a non-zero sum, got {fir_kernel!r}")
    return taps


def fir_filter(taps):
    """1-D FIR taps normalised to sum 1; the 2-D kernel is their outer product (StyleGAN2 _setup_kernel)."""
    k = torch.tensor(taps, dtype=torch.float32)
    return k / k.sum()


def fir_matrix(taps, size, up=1, down=1, pad=(0, 0)):
    """The [out, size] matrix of 1-D upfirdn along one axis: zero insertion, padding, convolution, decimation.

    Entry (o, i) is the tap that carries input sample i (at i * up + pad[0] after upsampling and padding)
    to output o (at o * down); out = (size * up + pad[0] + pad[1] - len(taps)) // down + 1.
    """
    out = (size * up + pad[0] + pad[1] - taps.shape[0]) // down + 1
    o = torch.arange(out, device=taps.device)[:, None]
    i = torch.arange(size, device=taps.device)[None, :]
    j = i * up + pad[0] - o * down  # position under the flipped kernel
    inside = (j >= 0) & (j < taps.shape[0])
    return torch.where(inside, taps.flip(0)[j.clamp(0, taps.shape[0] - 1)], taps.new_zeros(()))


def upfirdn2d(x, taps, up=1, down=1, pad=(0, 0)):
    """StyleGAN2's upfirdn2d with the separable kernel outer(taps, taps): one matrix product per axis.

    Per channel: upsample by zero insertion, pad (negative crops), convolve, keep every down-th pixel.
    """
    taps = taps.to(x.dtype)
    rows = fir_matrix(taps, x.shape[-2], up, down, pad)
    cols = fir_matrix(taps, x.shape[-1], up, down, pad)
    return torch.matmul(torch.matmul(rows, x), cols.T)


def fir_upsample(x, taps, factor=2):
    """2x FIR upsampling (StyleGAN2 upsample_2d); `taps` sum to 1 (gain `factor` per axis)."""
    p = taps.shape[0] - factor
    return upfirdn2d(x, taps * factor, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def fir_downsample(x, taps, factor=2):
    """2x FIR downsampling (StyleGAN2 downsample_2d); `taps` sum to 1."""
    p = taps.shape[0] - factor
    return upfirdn2d(x, taps, down=factor, pad=((p + 1) // 2, p // 2))


def nearest_upsample(x):
    """2x nearest-neighbour upsampling (score_sde naive_upsample_2d)."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


def average_downsample(x):
    """2x2 average pooling (score_sde naive_downsample_2d)."""
    return F.avg_pool2d(x, 2)


class FirConv2d(nn.Conv2d):
    """3x3 convolution fused with 2x FIR resampling (StyleGAN2 upsample_conv_2d / conv_downsample_2d).

    :param in_ch, out_ch: channels.
    :param mode: "up" (transposed stride-2 conv, then FIR) or "down" (FIR, then stride-2 conv).
    :param taps: 1-D FIR taps, e.g. (1, 3, 3, 1).
    """

    def __init__(self, in_ch, out_ch, mode, taps):
        super().__init__(in_ch, out_ch, 3, padding=0)
        if mode not in ("up", "down"):
            raise ValueError(f"unknown FirConv2d mode {mode!r}; allowed: up, down")
        self.mode = mode
        self.register_buffer("fir", fir_filter(taps), persistent=False)
        ddpm_init_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x):
        taps = self.fir.shape[0]
        bias = self.bias.to(x.dtype)[:, None, None]
        if self.mode == "down":
            p = taps - 2 + 2
            x = upfirdn2d(x, self.fir, pad=((p + 1) // 2, p // 2))
            return F.conv2d(x, self.weight, stride=2) + bias
        p = taps - 2 - 2
        x = F.conv_transpose2d(x, self.weight.transpose(0, 1).flip([2, 3]), stride=2)
        return upfirdn2d(x, self.fir * 2, pad=((p + 1) // 2 + 1, p // 2 + 1)) + bias


# ----- layers -----------------------------------------------------------------------------------


class Upsample(nn.Module):
    """2x upsampling: FIR or nearest, with an optional learned 3x3 convolution (score_sde layerspp.Upsample).

    :param in_ch: input channels.
    :param out_ch: output channels (needs with_conv when it differs from in_ch).
    :param with_conv: learned convolution.
    :param fir_taps: FIR taps, or None for nearest-neighbour.
    """

    def __init__(self, in_ch, out_ch=None, with_conv=False, fir_taps=None):
        super().__init__()
        out_ch = out_ch or in_ch
        self.fir_taps = fir_taps
        self.conv = None
        if with_conv:
            self.conv = FirConv2d(in_ch, out_ch, "up", fir_taps) if fir_taps else conv2d(in_ch, out_ch, 3)
        elif fir_taps:
            self.register_buffer("fir", fir_filter(fir_taps), persistent=False)

    def forward(self, x, temb=None):
        if self.fir_taps and self.conv is not None:
            return self.conv(x)
        x = fir_upsample(x, self.fir) if self.fir_taps else nearest_upsample(x)
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """2x downsampling: FIR or 2x2 average, with an optional learned 3x3 convolution (score_sde layerspp.Downsample).

    :param in_ch: input channels.
    :param out_ch: output channels (needs with_conv when it differs from in_ch).
    :param with_conv: learned convolution (stride 2; without FIR, padded by one pixel right and bottom).
    :param fir_taps: FIR taps, or None for average pooling.
    """

    def __init__(self, in_ch, out_ch=None, with_conv=False, fir_taps=None):
        super().__init__()
        out_ch = out_ch or in_ch
        self.fir_taps = fir_taps
        self.conv = None
        if with_conv:
            if fir_taps:
                self.conv = FirConv2d(in_ch, out_ch, "down", fir_taps)
            else:
                self.conv = conv2d(in_ch, out_ch, 3, stride=2, padding=0)
        elif fir_taps:
            self.register_buffer("fir", fir_filter(fir_taps), persistent=False)

    def forward(self, x, temb=None):
        if self.conv is not None:
            return self.conv(x if self.fir_taps else F.pad(x, (0, 1, 0, 1)))
        return fir_downsample(x, self.fir) if self.fir_taps else average_downsample(x)


class ResnetBlock(nn.Module):
    """score_sde's ResnetBlockBigGANpp (`biggan`) and ResnetBlockDDPMpp (`ddpm`).

    h = Conv(act(GN(x))) + Dense(act(temb)); h = Conv(Dropout(act(GN(h)))); out = (skip(x) + h) [/ sqrt 2].

    :param in_ch: input channels.
    :param out_ch: output channels (default in_ch).
    :param temb_dim: width of the conditioning embedding (None: unconditional, no Dense layer).
    :param dropout: dropout probability before the last convolution.
    :param skip_rescale: divide the residual sum by sqrt(2).
    :param init_scale: initialisation scale of the last convolution (0: 1e-10).
    :param biggan: BigGAN block (1x1 skip conv at init scale 1 whenever the shape changes; may resample)
        rather than DDPM (1x1 skip at init scale 0.1 only when the width changes).
    :param resample: "none", "up" or "down" (BigGAN only): resample both paths after the first norm.
    :param fir_taps: FIR taps for resampling, or None for nearest / average.
    """

    def __init__(
        self,
        in_ch,
        out_ch=None,
        temb_dim=None,
        dropout=0.0,
        skip_rescale=True,
        init_scale=0.0,
        biggan=True,
        resample="none",
        fir_taps=None,
    ):
        super().__init__()
        out_ch = out_ch or in_ch
        if resample not in ("none", "up", "down") or (resample != "none" and not biggan):
            raise ValueError(f"resample {resample!r} needs a BigGAN block; allowed: none, up, down")
        self.resample = resample
        self.fir_taps = fir_taps
        if fir_taps:
            self.register_buffer("fir", fir_filter(fir_taps), persistent=False)
        self.skip_scale = SKIP_SCALE if skip_rescale else 1.0
        self.norm0 = group_norm(in_ch)
        self.conv0 = conv2d(in_ch, out_ch, 3)
        self.dense = linear(temb_dim, out_ch) if temb_dim is not None else None
        self.norm1 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv2d(out_ch, out_ch, 3, init_scale=init_scale)
        self.skip = None
        if in_ch != out_ch or resample != "none":
            self.skip = conv2d(in_ch, out_ch, 1, init_scale=1.0 if biggan else 0.1)

    def _resample(self, x):
        if self.resample == "up":
            return fir_upsample(x, self.fir) if self.fir_taps else nearest_upsample(x)
        if self.resample == "down":
            return fir_downsample(x, self.fir) if self.fir_taps else average_downsample(x)
        return x

    def forward(self, x, temb=None):
        h = self._resample(F.silu(self.norm0(x)))
        x = self._resample(x)
        h = self.conv0(h)
        if self.dense is not None:
            h = h + self.dense(F.silu(temb)).to(h.dtype)[:, :, None, None]
        h = self.conv1(self.dropout(F.silu(self.norm1(h))))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) * self.skip_scale


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection (score_sde AttnBlockpp), via SDPA.

    :param channels: width C (one head of dimension C, scale C^-1/2).
    :param skip_rescale: divide the residual sum by sqrt(2).
    :param init_scale: initialisation scale of the output projection (0: 1e-10).
    """

    def __init__(self, channels, skip_rescale=True, init_scale=0.0):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = conv2d(channels, 3 * channels, 1)
        for part in self.qkv.weight.data.chunk(3):  # q, k, v each initialised like score_sde's NIN (scale 0.1)
            ddpm_init_(part, 0.1)
        self.proj = conv2d(channels, channels, 1, init_scale=init_scale)
        self.skip_scale = SKIP_SCALE if skip_rescale else 1.0

    def forward(self, x, temb=None):
        b, c, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, 1, c, height * width).transpose(-1, -2).unbind(1)
        h = scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        h = h.transpose(-1, -2).reshape(b, c, height, width)
        return (x + self.proj(h)) * self.skip_scale


class TembSequential(nn.ModuleList):
    """Apply children in order, handing each the conditioning embedding."""

    def forward(self, x, temb=None):
        for layer in self:
            x = layer(x, temb)
        return x


# ----- progressive paths ------------------------------------------------------------------------


class InputSkip(nn.Module):
    """progressive_input "input_skip": downsample the image pyramid (no weights) and merge it by a 1x1 conv.

    :param pyramid_ch: channels of the image pyramid (the input image's).
    :param ch: channels of the feature map it is merged into.
    :param combine: "sum" (h + conv(pyramid)) or "cat" (concatenate: the width doubles).
    :param fir_taps: FIR taps for the pyramid's downsampling, or None for average pooling.
    """

    def __init__(self, pyramid_ch, ch, combine, fir_taps):
        super().__init__()
        self.down = Downsample(pyramid_ch, fir_taps=fir_taps)
        self.conv = conv2d(pyramid_ch, ch, 1)
        self.combine = combine

    def forward(self, pyramid, h):
        pyramid = self.down(pyramid)
        z = self.conv(pyramid)
        return (torch.cat([z, h], dim=1) if self.combine == "cat" else z + h), pyramid


class InputResidual(nn.Module):
    """progressive_input "residual": pyramid <- (conv-downsample(pyramid) + h) [/ sqrt 2], which also replaces h.

    :param pyramid_ch: channels of the pyramid so far.
    :param ch: channels of h.
    :param fir_taps: FIR taps of the strided convolution, or None for a plain one.
    :param skip_rescale: divide the sum by sqrt(2).
    """

    def __init__(self, pyramid_ch, ch, fir_taps, skip_rescale):
        super().__init__()
        self.down = Downsample(pyramid_ch, ch, with_conv=True, fir_taps=fir_taps)
        self.skip_scale = SKIP_SCALE if skip_rescale else 1.0

    def forward(self, pyramid, h):
        pyramid = (self.down(pyramid) + h) * self.skip_scale
        return pyramid, pyramid


class OutputSkip(nn.Module):
    """progressive "output_skip": the output is a sum of per-level 3x3 convs of act(GN(h)), upsampled (no weights).

    :param ch: channels of h at this level.
    :param out_ch: output channels of the network.
    :param init_scale: initialisation scale of the conv (0: 1e-10).
    :param fir_taps: FIR taps for the pyramid's upsampling, or None for nearest.
    """

    def __init__(self, ch, out_ch, init_scale, fir_taps):
        super().__init__()
        self.norm = group_norm(ch)
        self.conv = conv2d(ch, out_ch, 3, init_scale=init_scale)
        self.up = Upsample(out_ch, fir_taps=fir_taps)

    def forward(self, pyramid, h):
        z = self.conv(F.silu(self.norm(h)))
        return h, (z if pyramid is None else self.up(pyramid) + z)


class OutputResidual(nn.Module):
    """progressive "residual": the lowest level starts the pyramid with conv(act(GN(h))); above it,
    pyramid <- (conv-upsample(pyramid) + h) [/ sqrt 2], which also replaces h.

    :param pyramid_ch: channels of the pyramid coming from below (None at the lowest level).
    :param ch: channels of h.
    :param fir_taps: FIR taps of the upsampling convolution, or None for nearest + conv.
    :param skip_rescale: divide the sum by sqrt(2).
    """

    def __init__(self, pyramid_ch, ch, fir_taps, skip_rescale):
        super().__init__()
        self.first = pyramid_ch is None
        if self.first:
            self.norm = group_norm(ch)
            self.conv = conv2d(ch, ch, 3)
        else:
            self.up = Upsample(pyramid_ch, ch, with_conv=True, fir_taps=fir_taps)
        self.skip_scale = SKIP_SCALE if skip_rescale else 1.0

    def forward(self, pyramid, h):
        if self.first:
            return h, self.conv(F.silu(self.norm(h)))
        pyramid = (self.up(pyramid) + h) * self.skip_scale
        return pyramid, pyramid


class Level(nn.Module):
    """One resolution of the encoder or decoder (NCSNpp.forward applies the parts in the path's order).

    :param blocks: residual blocks (encoder: each with its attention) taking (x, temb).
    :param attn: decoder only: the attention block after the level's residual blocks, or None.
    :param merge: the progressive input / output module of this level, or None.
    :param resample: the 2x down- (encoder) or upsampling (decoder) layer taking (x, temb), or None.
    """

    def __init__(self, blocks, attn=None, merge=None, resample=None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = attn
        self.merge = merge
        self.resample = resample


# ----- embeddings -------------------------------------------------------------------------------


def fourier_features(x, weight):
    """Gaussian Fourier features [sin(2 pi x W), cos(2 pi x W)] (Tancik et al. 2020; score_sde, App. H)."""
    proj = x.to(weight.dtype)[:, None] * weight[None, :] * (2 * math.pi)
    return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


def sinusoidal_embedding(timesteps, dim, max_positions=10000):
    """DDPM sinusoidal embedding [sin(t f), cos(t f)], f_i = max_positions^(-i / (dim / 2 - 1)) (Ho et al. 2020)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_positions) / max(half - 1, 1) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    )
    args = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class NoiseEmbedding(nn.Module):
    """rescaled_t [B] -> noise-level features [B, out_dim] (see the module docstring for the two types).

    :param nf: base width; fourier gives 2 * nf features (nf frequencies), positional gives nf.
    :param embedding_type: "fourier" or "positional".
    :param fourier_scale: standard deviation of the Fourier frequencies W ~ N(0, scale^2) (a fixed buffer).
    """

    def __init__(self, nf, embedding_type, fourier_scale):
        super().__init__()
        self.embedding_type = embedding_type
        self.nf = nf
        if embedding_type == "fourier":
            self.register_buffer("W", torch.randn(nf) * fourier_scale)
        self.out_dim = 2 * nf if embedding_type == "fourier" else nf

    def forward(self, rescaled_t):
        if self.embedding_type == "fourier":
            return fourier_features(rescaled_t / C_NOISE_SCALE, self.W)
        return sinusoidal_embedding(rescaled_t, self.nf)


# ----- validation -------------------------------------------------------------------------------


def ncsnpp_config_errors(
    image_size,
    nf,
    ch_mult,
    attn_resolutions,
    dropout,
    resblock_type,
    progressive,
    progressive_input,
    progressive_combine,
    embedding_type,
    num_classes,
    fir,
    fir_kernel,
):
    """Every reason the options do not make a valid NCSN++, as sentences (empty list: valid)."""
    errors = []
    if fir:
        try:
            parse_fir_kernel(fir_kernel)
        except ValueError as e:
            errors.append(str(e))
    choices = (
        ("resblock_type", resblock_type, RESBLOCK_TYPES),
        ("progressive", progressive, PROGRESSIVE_MODES),
        ("progressive_input", progressive_input, PROGRESSIVE_INPUT_MODES),
        ("progressive_combine", progressive_combine, PROGRESSIVE_COMBINES),
        ("embedding_type", embedding_type, EMBEDDING_TYPES),
    )
    for name, value, allowed in choices:
        if value not in allowed:
            errors.append(f"unknown {name} {value!r} (allowed: {', '.join(allowed)})")
    if progressive_combine == "cat" and progressive_input != "input_skip":
        errors.append(
            f"progressive_combine 'cat' only applies to progressive_input 'input_skip', got {progressive_input!r} "
            "(use progressive_combine 'sum' with progressive_input none | residual)"
        )
    if not ch_mult:
        errors.append("ch_mult needs at least one level")
    factor = 2 ** max(len(ch_mult) - 1, 0)
    if image_size <= 0 or image_size % factor:
        errors.append(
            f"image_size {image_size} is not divisible by {factor}, the total downsampling of ch_mult {tuple(ch_mult)}"
        )
    resolutions = [image_size // 2**i for i in range(len(ch_mult))]
    unreached = sorted(set(attn_resolutions) - set(resolutions), reverse=True)
    if unreached:
        errors.append(
            f"attention resolution(s) {unreached} are never reached; the path passes through {resolutions} pixels"
        )
    widths = sorted({int(nf * m) for m in ch_mult})
    bad = [c for c in widths if c < 4 or c % min(c // 4, 32)]
    if bad:
        errors.append(f"channel widths {bad} (nf * ch_mult) do not fit GroupNorm with min(C // 4, 32) groups")
    if not 0 <= dropout < 1:
        errors.append(f"dropout must be in [0, 1), got {dropout}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        errors.append(f"num_classes must be None or a positive int, got {num_classes!r}")
    return errors


# ----- the network ------------------------------------------------------------------------------


class NCSNpp(HalfPrecisionBody, nn.Module):
    """NCSN++ (score_sde `ncsnpp`): a UNet of BigGAN / DDPM residual blocks with FIR resampling,
    optional progressive input / output pyramids, and a Fourier or positional noise embedding.

    :param image_size: input resolution in pixels (square).
    :param in_channels: channels of the input image.
    :param out_channels: channels of the output (default in_channels).
    :param nf: base width; level i has nf * ch_mult[i] channels.
    :param ch_mult: width multiplier per level; the network halves the resolution len(ch_mult) - 1 times.
    :param num_res_blocks: residual blocks per level (the decoder has one more per level).
    :param attn_resolutions: resolutions in pixels (e.g. (16,)) with self-attention; always one in the middle.
    :param dropout: dropout probability in every residual block.
    :param resamp_with_conv: learned convolutions in the DDPM-type up/downsampling layers (and pyramid).
    :param conditional: condition on the noise level (time-embedding MLP and per-block Dense layers).
    :param fir: FIR up/downsampling with fir_kernel; otherwise nearest-neighbour / average pooling.
    :param fir_kernel: 1-D FIR taps, a comma string like "1,3,3,1" or a sequence of numbers.
    :param skip_rescale: divide every residual / pyramid sum by sqrt(2).
    :param resblock_type: "biggan" (resampling inside residual blocks) or "ddpm" (separate layers).
    :param progressive: output path: "none", "output_skip" (sum of per-level outputs) or "residual".
    :param progressive_input: input path: "none", "input_skip" (image pyramid merged per level) or "residual".
    :param progressive_combine: how input_skip merges: "sum" or "cat" (cat only with input_skip).
    :param embedding_type: "fourier" (of 0.25 log sigma) or "positional" (of rescaled_t).
    :param fourier_scale: standard deviation of the Fourier frequencies (16 for CIFAR-10).
    :param init_scale: initialisation scale of every block's last layer and the output conv (0: 1e-10).
    :param num_classes: number of classes for class conditioning (None: unconditional); the label
        embedding is added to the time embedding.
    :param use_fp16: start with dtype float16 (call convert_to_fp16 as well; the trainer does).
    :param fp32_time_embedding: compute the noise-level (and label) embedding in float32 under autocast
        (cm.nn.float32_time_embedding); off, the reference's precision. Parameters are the same either way.
    :param second_time_embed: the network also takes a second time (`second_time=`, a flow map's h = t - r),
        embedded like the first by its own MLP and summed with it (MeanFlow, Geng et al. 2025, Sec. 4.3); off, the
        parameters are unchanged.
    """

    def __init__(
        self,
        image_size=32,
        in_channels=3,
        out_channels=None,
        nf=128,
        ch_mult=(2, 2, 2),
        num_res_blocks=4,
        attn_resolutions=(16,),
        dropout=0.0,
        resamp_with_conv=True,
        conditional=True,
        fir=True,
        fir_kernel=(1, 3, 3, 1),
        skip_rescale=True,
        resblock_type="biggan",
        progressive="none",
        progressive_input="residual",
        progressive_combine="sum",
        embedding_type="fourier",
        fourier_scale=16.0,
        init_scale=0.0,
        num_classes=None,
        use_fp16=False,
        fp32_time_embedding=False,
        second_time_embed=False,
    ):
        super().__init__()
        if second_time_embed and not conditional:
            raise ValueError("second_time_embed needs a noise-conditional NCSN++ (conditional true)")
        ch_mult = tuple(ch_mult)
        attn_resolutions = tuple(int(r) for r in attn_resolutions)
        errors = ncsnpp_config_errors(
            image_size, nf, ch_mult, attn_resolutions, dropout, resblock_type, progressive,
            progressive_input, progressive_combine, embedding_type, num_classes, fir, fir_kernel,
        )  # fmt: skip
        if errors:
            raise ValueError("invalid NCSN++ options: " + "; ".join(errors))
        taps = parse_fir_kernel(fir_kernel) if fir else None
        out_channels = out_channels or in_channels
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.conditional = conditional
        self.progressive = progressive
        self.progressive_input = progressive_input
        self.dtype = torch.float16 if use_fp16 else torch.float32
        self.fp32_time_embedding = fp32_time_embedding

        # noise-level (and label) embedding
        self.noise_embed = NoiseEmbedding(nf, embedding_type, fourier_scale)
        temb_dim = 4 * nf if (conditional or num_classes is not None) else None
        self.temb_mlp = None
        if conditional:
            self.temb_mlp = nn.Sequential(
                linear(self.noise_embed.out_dim, temb_dim), nn.SiLU(), linear(temb_dim, temb_dim)
            )
        self.two_times = second_time_embed
        if second_time_embed:
            self.second_time_mlp = nn.Sequential(
                linear(self.noise_embed.out_dim, temb_dim), nn.SiLU(), linear(temb_dim, temb_dim)
            )
        self.label_emb = nn.Embedding(num_classes, temb_dim) if num_classes is not None else None

        biggan = resblock_type == "biggan"

        def res_block(in_ch, out_ch=None, resample="none"):
            return ResnetBlock(
                in_ch, out_ch, temb_dim, dropout, skip_rescale, init_scale, biggan, resample, taps
            )  # fmt: skip

        def attn_block(ch):
            return AttnBlock(ch, skip_rescale, init_scale)

        def down(ch):
            if biggan:
                return res_block(ch, resample="down")
            return Downsample(ch, with_conv=resamp_with_conv, fir_taps=taps)

        def up(ch):
            if biggan:
                return res_block(ch, resample="up")
            return Upsample(ch, with_conv=resamp_with_conv, fir_taps=taps)

        # encoder
        resolutions = [image_size // 2**i for i in range(len(ch_mult))]
        self.stem = conv2d(in_channels, nf, 3)
        skip_chs, ch, pyramid_ch = [nf], nf, in_channels
        self.encoder = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                layers = [res_block(ch, int(nf * mult))]
                ch = int(nf * mult)
                if resolutions[i] in attn_resolutions:
                    layers.append(attn_block(ch))
                blocks.append(TembSequential(layers))
                skip_chs.append(ch)
            resample = merge = None
            if i != len(ch_mult) - 1:
                resample = down(ch)
                if progressive_input == "input_skip":
                    merge = InputSkip(pyramid_ch, ch, progressive_combine, taps)
                    ch = 2 * ch if progressive_combine == "cat" else ch
                elif progressive_input == "residual":
                    merge = InputResidual(pyramid_ch, ch, taps, skip_rescale)
                    pyramid_ch = ch
                skip_chs.append(ch)
            self.encoder.append(Level(blocks, merge=merge, resample=resample))

        self.middle = TembSequential([res_block(ch), attn_block(ch), res_block(ch)])

        # decoder
        self.decoder = nn.ModuleList()
        pyramid_ch = None
        for i in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(res_block(ch + skip_chs.pop(), int(nf * ch_mult[i])))
                ch = int(nf * ch_mult[i])
            attn = attn_block(ch) if resolutions[i] in attn_resolutions else None
            merge = None
            if progressive == "output_skip":
                merge = OutputSkip(ch, out_channels, init_scale, taps)
            elif progressive == "residual":
                merge = OutputResidual(pyramid_ch, ch, taps, skip_rescale)
                pyramid_ch = ch
            self.decoder.append(Level(blocks, attn=attn, merge=merge, resample=up(ch) if i else None))

        self.head = None
        if progressive != "output_skip":
            self.head = nn.Sequential(group_norm(ch), nn.SiLU(), conv2d(ch, out_channels, 3, init_scale=init_scale))

    def body(self):
        """The parts that run in half precision under convert_to_fp16."""
        return (self.stem, self.encoder, self.middle, self.decoder)

    def embed(self, timesteps, y, batch, second_time=None):
        """The conditioning vector temb [B, 4 nf] (or None when neither noise- nor class-conditional)."""
        if (second_time is not None) != self.two_times:
            raise ValueError(
                "pass a second time if and only if the model was built with second_time_embed "
                f"(second_time_embed={self.two_times}, second_time {'given' if second_time is not None else 'missing'})"
            )
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "pass class labels y if and only if the model is class-conditional "
                f"(num_classes={self.num_classes}, y {'given' if y is not None else 'missing'})"
            )
        if y is not None and y.shape != (batch,):
            raise ValueError(f"labels y must have shape ({batch},), got {tuple(y.shape)}")
        with float32_time_embedding(self.fp32_time_embedding, timesteps.device):
            if self.fp32_time_embedding:
                timesteps = at_least_float32(timesteps)
            temb = self.temb_mlp(self.noise_embed(timesteps)) if self.conditional else None
            if self.two_times:
                second_time = at_least_float32(second_time) if self.fp32_time_embedding else second_time
                temb = temb + self.second_time_mlp(self.noise_embed(second_time))
            if y is not None:
                label = self.label_emb(y)
                temb = label if temb is None else temb + label
        return temb

    def forward(self, x, timesteps, y=None, second_time=None):
        """Apply NCSN++ to x [N, C, H, W] at timesteps [N] (rescaled_t = 250 log sigma), labels y [N], second times
        [N] (models with second_time_embed)."""
        temb = self.embed(timesteps, y, x.shape[0], second_time)
        h = x.type(self.body_dtype())

        # encoder: residual blocks, then downsample and merge the input pyramid
        pyramid = h if self.progressive_input != "none" else None
        skips = [self.stem(h)]
        for level in self.encoder:
            for block in level.blocks:
                skips.append(block(skips[-1], temb))
            if level.resample is not None:
                h = level.resample(skips[-1], temb)
                if level.merge is not None:
                    h, pyramid = level.merge(pyramid, h)
                skips.append(h)

        h = self.middle(skips[-1], temb)

        # decoder: residual blocks on [h, skip], attention, output pyramid, then upsample
        pyramid = None
        for level in self.decoder:
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), temb)
            if level.attn is not None:
                h = level.attn(h)
            if level.merge is not None:
                h, pyramid = level.merge(pyramid, h)
            if level.resample is not None:
                h = level.resample(h, temb)

        if self.head is None:
            return pyramid.type(x.dtype)
        return self.head(h.type(x.dtype))


def create_ncsnpp_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult,
    attention_resolutions,
    dropout,
    num_classes,
    in_channels,
    out_channels,
    fir,
    fir_kernel,
    skip_rescale,
    resblock_type,
    progressive,
    progressive_input,
    progressive_combine,
    embedding_type,
    fourier_scale,
    init_scale,
    resamp_with_conv,
    fp32_time_embedding=False,
    second_time_embed=False,
):
    """Build a noise-conditional NCSNpp from the command-line flags (num_channels is nf; resolutions in pixels)."""
    return NCSNpp(
        image_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        nf=num_channels,
        ch_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        attn_resolutions=tuple(attention_resolutions),
        dropout=dropout,
        resamp_with_conv=resamp_with_conv,
        conditional=True,
        fir=fir,
        fir_kernel=fir_kernel,
        skip_rescale=skip_rescale,
        resblock_type=resblock_type,
        progressive=progressive,
        progressive_input=progressive_input,
        progressive_combine=progressive_combine,
        embedding_type=embedding_type,
        fourier_scale=fourier_scale,
        init_scale=init_scale,
        num_classes=num_classes,
        fp32_time_embedding=fp32_time_embedding,
        second_time_embed=second_time_embed,
    )


def _keyword_defaults(cls, leave_out):
    """cls.__init__'s keyword defaults, without the names in leave_out."""
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty and p.name not in leave_out}


# The CIFAR-10 network of openai/consistency_models_cifar10 (configs/cifar10_ve_cd.py, cifar10_ve_ct_*.py), which
# NCSNpp's defaults are: its keyword arguments, also the NCSN++ flag defaults of cm.script_util.
CIFAR10_CONFIG = _keyword_defaults(NCSNpp, leave_out=("in_channels", "out_channels", "conditional", "num_classes",
                                                      "use_fp16", "fp32_time_embedding",
                                                      "second_time_embed"))
