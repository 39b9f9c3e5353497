"""The networks: the ADM UNet (cm.unet), NCSN++ (cm.ncsnpp) and DiT (cm.dit) built from flag values, and the optional
log-variance head of sCM's adaptive weighting that a network may carry. Nothing here knows how a network is
trained; training modes and scripts build their networks through `create_model`."""

import torch.nn as nn

from .dit import create_dit_model
from .ncsnpp import create_ncsnpp_model
from .nn import timestep_embedding
from .unet import UNetModel

MODEL_TYPES = ("adm", "ncsnpp", "dit")
NUM_CLASSES = 1000

DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    16: (1, 2, 2),
    8: (1, 2),
}


def parse_int_list(text, name):
    """'32,16,8' -> (32, 16, 8); a clear error for anything else."""
    if isinstance(text, (list, tuple)):
        return tuple(int(v) for v in text)
    try:
        return tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name} must be a comma list of integers, got {text!r}") from None


def resolve_channel_mult(channel_mult, image_size):
    """The channel multipliers: parsed from a comma list, or the reference's choice for image_size."""
    if channel_mult in ("", None):
        if image_size not in DEFAULT_CHANNEL_MULT:
            sizes = ", ".join(str(s) for s in sorted(DEFAULT_CHANNEL_MULT))
            raise ValueError(f"no default channel_mult for image_size {image_size} (have {sizes}); pass --channel_mult")
        return DEFAULT_CHANNEL_MULT[image_size]
    if isinstance(channel_mult, (list, tuple)):
        return tuple(channel_mult)
    return tuple(float(m) if "." in m else int(m) for m in str(channel_mult).split(","))


def attention_downsample_rates(attention_resolutions, image_size):
    """Resolutions in pixels (e.g. '32,16,8') -> downsample rates image_size // res, checking each divides."""
    rates = []
    for res in parse_int_list(attention_resolutions, "attention_resolutions"):
        if res <= 0 or image_size % res:
            raise ValueError(f"attention resolution {res} does not divide image_size {image_size}")
        rates.append(image_size // res)
    return tuple(rates)


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    attention_type="flash",
    num_classes=NUM_CLASSES,
    model_type="adm",
    in_channels=3,
    null_class=False,
    guidance_embed=False,
    adaptive_double_norm=False,
    logvar_channels=0,
    dit_size="B/2",
    fp32_time_embedding=False,
    second_time_embed=False,
    dit_final_conv=False,
    dit_mlp_ratio=4.0,
    **ncsnpp_options,
):
    """Build the network named by model_type from flag values (ADM UNet by default, as the reference); with
    logvar_channels > 0 it carries sCM's log-variance head as `logvar_head` (add_logvar_head)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; allowed: {', '.join(MODEL_TYPES)}")
    if model_type == "dit":  # the UNets' width, level and attention flags do not apply
        if adaptive_double_norm:
            raise ValueError("--adaptive_double_norm acts on the ADM UNet's scale-shift blocks; DiT uses adaLN-Zero: "
                             "pass --adaptive_double_norm false (sct_train.py turns it on by default)")
        network = create_dit_model(
            dit_size, image_size, in_channels, 2 * in_channels if learn_sigma else in_channels, dropout=dropout,
            num_classes=num_classes if class_cond else None, null_class=null_class, guidance_embed=guidance_embed,
            use_checkpoint=use_checkpoint, use_fp16=use_fp16, fp32_time_embedding=fp32_time_embedding,
            second_time_embed=second_time_embed, final_conv=dit_final_conv, mlp_ratio=dit_mlp_ratio,
        )
        return add_logvar_head(network, logvar_channels)
    if model_type == "ncsnpp" and adaptive_double_norm:
        raise ValueError("--adaptive_double_norm acts on the ADM UNet's scale-shift blocks (NCSN++ adds its time "
                         "embedding); use --model_type adm")
    if model_type == "ncsnpp" and (null_class or guidance_embed):
        raise ValueError("--null_class and --guidance_embed are options of the ADM UNet and DiT; use --model_type adm "
                         "or dit")
    channel_mult = resolve_channel_mult(channel_mult, image_size)
    out_channels = 2 * in_channels if learn_sigma else in_channels
    if model_type == "ncsnpp":
        network = create_ncsnpp_model(
            image_size=image_size,
            num_channels=num_channels,
            num_res_blocks=num_res_blocks,
            channel_mult=channel_mult,
            attention_resolutions=parse_int_list(attention_resolutions, "attention_resolutions"),
            dropout=dropout,
            num_classes=num_classes if class_cond else None,
            in_channels=in_channels,
            out_channels=out_channels,
            fp32_time_embedding=fp32_time_embedding,
            second_time_embed=second_time_embed,
            **ncsnpp_options,
        )
        return add_logvar_head(network, logvar_channels)
    network = UNetModel(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=num_channels,
        out_channels=out_channels,
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_downsample_rates(attention_resolutions, image_size),
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=num_classes if class_cond else None,
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
        attention_type=attention_type,
        null_class=null_class,
        guidance_embed=guidance_embed,
        adaptive_double_norm=adaptive_double_norm,
        fp32_time_embedding=fp32_time_embedding,
        second_time_embed=second_time_embed,
    )
    return add_logvar_head(network, logvar_channels)


# ----- sCM's log-variance head --------------------------------------------------------------------


class LogVarianceHead(nn.Module):
    """The adaptive weighting's log-variance u(t) (sCM Sec. 4.2; EDM2's uncertainty head): positional embedding
    of c_noise(t), then a linear layer to one number per sample. Starts at u = 0 (weight 1).

    :param channels: width of the sinusoidal embedding.
    :param c_noise_scale: the embedding sees c_noise_scale * t, like the network.
    """

    def __init__(self, channels=128, c_noise_scale=1.0):
        super().__init__()
        self.channels = channels
        self.c_noise_scale = c_noise_scale
        self.linear = nn.Linear(channels, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t):
        emb = timestep_embedding(t * self.c_noise_scale, self.channels)
        return self.linear(emb.to(self.linear.weight.dtype))[:, 0]


def add_logvar_head(network, channels):
    """The network with sCM's log-variance head u(t) as submodule `logvar_head` (channels 0: unchanged, so its
    state-dict keys stay the reference's)."""
    if channels < 0:
        raise ValueError(f"logvar_channels must be 0 (no head) or positive, got {channels}")
    if channels:
        network.logvar_head = LogVarianceHead(channels)
    return network
