"""Flag defaults, model construction and command-line / YAML configuration for the scripts.

Every default dict becomes command-line flags (`add_dict_to_argparser`), with help text from FLAG_HELP
and allowed values from FLAG_CHOICES; `parse_args_with_config` adds `--config FILE.yaml` (keys are
flag names, flags on the command line win).
"""

import argparse
import json
import os
import sys

from . import schedules
from .karras_diffusion import INDEX_SAMPLERS, TEACHER_SOLVERS, WEIGHT_SCHEDULES, KarrasDenoiser
from .metrics import LOSS_NORMS
from .schedules import SCALE_MODES, TARGET_EMA_MODES
from .unet import ATTENTION_TYPES, UNetModel

create_ema_and_scales_fn = schedules.create_ema_and_scales_fn  # re-exported at the reference's location

NUM_CLASSES = 1000
MODEL_TYPES = ("adm", "ncsnpp")
TRAINING_MODES = ("edm", "consistency_distillation", "consistency_training", "progdist")

DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
    32: (1, 2, 2, 2),
    16: (1, 2, 2),
    8: (1, 2),
}


def model_and_diffusion_defaults():
    """Defaults of the network and KarrasDenoiser flags (the reference's, plus attention_type, model_type, NCSN++)."""
    res = dict(
        sigma_min=0.002,
        sigma_max=80.0,
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="32,16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        num_classes=NUM_CLASSES,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        attention_type="flash",
        learn_sigma=False,
        weight_schedule="karras",
        model_type="adm",
    )
    res.update(ncsnpp_defaults())
    return res


def ncsnpp_defaults():
    """NCSN++-only flags (score_sde names), defaulting to the CIFAR-10 configuration; ignored by the ADM UNet."""
    from .ncsnpp import CIFAR10_CONFIG

    flags = ("fir", "skip_rescale", "resblock_type", "progressive", "progressive_input", "progressive_combine",
             "embedding_type", "fourier_scale", "init_scale", "resamp_with_conv")
    res = {k: CIFAR10_CONFIG[k] for k in flags}
    res["fir_kernel"] = ",".join(str(t) for t in CIFAR10_CONFIG["fir_kernel"])
    return res


def cm_train_defaults():
    """Defaults of the consistency / distillation training flags (the reference's, plus the iCT options)."""
    return dict(
        teacher_model_path="",
        teacher_dropout=0.1,
        teacher_solver="heun",
        init_from_teacher="auto",
        training_mode="consistency_distillation",
        target_ema_mode="fixed",
        scale_mode="fixed",
        total_training_steps=600000,
        start_ema=0.0,
        start_scales=40,
        end_scales=40,
        distill_steps_per_iter=50000,
        loss_norm="lpips",
        index_sampler="uniform",
        p_mean=-1.1,
        p_std=2.0,
        lpips_vgg_path="",
    )


