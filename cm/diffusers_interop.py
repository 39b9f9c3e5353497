"""Move ADM UNets between this library and Hugging Face diffusers (`UNet2DModel`).

The two networks compute the same function; only names and a few shapes differ:

=====================================  ===========================================================
ADM (`cm.unet.UNetModel`)              diffusers (`UNet2DModel`)
=====================================  ===========================================================
time_embed.0 / .2                      time_embedding.linear_1 / linear_2
label_emb                              class_embedding
input_blocks.0.0                       conv_in
input_blocks.k (level l, j-th)         down_blocks.l.resnets.j (+ attentions.j)
input_blocks.k (down-sampler)          down_blocks.l.downsamplers.0 (``op`` -> ``conv``)
middle_block.0 / .1 / .2               mid_block.resnets.0 / attentions.0 / resnets.1
output_blocks.k (level l, i-th)        up_blocks.(L-1-l).resnets.i (+ attentions.i, upsamplers.0)
out.0 / out.2                          conv_norm_out / conv_out
ResBlock in_layers.0 / .2              norm1 / conv1
ResBlock emb_layers.1                  time_emb_proj
ResBlock out_layers.0 / .3             norm2 / conv2
ResBlock skip_connection               conv_shortcut
AttentionBlock norm                    group_norm
AttentionBlock qkv (1x1 conv, 3C)      to_q, to_k, to_v (linear, C each)
AttentionBlock proj_out (1x1 conv)     to_out.0 (linear)
=====================================  ===========================================================

The qkv channels split as (three, heads, head_dim), the layout of the released checkpoints; a model
with attention_type "guided" ((heads, three, head_dim)) is permuted on the way. diffusers gives every
attention block the same head width, so ADM models whose head widths differ between blocks (a fixed
--num_heads over several widths) cannot be expressed; pass --num_head_channels instead.

Only the export needs diffusers (`pip install -e ".[diffusers]"`); reading a diffusers folder back
needs its config.json and weights file only.
"""

import inspect
import json
import os

import torch

from .checkpoint_io import load_checkpoint, write_directory_atomically
from .networks import create_model
from .unet import AttentionBlock, Downsample, ResBlock, UNetModel, Upsample

RESBLOCK_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
ATTENTION_NAMES = {"norm": "group_norm", "proj_out": "to_out.0"}
SAMPLER_NAMES = {"op": "conv", "conv": "conv"}
QKV_NAMES = ("to_q", "to_k", "to_v")
UNET_FOLDER = "unet"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
GROUPS, NORM_EPS, SIGMA_DATA, RHO = 32, 1e-5, 0.5, 7.0
DIFFUSERS_HINT = 'pip install -e ".[diffusers]"'


def import_diffusers():
    """The diffusers module, or ImportError naming the extra that installs it."""
    try:
        import diffusers
    except ImportError:
        raise ImportError(f"exporting to diffusers needs the diffusers package: {DIFFUSERS_HINT}") from None
    return diffusers


# ----- structure ---------------------------------------------------------------------------------


def _check_adm(model):
    if not isinstance(model, UNetModel):
        raise ValueError(f"only the ADM UNet (model_type adm) converts to diffusers, got {type(model).__name__}")


def _levels(model):
    """For each level of the UNet: (width, has attention)."""
    return [
        (int(mult * model.model_channels), 2**level in model.attention_resolutions)
        for level, mult in enumerate(model.channel_mult)
    ]


def _sampler_type(model):
    """"resnet" (resblock_updown), "conv" (strided / upsampling convolutions) or None (one level only)."""
    samplers = [m for m in model.modules() if isinstance(m, (Downsample, Upsample)) or getattr(m, "updown", False)]
    if not samplers:
        return None
    if isinstance(samplers[0], ResBlock):
        return "resnet"
    if not all(m.use_conv for m in samplers):
        raise ValueError("diffusers has no pooling down-sampler: export needs conv_resample or resblock_updown")
    return "conv"


