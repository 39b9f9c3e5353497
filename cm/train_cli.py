"""Command-line entry of the training scripts (edm_train, cd_train, ct_train, cm_train): resolve, then build.

`create_argparser(mode)` builds a training script's flags from cm.flags; `cm.config.resolve_training_config`
turns the parsed flags into the grouped configuration; `build_training(config)` builds the data,
networks, teacher, target and loop from it, reading the mode's entry of cm.training_modes.
"""

import os

import numpy as np
import torch

from . import dist_util, logger
from .compile import compile_blocks
from .config import resolve_training_config
from .image_datasets import load_data
from .latent import LATENT_CHANNEL_STD, ChannelNormalized, LatentStream, channel_normalizer, load_autoencoder
from .karras_diffusion import KarrasDenoiser
from .resample import create_named_schedule_sampler
from .run_dir import check_log_dir, write_run_config
from .script_util import create_model, create_parser, load_model_checkpoint, run_script
from .train_util import CMTrainLoop, TrainLoop
from .training_modes import build_denoiser, get_training_mode


def create_argparser(training_mode=None):
    """The flags of a training script; training_mode fixes the mode and its defaults (None: cm_train.py,
    the reference's defaults for every mode)."""
    what = get_training_mode(training_mode).description if training_mode else "any --training_mode"
    return create_parser("train", f"Train: {what}.", training_mode)


def resolve(args):
    """The resolved configuration of parsed training flags, for the ranks this process was launched with."""
    return resolve_training_config(args, dist_util.launch_world_size())


def run(args):
    """Build everything from flags, then train; returns the finished loop."""
    loop = build_loop(args)
    loop.run_loop()
    logger.log(f"done at step {loop.step}; checkpoints in {logger.get_dir()}")
    return loop


def build_loop(args):
    """Set up processes, resolve the flags into the configuration, build the loop from it."""
    if args.device != "auto":
        os.environ["CM_DEVICE"] = args.device
    dist_util.setup_dist()
    return build_training(resolve_training_config(args, dist_util.get_world_size()))


def _prepare(model, device, channels_last, compile=False):
    """The network on its device, in channels_last when asked, its blocks compiled when asked (cm.compile)."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        compile_blocks(model)
    return model


def build_teacher(config):
    """(teacher network, its EDM KarrasDenoiser) loaded from the teacher checkpoint, in eval mode unless the
    configuration asks for a stochastic teacher."""
    teacher_config = config["teacher"]
    teacher = create_model(**teacher_config["network"])
    load_model_checkpoint(teacher, teacher_config["model_path"], "teacher checkpoint")
    teacher.train(teacher_config["stochastic"])
    return teacher, KarrasDenoiser(**teacher_config["denoiser"])


def describe_teacher(teacher_config):
    """One log line on the teacher: its file, solver and whether its dropout is active."""
    dropout = teacher_config["network"]["dropout"]
    if teacher_config["stochastic"]:
        how = f"train mode, dropout {dropout} active (--teacher_stochastic true)"
    else:
        how = "eval mode, no dropout, as the reference"
    steps = f"; {teacher_config['solver']} steps" if teacher_config["solver"] else ""
    return f"teacher: {teacher_config['model_path']} ({how}{steps})"


def init_student(model, config, teacher):
    """Copy the teacher's weights into the student when the configuration decided so, and say which it was."""
    mode = get_training_mode(config["training_mode"])
    if config["student_init"] != "teacher":
        if mode.teacher != "none":
            logger.log(f"student starts from a random initialisation (seed {config['run']['seed']})")
        return
    source = teacher
    if source is None:  # a throwaway copy (building it advances the RNG, which the run's streams rely on)
        source = create_model(**config["teacher"]["network"])
        load_model_checkpoint(source, config["teacher"]["model_path"], "teacher checkpoint")
    # strict over the teacher's parameters; the student's own additions (sCM's logvar_head) keep their initialisation
    model.load_state_dict({**model.state_dict(), **source.state_dict()})
    why = "" if mode.teacher == "required" else " (the reference's behaviour for --teacher_model_path; " \
        "--init_from_teacher false starts from scratch)"
    logger.log(f"student starts from the teacher's weights ({config['teacher']['model_path']}){why}")