FLAG_HELP = {
    "sigma_min": "smallest noise level eps (boundary condition of the consistency function)",
    "sigma_max": "largest noise level T",
    "image_size": "image resolution in pixels (square)",
    "num_channels": "base width of the network",
    "num_res_blocks": "residual blocks per resolution level",
    "num_heads": "attention heads (when num_head_channels is -1)",
    "num_heads_upsample": "attention heads in the decoder (-1: num_heads)",
    "num_head_channels": "channels per attention head (-1: use num_heads)",
    "attention_resolutions": "comma list of resolutions (pixels) with self-attention, e.g. 32,16,8",
    "channel_mult": "comma list of width multipliers per level ('' picks the reference's for image_size)",
    "dropout": "dropout probability in residual blocks",
    "class_cond": "class-conditional model (labels from file names or the dataset)",
    "num_classes": "number of classes when class_cond",
    "use_checkpoint": "gradient checkpointing (less memory, more compute)",
    "use_scale_shift_norm": "FiLM-style scale/shift conditioning in residual blocks",
    "resblock_updown": "residual blocks for up/downsampling",
    "use_fp16": "float16 network body with fp32 master weights and dynamic loss scaling",
    "use_new_attention_order": "(three, heads, dim) qkv layout regardless of attention_type",
    "attention_type": "qkv channel layout: flash (released checkpoints) or legacy (guided-diffusion); always SDPA",
    "learn_sigma": "output 6 channels (kept for checkpoint compatibility; the extra 3 are unused)",
    "weight_schedule": "loss weighting lambda(sigma); ict = 1/(t_n - t_(n+1))",
    "model_type": "network family: adm (ADM UNet) or ncsnpp (NCSN++)",
    "fir": "NCSN++: FIR-filtered up/downsampling",
    "fir_kernel": "NCSN++: FIR kernel taps, comma list",
    "skip_rescale": "NCSN++: scale skip connections by 1/sqrt(2)",
    "resblock_type": "NCSN++: residual block type",
    "progressive": "NCSN++: progressive output path",
    "progressive_input": "NCSN++: progressive input path",
    "progressive_combine": "NCSN++: how progressive paths are merged",
    "embedding_type": "NCSN++: noise-level embedding",
    "fourier_scale": "NCSN++: scale of the Gaussian Fourier embedding",
    "init_scale": "NCSN++: scale of the final layers' initialisation (0: 1e-10, as score_sde)",
    "resamp_with_conv": "NCSN++: learned convolution in up/downsampling",
    "teacher_model_path": "EDM teacher checkpoint (consistency_distillation, progdist)",
    "teacher_dropout": "dropout of the teacher network during distillation",
    "teacher_solver": "ODE solver for the teacher step in consistency distillation",
    "init_from_teacher": "initialise the student (and target) from the teacher: auto = yes for CD and progdist, no for CT",
    "training_mode": "what to train",
    "target_ema_mode": "target network EMA: fixed (start_ema) or adaptive mu(k)",
    "scale_mode": "discretisation N(k): fixed, progressive (CM), exponential (iCT), progdist (halving)",
    "total_training_steps": "training steps K: schedules span K and training stops there (EDM: 0 = until interrupted)",
    "start_ema": "mu0: target EMA decay (0: stop-gradient of the online network, iCT)",
    "start_scales": "s0: initial number of discretisation points N",
    "end_scales": "s1: final N for progressive / exponential schedules",
    "distill_steps_per_iter": "progdist: steps before N halves",
    "loss_norm": "distance d(x, y) of the consistency / progdist loss",
    "index_sampler": "how the grid index n is drawn: uniform (CM) or lognormal (iCT)",
    "p_mean": "lognormal index sampler mean of log sigma (iCT: -1.1)",
    "p_std": "lognormal index sampler std of log sigma (iCT: 2.0)",
    "lpips_vgg_path": "local torchvision VGG16 weights for LPIPS (or set CM_LPIPS_VGG_PATH)",
    # train_defaults
    "data_dir": "image folder, .npz file (arr_0 NHWC uint8) or 'digits' (embedded scikit-learn digits)",
    "schedule_sampler": "EDM noise-level distribution (lognormal: P_mean -1.2, P_std 1.2)",
    "lr": "learning rate",
    "weight_decay": "optimizer weight decay",
    "lr_anneal_steps": "anneal lr linearly to 0 over this many steps (0: constant)",
    "lr_warmup_steps": "raise lr linearly over the first steps (0: no warm-up)",
    "global_batch_size": "images per step over all ranks (used when batch_size is -1)",
    "batch_size": "images per step on each rank (-1: global_batch_size / ranks)",
    "microbatch": "images per forward/backward, gradients accumulated (-1: whole batch)",
    "ema_rate": "comma list of EMA decays of the saved EMA models",
    "log_interval": "steps between log lines",
    "save_interval": "steps between checkpoints (-1: only at the end)",
    "resume_checkpoint": "modelNNNNNN.pt to start from when log_dir holds no checkpoint",
    "fp16_scale_growth": "increase of lg_loss_scale per good fp16 step",
    "use_bf16": "bfloat16 autocast",
    "optimizer": "radam (the reference's), adam or adamw (fused)",
    "seed": "random seed (same seed and flags give the same run)",
    "log_dir": "directory for logs and checkpoints (default OPENAI_LOGDIR, else a new temp dir); reruns resume from it",
    "device": "auto (GPU of this rank if any), cpu or cuda",
    "channels_last": "channels_last memory format for images and networks",
    "random_flip": "random horizontal flips",
    "on_bad_image": "unreadable image: skip (with a warning naming it) or error",
    "max_minutes": "checkpoint and stop after this many minutes of training (0: no limit)",
    "dry_run": "print the resolved configuration as JSON and exit",
}