def _head_dim(model):
    """The width of every attention head (diffusers' attention_head_dim), or ValueError when they differ."""
    dims = sorted({m.channels // m.num_heads for m in model.modules() if isinstance(m, AttentionBlock)})
    if len(dims) != 1:
        raise ValueError(
            f"the attention heads of this model have widths {dims}; diffusers needs one width: "
            "train or export with --num_head_channels"
        )
    return dims[0]


def diffusers_unet_config(model):
    """UNet2DModel keyword arguments of a network with the same function as the ADM `model`."""
    _check_adm(model)
    if not isinstance(model.input_blocks[0][0], torch.nn.Conv2d):
        raise ValueError("only 2-D ADM UNets (dims=2) convert to diffusers")
    if int(model.channel_mult[0] * model.model_channels) != model.model_channels:
        raise ValueError(f"diffusers needs channel_mult to start with 1, got {tuple(model.channel_mult)}")
    levels = _levels(model)
    sampler = _sampler_type(model) or "conv"
    plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if sampler == "resnet" else (
        "DownBlock2D", "UpBlock2D")
    res_block = next(m for m in model.modules() if isinstance(m, ResBlock))
    return dict(
        sample_size=model.image_size,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        center_input_sample=False,
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=[("AttnDownBlock2D" if attn else plain_down) for _, attn in levels],
        up_block_types=[("AttnUpBlock2D" if attn else plain_up) for _, attn in reversed(levels)],
        block_out_channels=[width for width, _ in levels],
        layers_per_block=model.num_res_blocks,
        mid_block_scale_factor=1,
        downsample_padding=1,
        downsample_type=sampler,
        upsample_type=sampler,
        dropout=float(model.dropout),
        act_fn="silu",
        attention_head_dim=_head_dim(model),
        norm_num_groups=GROUPS,
        attn_norm_num_groups=GROUPS,
        norm_eps=NORM_EPS,
        resnet_time_scale_shift="scale_shift" if res_block.use_scale_shift_norm else "default",
        add_attention=True,
        class_embed_type=None,
        num_class_embeds=model.num_classes,
    )


def _child_pairs(block, adm_prefix, hf_prefix, index, sampler_prefix):
    """(ADM prefix, diffusers prefix, module) of the parametrised children of one Timestep block."""
    pairs = []
    for position, child in enumerate(block):
        name = f"{adm_prefix}{position}."
        if isinstance(child, AttentionBlock):
            pairs.append((name, f"{hf_prefix}attentions.{index}.", child))
        elif isinstance(child, (Downsample, Upsample)) or (isinstance(child, ResBlock) and child.updown):
            pairs.append((name, sampler_prefix, child))
        else:
            pairs.append((name, f"{hf_prefix}resnets.{index}.", child))
    return pairs


def module_pairs(model):
    """(ADM prefix, diffusers prefix, module) for every parametrised block of an ADM UNet, in order."""
    _check_adm(model)
    pairs = [("time_embed.0.", "time_embedding.linear_1.", None), ("time_embed.2.", "time_embedding.linear_2.", None)]
    if model.num_classes is not None:
        pairs.append(("label_emb.", "class_embedding.", None))
    pairs.append(("input_blocks.0.0.", "conv_in.", None))
    num_levels, k = len(model.channel_mult), 1
    for level in range(num_levels):
        hf = f"down_blocks.{level}."
        for j in range(model.num_res_blocks):
            pairs += _child_pairs(model.input_blocks[k], f"input_blocks.{k}.", hf, j, None)
            k += 1
        if level != num_levels - 1:
            pairs += _child_pairs(model.input_blocks[k], f"input_blocks.{k}.", hf, 0, f"{hf}downsamplers.0.")
            k += 1
    pairs += [
        ("middle_block.0.", "mid_block.resnets.0.", model.middle_block[0]),
        ("middle_block.1.", "mid_block.attentions.0.", model.middle_block[1]),
        ("middle_block.2.", "mid_block.resnets.1.", model.middle_block[2]),
    ]
    k = 0
    for up in range(num_levels):
        hf = f"up_blocks.{up}."
        for i in range(model.num_res_blocks + 1):
            pairs += _child_pairs(model.output_blocks[k], f"output_blocks.{k}.", hf, i, f"{hf}upsamplers.0.")
            k += 1
    pairs += [("out.0.", "conv_norm_out.", None), ("out.2.", "conv_out.", None)]
    return pairs


def _renames(module):
    if isinstance(module, ResBlock):
        return RESBLOCK_NAMES
    if isinstance(module, AttentionBlock):
        return ATTENTION_NAMES
    if isinstance(module, (Downsample, Upsample)):
        return SAMPLER_NAMES
    return {}


def key_map(model):
    """{ADM key: diffusers key} for every tensor of the model; an attention qkv maps to a (q, k, v) tuple."""
    mapping = {}
    own = model.state_dict()
    for adm_prefix, hf_prefix, module in module_pairs(model):
        renames = _renames(module)
        for key in own:
            if not key.startswith(adm_prefix):
                continue
            layer, _, leaf = key[len(adm_prefix):].rpartition(".")
            if isinstance(module, AttentionBlock) and layer == "qkv":
                mapping[key] = tuple(f"{hf_prefix}{name}.{leaf}" for name in QKV_NAMES)
            else:
                layer = renames.get(layer, layer)
                mapping[key] = f"{hf_prefix}{layer}.{leaf}" if layer else f"{hf_prefix}{leaf}"
    unmapped = sorted(set(own) - set(mapping))
    if unmapped:
        raise ValueError(f"no diffusers name for {len(unmapped)} tensor(s) of this model, e.g. {unmapped[0]}")
    return mapping


def _attention_of(model):
    """{ADM qkv key prefix: AttentionBlock} of the model."""
    return {f"{name}.": m for name, m in model.named_modules() if isinstance(m, AttentionBlock)}


def _heads_first(block):
    """True when the block reads qkv as (heads, three, head_dim) (guided-diffusion's order)."""
    return block.layout == "guided"


def _qkv_permute(tensor, heads, to_heads_first):
    """Permute qkv rows between (three, heads, d) and (heads, three, d)."""
    rest, width = tensor.shape[1:], tensor.shape[0]
    d = width // (3 * heads)
    shape = (3, heads, d) if to_heads_first else (heads, 3, d)
    return tensor.reshape(*shape, *rest).transpose(0, 1).reshape(width, *rest)


# ----- conversion --------------------------------------------------------------------------------


def adm_to_diffusers_state_dict(state_dict, model):
    """Rename (and split qkv of) an ADM state dict into UNet2DModel's; `model` gives the structure."""
    attention = _attention_of(model)
    out = {}
    for key, target in key_map(model).items():
        tensor = state_dict[key]
        block = next((b for p, b in attention.items() if key.startswith(p)), None)
        if isinstance(target, tuple):  # qkv: 3C rows -> q, k, v
            if _heads_first(block):
                tensor = _qkv_permute(tensor, block.num_heads, to_heads_first=False)
            for name, part in zip(target, tensor.chunk(3, dim=0)):
                out[name] = part.reshape(part.shape[0], -1).clone() if key.endswith("weight") else part.clone()
        elif block is not None and key.endswith("proj_out.weight"):
            out[target] = tensor.reshape(tensor.shape[0], -1).clone()
        else:
            out[target] = tensor.clone()
    return out


def diffusers_to_adm_state_dict(state_dict, model):
    """The inverse of adm_to_diffusers_state_dict: a UNet2DModel state dict for `model`'s layout."""
    attention = _attention_of(model)
    own = model.state_dict()
    missing = sorted(
        name for target in key_map(model).values() for name in (target if isinstance(target, tuple) else (target,))
        if name not in state_dict
    )
    if missing:
        raise ValueError(f"the diffusers weights lack {len(missing)} tensor(s) this model needs, e.g. {missing[0]}")
    out = {}
    for key, source in key_map(model).items():
        shape = own[key].shape
        if isinstance(source, tuple):
            tensor = torch.cat([state_dict[name] for name in source], dim=0)
            block = next(b for p, b in attention.items() if key.startswith(p))
            tensor = tensor.reshape(shape)
            if _heads_first(block):
                tensor = _qkv_permute(tensor, block.num_heads, to_heads_first=True)
        else:
            tensor = state_dict[source]
        if tuple(tensor.shape) != tuple(shape):
            if tensor.numel() != own[key].numel():
                raise ValueError(f"{source} has shape {tuple(tensor.shape)}; {key} needs {tuple(shape)}")
            tensor = tensor.reshape(shape)
        out[key] = tensor.clone().contiguous()
    return out


# ----- flags, scheduler, folders ------------------------------------------------------------------


def scheduler_config(steps=40, sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA, rho=RHO, clip_denoised=True):
    """CMStochasticIterativeScheduler arguments for the `steps`-point Karras grid that image_sample.py uses.

    :param steps: grid size N (multistep --ts index it; diffusers calls it num_train_timesteps).
    """
    return dict(
        num_train_timesteps=int(steps),
        sigma_min=float(sigma_min),
        sigma_max=float(sigma_max),
        sigma_data=float(sigma_data),
        s_noise=1.0,
        rho=float(rho),
        clip_denoised=bool(clip_denoised),
    )


def _expect(config, key, allowed):
    value = config.get(key, allowed[0])
    if value not in allowed:
        raise ValueError(f"diffusers UNet config has {key}={value!r}; an ADM UNet needs {allowed[0]!r}")


def adm_flags_from_diffusers_config(config):
    """Model flags (create_model / image_sample.py names) of the ADM UNet equal to a UNet2DModel config."""
    for key, allowed in (
        ("time_embedding_type", ("positional",)), ("flip_sin_to_cos", (True,)), ("freq_shift", (0,)),
        ("act_fn", ("silu", "swish")), ("norm_num_groups", (GROUPS,)), ("norm_eps", (NORM_EPS,)),
        ("center_input_sample", (False,)), ("class_embed_type", (None,)), ("mid_block_scale_factor", (1,)),
        ("mid_block_type", ("UNetMidBlock2D",)), ("add_attention", (True,)), ("time_embedding_dim", (None,)),
    ):
        _expect(config, key, allowed)
    widths = list(config["block_out_channels"])
    base = widths[0]
    size = config["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    attention = [t.startswith("Attn") for t in config["down_block_types"]]
    if attention != [t.startswith("Attn") for t in reversed(config["up_block_types"])]:
        raise ValueError("diffusers UNet has attention on different levels going down and up; ADM cannot express it")
    if any(w % base for w in widths):
        raise ValueError(f"block_out_channels {widths} are not multiples of the first width")
    in_channels, out_channels = config.get("in_channels", 3), config.get("out_channels", 3)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"out_channels {out_channels} must be in_channels or twice it (learn_sigma)")
    classes = config.get("num_class_embeds")
    return dict(
        image_size=size,
        in_channels=in_channels,
        num_channels=base,
        num_res_blocks=config["layers_per_block"],
        channel_mult=",".join(str(w // base) for w in widths),
        attention_resolutions=",".join(str(size // 2**level) for level, a in enumerate(attention) if a),
        num_heads=1,
        num_head_channels=config["attention_head_dim"] or widths[-1],
        num_heads_upsample=-1,
        use_scale_shift_norm=config.get("resnet_time_scale_shift", "default") == "scale_shift",
        resblock_updown=config.get("downsample_type", "conv") == "resnet",
        dropout=float(config.get("dropout", 0.0)),
        class_cond=classes is not None,
        num_classes=classes if classes is not None else 1000,
        learn_sigma=out_channels == 2 * in_channels,
        use_new_attention_order=False,
        attention_type="flash",
        model_type="adm",
    )


def create_adm_model(flags):
    """Build the ADM UNet from a dict of flags (extra keys ignored) with cm.networks.create_model."""
    names = [p.name for p in inspect.signature(create_model).parameters.values() if p.kind != p.VAR_KEYWORD]
    return create_model(**{k: flags[k] for k in names if k in flags})


def unet_folder(path):
    """The folder holding the UNet's config.json: `path/unet` of a pipeline folder, or `path` itself."""
    for folder in (os.path.join(path, UNET_FOLDER), path):
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    raise FileNotFoundError(f"{path} is not a diffusers folder: found no config.json in it or in {UNET_FOLDER}/")


def read_diffusers_folder(path):
    """(UNet config, UNet state dict, scheduler config or None) of a diffusers pipeline or UNet folder."""
    folder = unet_folder(path)
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    weights = next((os.path.join(folder, n) for n in WEIGHT_FILES if os.path.isfile(os.path.join(folder, n))), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} holds none of {', '.join(WEIGHT_FILES)} (sharded weights are not read)")
    scheduler = os.path.join(os.path.dirname(folder.rstrip(os.sep)), "scheduler", "scheduler_config.json")
    scheduler_cfg = None
    if folder != path and os.path.isfile(scheduler):
        with open(scheduler) as f:
            scheduler_cfg = json.load(f)
    return config, load_checkpoint(weights, map_location="cpu"), scheduler_cfg


def import_diffusers_folder(path):
    """(flags, ADM UNet with the folder's weights) from a diffusers pipeline or UNet folder; no diffusers needed.

    `flags` holds the model flags and, when the folder has a CMStochasticIterativeScheduler, its grid
    (steps, sigma_min, sigma_max) and training_mode consistency_distillation, ready for image_sample.py.
    """
    config, hf_state, scheduler = read_diffusers_folder(path)
    flags = adm_flags_from_diffusers_config(config)
    model = create_adm_model(flags)
    model.load_state_dict(diffusers_to_adm_state_dict(hf_state, model), strict=True)
    if scheduler is not None:
        if scheduler.get("sigma_data", SIGMA_DATA) != SIGMA_DATA or scheduler.get("rho", RHO) != RHO:
            raise ValueError("the scheduler's sigma_data / rho differ from the 0.5 / 7 every cm model uses")
        flags.update(
            training_mode="consistency_distillation",
            steps=scheduler.get("num_train_timesteps", 40),
            sigma_min=scheduler.get("sigma_min", 0.002),
            sigma_max=scheduler.get("sigma_max", 80.0),
        )
    return flags, model


def export_diffusers(model, output_dir, scheduler_kwargs=None):
    """Write `model` as a ConsistencyModelPipeline folder (unet/ + scheduler/); returns the pipeline.

    :param model: an ADM UNetModel (consistency model: boundary-condition scalings, sigma_data 0.5).
    :param output_dir: folder to create or replace (atomically: a failed export leaves an earlier one as it was).
    :param scheduler_kwargs: CMStochasticIterativeScheduler arguments (default scheduler_config()).
    """
    diffusers = import_diffusers()
    unet = diffusers.UNet2DModel(**diffusers_unet_config(model))
    unet.load_state_dict(adm_to_diffusers_state_dict(model.state_dict(), model), strict=True)
    scheduler = diffusers.CMStochasticIterativeScheduler(**(scheduler_kwargs or scheduler_config()))
    pipeline = diffusers.ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    def write(folder):
        pipeline.save_pretrained(folder, safe_serialization=True)
        give_files_default_mode(folder)

    write_directory_atomically(output_dir, write)
    return pipeline


def default_file_mode():
    """The mode a newly created file gets from this process's umask (0644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def give_files_default_mode(folder):
    """Files under `folder` get the mode of every other output: the safetensors weights diffusers writes come out
    0600, its JSON files with the umask's mode."""
    mode = default_file_mode()
    for parent, _, names in os.walk(folder):
        for name in names:
            os.chmod(os.path.join(parent, name), mode)
