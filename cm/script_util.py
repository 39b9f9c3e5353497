"""The reference's configuration API (defaults dicts, create_model_and_diffusion, argparse helpers) and the
command-line plumbing every script shares.

The flags themselves (defaults, help, choices, the object each builds) live once, in cm.flags; the dicts
here are views of that table. `parse_args_with_config` adds `--config FILE.yaml` (keys are flag names,
flags on the command line win); `run_script` is every script's main().
"""

import argparse
import json
import os
import sys

from . import dist_util, errors, logger, run_config, schedules
from .checkpoint_io import load_fitting_state_dict
from .config import config_to_json, group_values, lr_decay_warning, not_applied_notes, unread_flags_warning
from .flags import CM_TRAIN_FLAGS, MODEL_AND_DIFFUSION_FLAGS, NCSNPP_FLAGS, TRAIN_FLAGS
from .karras_diffusion import KarrasDenoiser
from .networks import create_model, resolve_channel_mult  # noqa: F401  (the reference's location of create_model)
from .training_modes import FLAGS, defaults_of, flag_choices, flag_help, script_defaults
from .training_modes import TRAINING_MODES as _MODE_TABLE

create_ema_and_scales_fn = schedules.create_ema_and_scales_fn  # re-exported at the reference's location

TRAINING_MODES = tuple(_MODE_TABLE)


def model_and_diffusion_defaults():
    """Defaults of the network and KarrasDenoiser flags (the reference's, plus attention_type, model_type, NCSN++)."""
    return defaults_of(MODEL_AND_DIFFUSION_FLAGS)


def ncsnpp_defaults():
    """NCSN++-only flags (score_sde names), defaulting to the CIFAR-10 configuration; ignored by the ADM UNet."""
    return defaults_of(NCSNPP_FLAGS)


def cm_train_defaults():
    """Defaults of the consistency / distillation training flags (the reference's, plus the iCT options)."""
    return defaults_of(CM_TRAIN_FLAGS)


def train_defaults():
    """Flags of the training loop (the reference's, plus optimizer, precision, seed, log dir and data options)."""
    return defaults_of(TRAIN_FLAGS)


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
    **options,
):
    """Build (network, KarrasDenoiser) from flag values: the reference's signature, plus any other network or
    denoiser flag of cm.flags as a keyword (model_type, attention_type, loss_norm, ...)."""
    flags = dict(
        image_size=image_size, class_cond=class_cond, learn_sigma=learn_sigma, num_channels=num_channels,
        num_res_blocks=num_res_blocks, channel_mult=channel_mult, num_heads=num_heads,
        num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
        attention_resolutions=attention_resolutions, dropout=dropout, use_checkpoint=use_checkpoint,
        use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown, use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order, weight_schedule=weight_schedule, sigma_min=sigma_min,
        sigma_max=sigma_max, **options,
    )
    unknown = sorted(k for k in options if k not in FLAGS or FLAGS[k].group not in ("network", "denoiser"))
    if unknown:
        raise TypeError(f"create_model_and_diffusion got unknown arguments: {', '.join(unknown)}")
    model = create_model(**group_values(flags, "network"))
    diffusion = KarrasDenoiser(**group_values(flags, "denoiser"), distillation=distillation)
    return model, diffusion


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
    """Add --key flags typed like their defaults, with help text and allowed values. A boolean flag takes a
    value parsed by str2bool or stands alone: `--dry_run` is `--dry_run true`.

    :param help_text: {key: help text} (default: every flag's, cm.training_modes.flag_help()).
    :param choices: {key: allowed values} of enum flags (default: cm.training_modes.flag_choices()).
    """
    help_text = flag_help() if help_text is None else help_text
    choices = flag_choices() if choices is None else choices
    for k, v in default_dict.items():
        v_type = str if v is None else type(v)
        kwargs = dict(default=v, type=v_type, help=help_text.get(k, "") + " (default: %(default)s)")
        if isinstance(v, bool):
            kwargs.update(type=str2bool, nargs="?", const=True)
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
    values, source = config_values(pre)
    if values is not None:
        actions = {a.dest: a for a in parser._actions}
        # keys of other cm scripts (e.g. training flags in a file given to image_sample.py) are skipped
        values = {k: v for k, v in values.items() if k in actions or k not in FLAGS}
        unknown = sorted(k for k in values if k not in actions or k == "config")
        if unknown:
            parser.error(f"config file {source} has unknown keys: {', '.join(unknown)}")
        converted = {}
        for key, value in values.items():
            action = actions[key]
            try:
                converted[key] = action.type(value) if action.type and value is not None else value
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                parser.error(f"config file {source}: bad value for {key}: {e}")
            if action.choices is not None and converted[key] not in action.choices:
                parser.error(
                    f"config file {source}: {key} must be one of {', '.join(map(str, action.choices))}, "
                    f"got {value!r}"
                )
        parser.set_defaults(**converted)
    return parser.parse_args(argv)