FLAG_CHOICES = {
    "attention_type": ATTENTION_TYPES,
    "weight_schedule": WEIGHT_SCHEDULES,
    "model_type": MODEL_TYPES,
    "resblock_type": ("biggan", "ddpm"),
    "progressive": ("none", "output_skip", "residual"),
    "progressive_input": ("none", "input_skip", "residual"),
    "progressive_combine": ("sum", "cat"),
    "embedding_type": ("fourier", "positional"),
    "teacher_solver": TEACHER_SOLVERS,
    "training_mode": TRAINING_MODES,
    "target_ema_mode": TARGET_EMA_MODES,
    "scale_mode": SCALE_MODES,
    "loss_norm": LOSS_NORMS,
    "index_sampler": INDEX_SAMPLERS,
    "init_from_teacher": ("auto", "true", "false"),
    # train_defaults
    "schedule_sampler": ("lognormal", "uniform"),
    "optimizer": ("radam", "adam", "adamw"),
    "device": ("auto", "cpu", "cuda"),
    "on_bad_image": ("skip", "error"),
}


def train_defaults():
    """Flags of the training loop (the reference's, plus optimizer, precision, seed, log dir and data options)."""
    return dict(
        data_dir="",
        schedule_sampler="lognormal",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        lr_warmup_steps=0,
        global_batch_size=2048,
        batch_size=-1,
        microbatch=-1,
        ema_rate="0.9999",
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        use_fp16=False,
        fp16_scale_growth=1e-3,
        use_bf16=False,
        optimizer="radam",
        seed=0,
        log_dir="",
        device="auto",
        channels_last=True,
        random_flip=True,
        on_bad_image="skip",
        max_minutes=0.0,
        dry_run=False,
    )


def parse_int_list(text, name):
    """'32,16,8' -> (32, 16, 8); a clear error for anything else."""
    if isinstance(text, (list, tuple)):
        return tuple(int(v) for v in text)
    try:
        return tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name} must be a comma list of integers, got {text!r}") from None


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    weight_schedule,
    sigma_min=0.002,
    sigma_max=80.0,
    distillation=False,
    attention_type="flash",
    num_classes=NUM_CLASSES,
    model_type="adm",
    loss_norm="lpips",
    index_sampler="uniform",
    p_mean=-1.1,
    p_std=2.0,
    lpips_vgg_path="",
    **ncsnpp_options,
):
    """Build (network, KarrasDenoiser) from flag values (the reference's signature plus the extra flags)."""
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
        attention_type=attention_type,
        num_classes=num_classes,
        model_type=model_type,
        **ncsnpp_options,
    )
    diffusion = KarrasDenoiser(
        sigma_data=0.5,
        sigma_max=sigma_max,
        sigma_min=sigma_min,
        distillation=distillation,
        weight_schedule=weight_schedule,
        loss_norm=loss_norm,
        index_sampler=index_sampler,
        p_mean=p_mean,
        p_std=p_std,
        lpips_vgg_path=lpips_vgg_path or None,
    )
    return model, diffusion


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
    **ncsnpp_options,
):
    """Build the network named by model_type from flag values (ADM UNet by default, as the reference)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; allowed: {', '.join(MODEL_TYPES)}")
    channel_mult = resolve_channel_mult(channel_mult, image_size)
    out_channels = 2 * in_channels if learn_sigma else in_channels
    if model_type == "ncsnpp":
        from .ncsnpp import create_ncsnpp_model

        return create_ncsnpp_model(
            image_size=image_size,
            num_channels=num_channels,
            num_res_blocks=num_res_blocks,
            channel_mult=channel_mult,
            attention_resolutions=parse_int_list(attention_resolutions, "attention_resolutions"),
            dropout=dropout,
            num_classes=num_classes if class_cond else None,
            in_channels=in_channels,
            out_channels=out_channels,
            **ncsnpp_options,
        )
    return UNetModel(
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
    )


# ----- command line ------------------------------------------------------------------------------


class OneLineArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (the usage of ~60 flags is left to --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def str2bool(v):
    """Parse yes/no, true/false, t/f, y/n, 1/0 into a bool."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