def build_training(config):
    """Logging, seeds, data, networks, teacher, target and the loop, from a resolved configuration."""
    mode = get_training_mode(config["training_mode"])
    run_config = config["run"]
    if run_config["compile"] and config["loop"]["parallel"] == "fsdp":
        raise ValueError("--compile is not supported with --parallel fsdp yet (compiled blocks are not checked under "
                         "sharding): drop one of them")
    log_dir = logger.configure(dir=run_config["log_dir"] or None)
    check_log_dir(log_dir, config)  # another run's checkpoints, or this run's with other settings, stop here
    rank = dist_util.get_rank()
    write_run_config(log_dir, config)
    torch.manual_seed(run_config["seed"] + rank)
    np.random.seed(run_config["seed"] + rank)
    device = dist_util.dev()
    channels_last = config["loop"]["channels_last"]

    model = create_model(**config["network"])
    diffusion = build_denoiser(mode, config["denoiser"])
    if mode.uses_distance:
        diffusion.build_distance()  # LPIPS weights load now, so a missing file fails before training
    logger.log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters ({config['network']['model_type']})")

    teacher, teacher_diffusion = None, None
    if config["teacher"] is not None and config["teacher"]["in_loss"]:
        teacher, teacher_diffusion = build_teacher(config)
        logger.log(describe_teacher(config["teacher"]))
    init_student(model, config, teacher)

    batch_size = config["loop"]["batch_size"]
    if run_config["batch_size"] <= 0 and batch_size * run_config["world_size"] != run_config["global_batch_size"]:
        logger.log(f"warning: global_batch_size {run_config['global_batch_size']} is not divisible by "
                   f"{run_config['world_size']} ranks; using {batch_size * run_config['world_size']}")
    data = load_data(**config["data"])
    autoencoder_path = config.get("latent", {}).get("autoencoder_path")
    if autoencoder_path:  # train on the autoencoder's latents (cm.latent)
        data = LatentStream(data, load_autoencoder(autoencoder_path, device), device)
        logger.log(f"latent space of {autoencoder_path}: the network sees {config['network']['in_channels']} x "
                   f"{config['network']['image_size']}^2 latents")
    normalizer = channel_normalizer(config.get("latent", {}))
    if normalizer is not None:  # --latent_norm channel
        data = ChannelNormalized(data, *normalizer)
        logger.log(f"latents normalised per channel to std {LATENT_CHANNEL_STD} (mean {config['latent']['latent_mean']}, "
                   f"std {config['latent']['latent_std']})")
    common = dict(
        model=_prepare(model, device, channels_last, run_config["compile"]),
        diffusion=diffusion,
        data=data,
        run_config=config,
        seed=run_config["seed"],
        **config["optimizer"],
        **config["loop"],
    )
    if not mode.has_step_schedule:
        sampler = create_named_schedule_sampler(config["schedule"]["schedule_sampler"], diffusion)
        loop = TrainLoop(schedule_sampler=sampler, **common)
    else:
        target = None
        if mode.target:
            target = create_model(**config["network"])
            target.load_state_dict(model.state_dict())
            _prepare(target, device, channels_last, run_config["compile"])
        if teacher is not None:
            _prepare(teacher, device, channels_last, run_config["compile"])
        loop = CMTrainLoop(
            target_model=target,
            teacher_model=teacher,
            teacher_diffusion=teacher_diffusion,
            training_mode=mode.name,
            schedule_fn=mode.schedule_fn(config["schedule"]),
            teacher_solver=config["teacher"]["solver"] if config["teacher"] else None,
            loss_options=config["loss"],
            **common,
        )
    logger.log(f"training ({mode.name}) on {device}, {run_config['world_size']} rank(s), batch {batch_size} per rank")
    return loop


def main(training_mode=None, argv=None):
    """Parse flags (and --config), then train; bad input stops with one 'error:' line (CM_DEBUG=1 shows tracebacks).

    training_mode: the mode a *_train.py script trains (its defaults apply; --training_mode must agree), or
    None for cm_train.py (any --training_mode, the reference's defaults).
    """
    def checked_run(args):
        _check_script_mode(training_mode, args.training_mode)
        return run(args)

    return run_script(create_argparser(training_mode), checked_run, argv, resolve=resolve)


def _check_script_mode(script_mode, flag_mode):
    if script_mode is not None and flag_mode != script_mode:
        raise ValueError(
            f"this script trains {script_mode}, but --training_mode is {flag_mode}; "
            f"use scripts/cm_train.py --training_mode {flag_mode}"
        )
