"""DiT, the diffusion transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"), as a network
of this library: called like the UNets, `model(x, c_noise, y=labels)`, and preconditioned by the denoiser.

The image (or latent) is cut into p x p patches, each a token (a stride-p convolution), plus a fixed 2-D sin-cos
position embedding; `depth` transformer blocks follow, each conditioned on c = time embedding + class embedding
through adaLN-Zero: LayerNorm without affine parameters, then shift / scale from c, and a gate from c on each
residual branch, the modulation layer initialised to zero so every block starts as the identity (DiT Sec. 3.2).
A final adaLN layer and a linear map each token back to a p x p x C patch, and the patches are put back together;
optionally a 3 x 3 convolution follows (U-ViT's, Bao et al. 2023), so that neighbouring patches can meet without seams.
Attention is cm.nn.scaled_dot_product_attention: the fused kernel, with its own JVP rule under forward AD.

Sizes (DiT Table 1): S 12 layers, 384 wide, 6 heads; B 12, 768, 12; L 24, 1024, 16; XL 28, 1152, 16; any with
patch 2, 4 or 8, named like "B/2" (DIT_SIZES).
"""

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import skip_init

from .half_precision import HalfPrecisionBody
from .nn import (
    at_least_float32,
    checkpoint,
    float32_time_embedding,
    scaled_dot_product_attention,
    timestep_embedding,
    zero_module,
)
from .unet import check_conditioning, guidance_features

DIT_WIDTHS = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # depth, width, heads
DIT_PATCHES = (2, 4, 8)
DIT_SIZES = tuple(f"{name}/{patch}" for name in DIT_WIDTHS for patch in DIT_PATCHES)
FREQUENCY_CHANNELS = 256  # sinusoidal features of the time before its MLP (DiT's frequency_embedding_size)
_LINEARS = (nn.Linear,)


def dit_size(name):
    """"B/2" -> (depth, hidden width, heads, patch size) of DiT Table 1; "DEPTHxWIDTHxHEADS/P" (e.g. "2x64x4/2") names
    any other size; anything else stops with one line naming the allowed forms."""
    if name in DIT_SIZES:
        width, patch = name.split("/")
        return (*DIT_WIDTHS[width], int(patch))
    match = re.fullmatch(r"(\d+)x(\d+)x(\d+)/(\d+)", str(name))
    if not match or 0 in map(int, match.groups()):
        raise ValueError(f"unknown dit_size {name!r}; allowed: {', '.join(DIT_SIZES)}, or DEPTHxWIDTHxHEADS/PATCH "
                         "with positive integers (e.g. 2x64x4/2)")
    return tuple(int(v) for v in match.groups())