def add_dict_to_argparser(parser, default_dict, help_text=None, choices=None):
    """Add --key flags typed like their defaults (bools via str2bool), with help text and allowed values.

    :param help_text: {key: help text} (default FLAG_HELP).
    :param choices: {key: allowed values} of enum flags (default FLAG_CHOICES).
    """
    help_text = FLAG_HELP if help_text is None else help_text
    choices = FLAG_CHOICES if choices is None else choices
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        kwargs = dict(default=v, type=v_type, help=help_text.get(k, "") + " (default: %(default)s)")
        if k in choices:
            kwargs["choices"] = choices[k]
        parser.add_argument(f"--{k}", **kwargs)


def args_to_dict(args, keys):
    """Pick the named attributes of an argparse namespace into a dict."""
    return {k: getattr(args, k) for k in keys}


def load_config(path):
    """Read a YAML (or JSON) config file of flag values; list values become comma lists."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise SystemExit(f"error: config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"error: config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"error: config file {path} must map flag names to values")
    return {k: ",".join(str(x) for x in v) if isinstance(v, (list, tuple)) else v for k, v in data.items()}


def parse_args_with_config(parser, argv=None):
    """Parse argv with `--config FILE.yaml` supplying defaults; flags given on the command line win.

    Keys this parser lacks but another cm script has (training flags given to a sampling script) are skipped;
    any other unknown key, or a value of the wrong type or outside the choices, stops with one error line.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument("--config", default="", help="YAML file of flag values (flags on the command line win)")
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        actions = {a.dest: a for a in parser._actions}
        values = load_config(pre.config)
        # keys of other cm scripts (e.g. training flags in a file given to image_sample.py) are skipped
        values = {k: v for k, v in values.items() if k in actions or k not in FLAG_HELP}
        unknown = sorted(k for k in values if k not in actions or k == "config")
        if unknown:
            parser.error(f"config file {pre.config} has unknown keys: {', '.join(unknown)}")
        converted = {}
        for key, value in values.items():
            action = actions[key]
            try:
                converted[key] = action.type(value) if action.type and value is not None else value
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                parser.error(f"config file {pre.config}: bad value for {key}: {e}")
            if action.choices is not None and converted[key] not in action.choices:
                parser.error(
                    f"config file {pre.config}: {key} must be one of {', '.join(map(str, action.choices))}, "
                    f"got {value!r}"
                )
        parser.set_defaults(**converted)
    return parser.parse_args(argv)


def run_or_exit(fn, *args):
    """fn(*args); bad input (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) becomes one
    'error:' line on stderr and exit status 1. CM_DEBUG=1 re-raises instead, with the traceback."""
    try:
        return fn(*args)
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as e:
        if os.environ.get("CM_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def run_script(parser, run, argv=None):
    """The body of every script's main(): flags and --config, --dry_run prints them, else run(args) with
    bad input reported in one line."""
    args = parse_args_with_config(parser, argv)
    if getattr(args, "dry_run", False):
        print(args_to_json(args))
        return None
    return run_or_exit(run, args)


def args_to_json(args):
    """The resolved configuration as indented JSON (for --dry_run, the log dir and checkpoints)."""
    return json.dumps(vars(args), indent=2, sort_keys=True, default=str)


def describe_state_dict_mismatch(model, state_dict, limit=3):
    """One line naming missing keys, unexpected keys and shape mismatches ('' when the state dict fits)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]

    def part(name, items):
        more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
        return f"{name}: {', '.join(items[:limit])}{more}" if items else ""

    return "; ".join(p for p in (part("missing keys", missing), part("unexpected keys", unexpected), part("shape mismatches", shapes)) if p)


def load_model_checkpoint(model, path, what="checkpoint"):
    """Load a state dict file into model (strict), or stop with one line saying which keys / shapes differ."""
    from . import dist_util

    if not path:
        raise ValueError(f"no {what} path given")
    state_dict = dist_util.load_state_dict(path, map_location="cpu")
    if isinstance(state_dict, dict) and "state_dict" in state_dict and not any(k.endswith(".weight") for k in state_dict):
        state_dict = state_dict["state_dict"]
    problem = describe_state_dict_mismatch(model, state_dict)
    if problem:
        raise ValueError(f"{what} {path} does not fit the model flags: {problem}")
    model.load_state_dict(state_dict, strict=True)
    return model
