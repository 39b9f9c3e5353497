"""Command-line entry of the training scripts (edm_train, cd_train, ct_train, cm_train)."""

import os

import numpy as np
import torch

from . import dist_util, logger
from .image_datasets import load_data
from .resample import create_named_schedule_sampler
from .schedules import create_ema_and_scales_fn
from .script_util import (
    TRAINING_MODES,
    OneLineArgumentParser,
    add_dict_to_argparser,
    args_to_dict,
    args_to_json,
    cm_train_defaults,
    create_model_and_diffusion,
    load_model_checkpoint,
    model_and_diffusion_defaults,
    run_script,
    train_defaults,
)
from .train_util import CMTrainLoop, TrainLoop


CT_DEFAULTS = dict(
    training_mode="consistency_training",
    target_ema_mode="adaptive",
    scale_mode="progressive",
    start_ema=0.95,
    start_scales=2,
    end_scales=200,
    total_training_steps=800000,
)


def create_argparser(training_mode):
    """The flags of a training script: train + model/diffusion (+ consistency flags unless EDM)."""
    defaults = train_defaults()
    defaults.update(model_and_diffusion_defaults())
    if training_mode == "edm":
        defaults["total_training_steps"] = 0
        defaults["training_mode"] = "edm"
    else:
        defaults.update(cm_train_defaults())
        defaults["training_mode"] = training_mode
        if training_mode == "consistency_training":
            defaults.update(CT_DEFAULTS)
    parser = OneLineArgumentParser(description=f"Train ({training_mode}).")
    add_dict_to_argparser(parser, defaults)
    return parser


def _init_from_teacher(flag, training_mode):
    if flag == "auto":
        return training_mode in ("consistency_distillation", "progdist")
    return flag == "true"