def sincos_position_embedding(width, grid):
    """Fixed 2-D sin-cos position embedding [grid^2, width] (DiT, after MAE): the first half of the channels
    [sin, cos] of the row index times frequencies 10000^(-i / (width / 4)), the second half the same of the column."""
    if width % 4:
        raise ValueError(f"the DiT width must be divisible by 4 for its 2-D sin-cos position embedding, got {width}")
    quarter, cpu = width // 4, torch.device("cpu")  # computed on the CPU, also when building on the meta device
    freqs = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64, device=cpu) / quarter)
    steps = torch.arange(grid, dtype=torch.float64, device=cpu)
    rows, cols = torch.meshgrid(steps, steps, indexing="ij")

    def embed(pos):
        angles = pos.reshape(-1, 1) * freqs[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([embed(rows), embed(cols)], dim=1).float()


def modulate(x, shift, scale):
    """adaLN: x (1 + scale) + shift, one shift / scale per sample broadcast over the tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class LayerNorm32(nn.LayerNorm):
    """LayerNorm without affine parameters, computed in at least float32 (stable under fp16 / bf16)."""

    def __init__(self, width):
        super().__init__(width, elementwise_affine=False, eps=1e-6)

    def forward(self, x):
        if x.dtype not in (torch.float16, torch.bfloat16):
            return super().forward(x)
        return super().forward(x.float()).type(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention over tokens [N, T, width]: one qkv projection (heads-major q, then k, then v)."""

    def __init__(self, width, heads):
        super().__init__()
        if width % heads:
            raise ValueError(f"DiT width {width} is not divisible by its {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        n, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(n, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = scaled_dot_product_attention(q, k, v)  # [N, heads, T, head width]
        return self.proj(out.transpose(1, 2).reshape(n, tokens, width))


class MLP(nn.Module):
    """fc1, GELU (tanh approximation, as DiT), dropout, fc2, dropout."""

    def __init__(self, width, hidden, dropout=0.0):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x), approximate="tanh"))))


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning (DiT Fig. 3): x + gate * branch(modulate(norm(x))) for the
    attention and the MLP branch, shift / scale / gate of both from c by one zero-initialised linear layer."""

    def __init__(self, width, heads, mlp_ratio=4.0, dropout=0.0, use_checkpoint=False):
        super().__init__()
        self.norm1 = LayerNorm32(width)
        self.attn = Attention(width, heads)
        self.norm2 = LayerNorm32(width)
        self.mlp = MLP(width, int(width * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(width, 6 * width)))
        self.use_checkpoint = use_checkpoint

    def forward(self, x, c):
        return checkpoint(self._forward, (x, c), (), self.use_checkpoint)

    def _forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale from c; zero-initialised) then a zero-initialised linear map to p x p x C per token."""

    def __init__(self, width, patch, out_channels):
        super().__init__()
        self.norm_final = LayerNorm32(width)
        self.linear = zero_module(nn.Linear(width, patch * patch * out_channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_module(nn.Linear(width, 2 * width)))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(HalfPrecisionBody, nn.Module):
    """The diffusion transformer with time (and optional class) conditioning.

    :param image_size: side of the square input (pixels, or latents: 32 for ImageNet-256 in SD's latent space).
    :param in_channels: channels of the input (4 for SD latents).
    :param out_channels: channels of the output (DiT with learned sigma: 2 * in_channels).
    :param patch_size: p, side of the square patch each token stands for (2, 4 or 8 in DiT).
    :param hidden_size: token width.
    :param depth: number of transformer blocks.
    :param num_heads: attention heads per block.
    :param mlp_ratio: MLP hidden width / token width (4 in DiT).
    :param dropout: dropout probability in the MLPs (0 in DiT).
    :param num_classes: number of classes of a class-conditional model (None: unconditional).
    :param null_class: classifier-free guidance: the class embedding gets one more row, the null label `num_classes`
        (DiT's class-dropout row).
    :param guidance_embed: the network also takes a guidance scale w [N] (`guidance=`), embedded like a time and
        added through a zero-initialised layer to the time features (LCM, as the ADM UNet's).
    :param second_time_embed: the network also takes a second time (`second_time=`, a flow map's h = t - r) through
        its own embedding MLP, summed with the first's (MeanFlow's (t, t - r)); off, the parameters are DiT's.
    :param use_checkpoint: gradient checkpointing of every block.
    :param use_fp16: self.dtype float16; convert_to_fp16 makes the patch embedding and the blocks run in it.
    :param fp32_time_embedding: compute the time (and label, guidance) conditioning in float32 under autocast.
    :param final_conv: a 3 x 3 convolution over the output image after unpatchify (U-ViT's), initialised to the
        identity so the network starts as DiT; off, the parameters are DiT's.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        out_channels,
        patch_size=2,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        dropout=0.0,
        num_classes=None,
        null_class=False,
        guidance_embed=False,
        use_checkpoint=False,
        use_fp16=False,
        fp32_time_embedding=False,
        second_time_embed=False,
        final_conv=False,
    ):
        super().__init__()
        if null_class and num_classes is None:
            raise ValueError("null_class (classifier-free guidance) needs a class-conditional model (class_cond true)")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by the DiT patch size {patch_size}")
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.null_label = num_classes if null_class else None
        self.guidance_embed = guidance_embed
        self.fp32_time_embedding = fp32_time_embedding
        self.two_times = second_time_embed
        self.dtype = torch.float16 if use_fp16 else torch.float32

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        grid = image_size // patch_size
        # fixed, so not in the state dict: every DiT of this size has the same one
        pos_embed = sincos_position_embedding(hidden_size, grid)[None].to(self.x_embedder.weight.device)
        self.register_buffer("pos_embed", pos_embed, persistent=False)
        self.t_embedder = nn.Sequential(
            nn.Linear(FREQUENCY_CHANNELS, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        if second_time_embed:
            self.second_time_embedder = nn.Sequential(
                nn.Linear(FREQUENCY_CHANNELS, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
            )
        if num_classes is not None:
            self.y_embedder = nn.Embedding(num_classes + int(null_class), hidden_size)
        if guidance_embed:
            self.guidance_proj = zero_module(nn.Linear(FREQUENCY_CHANNELS, FREQUENCY_CHANNELS, bias=False))
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, dropout, use_checkpoint) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        # built without drawing random numbers, so that the rest is initialised as the same DiT without it
        self.final_conv = None
        if final_conv:
            self.final_conv = skip_init(nn.Conv2d, out_channels, out_channels, 3, padding=1,
                                        device=self.x_embedder.weight.device)
        self._init_weights()

    def _init_weights(self):
        """DiT's initialisation: Xavier-uniform linear layers and patch embedding, zero biases, N(0, 0.02) class and
        time embeddings; the adaLN modulation and the output layer stay zero (adaLN-Zero). Nothing to draw on the meta
        device (shapes only)."""
        if self.x_embedder.weight.is_meta:
            return
        zeroed = [self.final_layer.linear] + [b.adaLN_modulation[-1] for b in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1]] + ([self.guidance_proj] if self.guidance_embed else [])
        for module in self.modules():
            if isinstance(module, nn.Linear) and not any(module is z for z in zeroed):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        weight = self.x_embedder.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for embedder in (self.t_embedder, self.second_time_embedder) if self.two_times else (self.t_embedder,):
            for layer in (embedder[0], embedder[2]):
                nn.init.normal_(layer.weight, std=0.02)
        if self.num_classes is not None:
            nn.init.normal_(self.y_embedder.weight, std=0.02)
        if self.final_conv is not None:
            nn.init.dirac_(self.final_conv.weight)
            nn.init.zeros_(self.final_conv.bias)

    # ----- half precision: the patch embedding and the blocks (the embeddings and the final layer stay) -----

    def body(self):
        """The parts that convert_to_fp16 runs in half precision."""
        return (self.x_embedder, self.blocks)

    def convert_to_fp16(self, dtype=torch.float16):
        """Run the patch embedding and the blocks (their linear layers too) in float16 or bfloat16."""
        super().convert_to_fp16(dtype)
        for module in self.blocks.modules():
            if isinstance(module, _LINEARS):
                module.to(dtype)

    def convert_to_fp32(self):
        """Undo convert_to_fp16 / convert_to_bf16."""
        super().convert_to_fp32()
        for module in self.blocks.modules():
            if isinstance(module, _LINEARS):
                module.float()

    # ----- forward -----

    def unpatchify(self, tokens):
        """Tokens [N, T, p * p * C] -> images [N, C, H, W] (token t is patch (t // grid, t % grid))."""
        p, c = self.patch_size, self.out_channels
        grid = int(math.isqrt(tokens.shape[1]))
        x = tokens.reshape(tokens.shape[0], grid, grid, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(tokens.shape[0], c, grid * p, grid * p)

    def condition(self, timesteps, y, guidance, second_time=None):
        """c = MLP(sin-cos features of the time [+ guidance features]) [+ MLP'(features of the second time)] + class
        embedding, [N, width] in float32."""
        features = timestep_embedding(timesteps, FREQUENCY_CHANNELS)
        if self.guidance_embed:
            features = features + self.guidance_proj(guidance_features(guidance, FREQUENCY_CHANNELS).to(features.dtype))
        c = self.t_embedder(features.to(self.t_embedder[0].weight.dtype))
        if self.two_times:
            second = timestep_embedding(second_time, FREQUENCY_CHANNELS)
            c = c + self.second_time_embedder(second.to(self.second_time_embedder[0].weight.dtype))
        if self.num_classes is not None:
            c = c + self.y_embedder(y)
        return c

    def forward(self, x, timesteps, y=None, guidance=None, second_time=None):
        """Apply DiT to x [N, C, H, W] at timesteps [N] (the denoiser's c_noise), labels y [N], guidance scales
        guidance [N] (models with guidance_embed), second times [N] (models with second_time_embed)."""
        check_conditioning(x, y, guidance, self.num_classes, self.guidance_embed, second_time, self.two_times)
        if x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(
                f"DiT built for {self.in_channels} x {self.image_size} x {self.image_size} inputs got "
                f"{' x '.join(map(str, x.shape[1:]))} (check --in_channels and --image_size)"
            )
        with float32_time_embedding(self.fp32_time_embedding, x.device):
            if self.fp32_time_embedding:
                timesteps = at_least_float32(timesteps)
                second_time = None if second_time is None else at_least_float32(second_time)
            c = self.condition(timesteps, y, guidance, second_time)
        dtype = self.body_dtype()
        h = self.x_embedder(x.type(dtype)).flatten(2).transpose(1, 2)  # [N, T, width]
        h = h + self.pos_embed.to(h.dtype)
        c_body = c.type(dtype)
        for block in self.blocks:
            h = block(h, c_body)
        out = self.unpatchify(self.final_layer(h.type(c.dtype), c))
        if self.final_conv is not None:
            out = self.final_conv(out)
        return out.type(x.dtype)


def create_dit_model(dit_size_name, image_size, in_channels, out_channels, **options):
    """A DiT of a named size ("B/2", DIT_SIZES) for image_size x image_size x in_channels inputs."""
    depth, width, heads, patch = dit_size(dit_size_name)
    return DiT(image_size, in_channels, out_channels, patch_size=patch, hidden_size=width, depth=depth,
               num_heads=heads, **options)