def config_values(pre):
    """(flag values, their file) that become the parser's defaults: --config (flat flag values, or a run's
    config.json whose model part is used), else the configuration of the run that wrote --model_path
    (cm.run_config); (None, None) when there is neither."""
    if pre.config:
        if pre.config.endswith(".json"):
            config = run_config.read_run_config_file(pre.config)
            if config is not None:
                return run_config.model_flag_values(config), pre.config
        return load_config(pre.config), pre.config
    config, where = run_config.find_run_config(getattr(pre, "model_path", ""))
    if config is None:
        return None, None
    return run_config.model_flag_values(config), where


def run_or_exit(fn, *args):
    """fn(*args); an exception becomes one 'error:' line on stderr and exit status 1 (cm.errors): bad input
    just the line, anything unexpected also a file with the full traceback (named in the line). CM_DEBUG=1
    re-raises instead."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - every failure of a script ends in one line
        if os.environ.get("CM_DEBUG"):
            raise
        errors.exit_on_error(e, logger.configured_dir())


def create_parser(script, description, training_mode=None):
    """The parser of a script ("train", "sample", "edit", "search"): its flags from cm.flags with their help,
    choices and the script's defaults (training scripts: the mode's defaults too; None keeps the table's)."""
    parser = OneLineArgumentParser(description=description)
    add_dict_to_argparser(parser, script_defaults(script, training_mode))
    return parser


def run_script(parser, run, argv=None, resolve=None):
    """The body of every script's main(): flags and --config, then run(args) with bad input reported in one
    line. --dry_run prints the resolved configuration (`resolve(args)`, default the flags) and exits."""
    args = parse_args_with_config(parser, argv)
    for warning in (lr_decay_warning(args), unread_flags_warning(args)):
        if warning and launch_rank() == 0:
            print(warning, file=sys.stderr)
    if getattr(args, "dry_run", False):
        if resolve is None:
            print(args_to_json(args))
            return None
        config = run_or_exit(resolve, args)
        print(config_to_json(config))
        for note in not_applied_notes(config):
            print(note, file=sys.stderr)
        return None
    return run_or_exit(run, args)


def launch_rank():
    """This process's rank as its launcher (torchrun, mpiexec) set it, before any process group exists."""
    for name in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def args_to_json(args):
    """The resolved configuration as indented JSON (for --dry_run, the log dir and checkpoints)."""
    return json.dumps(vars(args), indent=2, sort_keys=True, default=str)


def load_model_checkpoint(model, path, what="checkpoint"):
    """Load a state dict file into model (strict), or stop with one line saying which keys / shapes differ."""
    if not path:
        raise ValueError(f"no {what} path given")
    try:
        state_dict = dist_util.load_state_dict(path, map_location="cpu")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist; {run_config.missing_checkpoint_note(path)}") from None
    if isinstance(state_dict, dict) and "state_dict" in state_dict and not any(k.endswith(".weight") for k in state_dict):
        state_dict = state_dict["state_dict"]
    return load_fitting_state_dict(model, state_dict, path, what)