def _batch_size(args):
    if args.batch_size > 0:
        return args.batch_size
    world = dist_util.get_world_size()
    if args.global_batch_size % world:
        logger.log(f"warning: global_batch_size {args.global_batch_size} is not divisible by {world} ranks")
    return max(1, args.global_batch_size // world)


def _prepare(model, device, channels_last):
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def run(args):
    """Build everything from flags, then train; returns the finished loop."""
    loop = build_loop(args)
    loop.run_loop()
    logger.log(f"done at step {loop.step}; checkpoints in {logger.get_dir()}")
    return loop


def build_loop(args):
    """Set up processes and logging, build data, networks, teacher and target from flags; return the loop."""
    mode = getattr(args, "training_mode", "edm")
    if mode not in TRAINING_MODES:
        raise ValueError(f"unknown training_mode {mode!r}; allowed: {', '.join(TRAINING_MODES)}")
    if args.device != "auto":
        os.environ["CM_DEVICE"] = args.device
    dist_util.setup_dist()
    rank = dist_util.get_rank()
    log_dir = logger.configure(dir=args.log_dir or None)
    if rank == 0:
        with open(os.path.join(log_dir, "config.json"), "w") as f:
            f.write(args_to_json(args) + "\n")
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    device = dist_util.dev()

    model_kwargs = args_to_dict(args, model_and_diffusion_defaults().keys())
    loss_kwargs = {}
    if mode != "edm":
        loss_kwargs = dict(
            loss_norm=args.loss_norm,
            index_sampler=args.index_sampler,
            p_mean=args.p_mean,
            p_std=args.p_std,
            lpips_vgg_path=args.lpips_vgg_path,
        )
    distillation = mode in ("consistency_distillation", "consistency_training")
    model, diffusion = create_model_and_diffusion(**model_kwargs, distillation=distillation, **loss_kwargs)
    if mode in ("consistency_distillation", "consistency_training", "progdist"):
        diffusion.build_distance()
    logger.log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters ({args.model_type})")

    teacher, teacher_diffusion = None, None
    if mode in ("consistency_distillation", "progdist"):
        if not args.teacher_model_path:
            raise ValueError(f"training_mode {mode} needs --teacher_model_path (an EDM checkpoint)")
        teacher, teacher_diffusion = create_model_and_diffusion(
            **{**model_kwargs, "dropout": args.teacher_dropout}, distillation=False
        )
        load_model_checkpoint(teacher, args.teacher_model_path, "teacher checkpoint")
        teacher.train(args.teacher_dropout > 0)
        logger.log(f"teacher: {args.teacher_model_path} (dropout {args.teacher_dropout}, {args.teacher_solver} steps)")
    elif mode == "consistency_training" and args.teacher_model_path and not _init_from_teacher(args.init_from_teacher, mode):
        logger.log("note: consistency training ignores --teacher_model_path unless --init_from_teacher true")

    if mode != "edm" and _init_from_teacher(args.init_from_teacher, mode):
        if not args.teacher_model_path:
            raise ValueError("--init_from_teacher true needs --teacher_model_path")
        source = teacher
        if source is None:  # a throwaway copy (building it advances the RNG, which the run's streams rely on)
            source, _ = create_model_and_diffusion(**model_kwargs)
            load_model_checkpoint(source, args.teacher_model_path, "teacher checkpoint")
        model.load_state_dict(source.state_dict())
        logger.log(f"student starts from the teacher's weights ({args.teacher_model_path})")
    elif mode != "edm":
        logger.log(f"student starts from a random initialisation (seed {args.seed})")

    batch_size = _batch_size(args)
    data = load_data(
        data_dir=args.data_dir,
        batch_size=batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        random_flip=args.random_flip,
        seed=args.seed,
        on_bad_image=args.on_bad_image,
    )
    common = dict(
        model=_prepare(model, device, args.channels_last),
        diffusion=diffusion,
        data=data,
        batch_size=batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.use_fp16,
        use_bf16=args.use_bf16,
        fp16_scale_growth=args.fp16_scale_growth,
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        lr_warmup_steps=args.lr_warmup_steps,
        optimizer=args.optimizer,
        run_config=vars(args),
        channels_last=args.channels_last,
        time_limit=args.max_minutes * 60,
    )
    if mode == "edm":
        loop = TrainLoop(
            schedule_sampler=create_named_schedule_sampler(args.schedule_sampler, diffusion),
            total_training_steps=args.total_training_steps,
            **common,
        )
    else:
        target = None
        if mode != "progdist":
            target, _ = create_model_and_diffusion(**model_kwargs)
            target.load_state_dict(model.state_dict())
            _prepare(target, device, args.channels_last)
        if teacher is not None:
            _prepare(teacher, device, args.channels_last)
        loop = CMTrainLoop(
            target_model=target,
            teacher_model=teacher,
            teacher_diffusion=teacher_diffusion,
            training_mode=mode,
            ema_scale_fn=ema_and_scales_fn(args),
            total_training_steps=args.total_training_steps,
            teacher_solver=args.teacher_solver,
            **common,
        )
    logger.log(f"training ({mode}) on {device}, {dist_util.get_world_size()} rank(s), batch {batch_size} per rank")
    return loop


def ema_and_scales_fn(args, total_steps=None):
    """step -> (mu(k), N(k)) from the schedule flags; total_steps overrides --total_training_steps."""
    return create_ema_and_scales_fn(
        target_ema_mode=args.target_ema_mode,
        start_ema=args.start_ema,
        scale_mode=args.scale_mode,
        start_scales=args.start_scales,
        end_scales=args.end_scales,
        total_steps=args.total_training_steps if total_steps is None else total_steps,
        distill_steps_per_iter=args.distill_steps_per_iter,
    )


def main(training_mode="consistency_distillation", argv=None):
    """Parse flags (and --config), then train; bad input stops with one 'error:' line (CM_DEBUG=1 shows tracebacks)."""
    return run_script(create_argparser(training_mode), run, argv)
