"""Resolve, then build: parsed flags -> the whole configuration of a run, grouped by the object each part builds.

`resolve_training_config` is a pure function of the flag values and the number of ranks. Its result holds
what is given (flag values, under the keyword names of the objects they build) and what is decided
(the consistency-model scalings, how the student starts, the teacher's mode, the batch of each rank).
`--dry_run` prints it, the run stores it in config.json and in every checkpoint, and a resumed run compares
it with the stored one. cm.train_cli.build_loop builds the objects from it.
"""

import json

from .flags import DIT_FLAGS, NCSNPP_FLAGS, UNET_FLAGS
from .latent import latent_network, resolve_latent_norm
from .training_modes import FLAGS, TRAINING_MODES, get_training_mode, method_flags

LEARN_SIGMA_ERROR = (
    "learn_sigma true gives the network 6 output channels, which no loss or sampler of these models uses "
    "(the reference's denoiser fails on them); leave --learn_sigma false"
)


def group_values(flags, group, drop=()):
    """{flag name: value} of the flags of `group` present in `flags`, less the names in `drop`."""
    return {name: flags[name] for name, flag in FLAGS.items() if flag.group == group and name in flags and name not in drop}


def flag_value(flags, name):
    """The value of flag `name` in `flags`, or its default in the table when the caller did not give it."""
    return flags.get(name, FLAGS[name].default)


def as_flags(args):
    """An argparse namespace (or a dict of flag values) as a plain dict."""
    return dict(args) if isinstance(args, dict) else dict(vars(args))


def resolve_model_config(args):
    """{"training_mode", "network", "denoiser"}: how to build the network and its denoiser (the mode's class, by
    default KarrasDenoiser with the boundary-condition choice) from flags."""
    flags = as_flags(args)
    mode = get_training_mode(flags["training_mode"])
    network = group_values(flags, "network")
    if network.get("learn_sigma"):
        raise ValueError(LEARN_SIGMA_ERROR)
    denoiser = {name: value for group in mode.denoiser_groups for name, value in group_values(flags, group).items()}
    if mode.make_denoiser is None:
        denoiser["distillation"] = mode.boundary_condition
    latent = group_values(flags, "latent")
    if latent.get("autoencoder_path"):  # the network works on latents: their channels and size (cm.latent)
        network.update(latent_network(latent["autoencoder_path"], network["image_size"]))
    return {"training_mode": mode.name, "network": network, "denoiser": denoiser, "latent": latent}


def per_rank_batch(batch_size, global_batch_size, world_size):
    """Images per step on each rank: batch_size when positive, else global_batch_size // world_size (the
    reference's rounding down; at least 1)."""
    if batch_size > 0:
        return batch_size
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive when batch_size is -1, got {global_batch_size}")
    return max(1, global_batch_size // world_size)


def check_guided_teacher(mode, network):
    """One line for --teacher_guidance_scale where it cannot act: a mode whose loss does not guide its teacher, or a
    teacher without the null class that classifier-free guidance needs."""
    if not mode.guided_teacher:
        guided = " and ".join(name for name, m in TRAINING_MODES.items() if m.guided_teacher)
        raise ValueError(f"--teacher_guidance_scale applies to {guided}, not {mode.name} (lcm draws its own guidance "
                         "scales: --w_min / --w_max)")
    if not (network.get("class_cond") and network.get("null_class")):
        raise ValueError("--teacher_guidance_scale needs a class-conditional teacher with a null class: "
                         "--class_cond true --null_class true (the teacher trained with --class_dropout_prob 0.1)")


def resolve_teacher(flags, mode, network):
    """The teacher's configuration (None without one) and whether the student starts from its weights."""
    path = flag_value(flags, "teacher_model_path")
    choice = flag_value(flags, "init_from_teacher")
    init_student = bool(path) if choice == "auto" else choice == "true"
    if mode.teacher == "required" and not path:
        raise ValueError(f"training_mode {mode.name} needs --teacher_model_path (an EDM checkpoint)")
    if mode.teacher == "none" and path:
        raise ValueError(
            f"training_mode {mode.name} takes no teacher; to start from a checkpoint pass --resume_checkpoint"
        )
    if init_student and not path:
        raise ValueError("--init_from_teacher true needs --teacher_model_path")
    guidance = float(flag_value(flags, "teacher_guidance_scale"))
    if guidance != 1.0:
        check_guided_teacher(mode, network)
    if not path:
        return None, False
    stochastic = bool(flag_value(flags, "teacher_stochastic"))
    teacher = {
        "model_path": path,
        "in_loss": mode.teacher_in_loss,
        "solver": flag_value(flags, "teacher_solver") if mode.teacher_ode_steps else None,
        "stochastic": stochastic,
        "guidance_scale": guidance,
        # a diffusion model: the student's architecture without sCM's log-variance head, EDM's preconditioning
        "network": {**network, "dropout": flag_value(flags, "teacher_dropout"), "logvar_channels": 0,
                    **mode.teacher_network},
        "denoiser": {**group_values(flags, "denoiser"), "distillation": False},
    }
    return teacher, init_student


def resolve_schedule(flags, mode, images_per_step=None):
    """The schedule of the mode: mu(k) / N(k) arguments, or the EDM noise-level sampler's name; images_per_step (the
    global batch) joins them for modes whose stages are counted in images."""
    schedule = {}
    for group in mode.schedule_groups:
        schedule.update(group_values(flags, group))
    if not mode.has_step_schedule:  # the groups configure EDM's noise-level sampler
        return schedule
    schedule["total_steps"] = flags["total_training_steps"]
    if mode.schedule_in_images:
        schedule["images_per_step"] = images_per_step
    return schedule


def resolve_training_config(args, world_size=1):
    """Flags (after --config) and the number of ranks -> the resolved, grouped training configuration.

    Groups: network, denoiser, schedule, teacher (None without one), loss (the mode's own options), optimizer,
    loop, data, run, plus the decisions training_mode and student_init ("teacher" or "random").
    """
    flags = as_flags(args)
    model = resolve_model_config(flags)
    mode = get_training_mode(model["training_mode"])
    network = model["network"]
    teacher, init_student = resolve_teacher(flags, mode, network)
    batch_size = per_rank_batch(flags["batch_size"], flags["global_batch_size"], world_size)
    if flags["time_budget_minutes"] < 0:
        raise ValueError(f"--time_budget_minutes must be 0 (none) or positive, got {flags['time_budget_minutes']}")
    loop = group_values(flags, "loop", drop=("max_minutes", "time_budget_minutes"))
    loop.update(batch_size=batch_size, use_fp16=network["use_fp16"], time_limit=60.0 * flags["max_minutes"],
                time_budget=60.0 * flags["time_budget_minutes"])
    data = group_values(flags, "data")
    data.update(batch_size=batch_size, image_size=flags["image_size"], class_cond=network["class_cond"],
                seed=flags["seed"])
    if loop.get("class_dropout_prob", FLAGS["class_dropout_prob"].default) > 0 and not network.get("null_class"):
        raise ValueError("--class_dropout_prob needs --null_class true (the null label that replaces dropped labels)")
    run = group_values(flags, "run", drop=("training_mode", "dry_run"))
    run["world_size"] = world_size
    config = {
        "training_mode": mode.name,
        "student_init": "teacher" if init_student else "random",
        "network": network,
        "denoiser": model["denoiser"],
        "schedule": resolve_schedule(flags, mode, batch_size * world_size),
        "teacher": teacher,
        "loss": {k: v for group in mode.loss_groups for k, v in group_values(flags, group).items()},
        "optimizer": group_values(flags, "optimizer"),
        "loop": loop,
        "data": data,
        "latent": resolve_latent_norm(model["latent"], data["data_dir"]),
        "run": run,
    }
    if mode.check_config is not None:
        mode.check_config(config)
    return config


def resolve_script_config(args, script_groups):
    """Sampling-type scripts: the model's configuration plus the script's own flag groups and the run group."""
    flags = as_flags(args)
    config = resolve_model_config(flags)
    for group in script_groups:
        config[group] = group_values(flags, group)
    config["run"] = group_values(flags, "run", drop=("training_mode", "dry_run"))
    for name in ("use_bf16", "channels_last"):
        if name in flags:
            config["run"][name] = flags[name]
    return config


def config_to_json(config):
    """The configuration as indented JSON (for --dry_run, config.json and checkpoints)."""
    return json.dumps(config, indent=2, sort_keys=True, default=str)


def unread_flags_warning(flags):
    """One line naming the training methods' own flags (their groups: ect, scm_loss, ct_target, ...) that are set away
    from their defaults but belong to groups the run's --training_mode does not read, else None: the resolved
    configuration holds only the mode's groups, so such a value would be dropped without a word."""
    flags = as_flags(flags)
    mode = TRAINING_MODES.get(flags.get("training_mode"))
    if mode is None:
        return None
    read = set(mode.loss_groups) | set(mode.schedule_groups) | set(mode.denoiser_groups)
    # the methods' own groups: those their modules declare, and every mode's loss groups (ct_target sits in the
    # shared table but only CT and ECT read it)
    method_groups = {FLAGS[name].group for name in method_flags()}
    method_groups |= {group for other in TRAINING_MODES.values() for group in other.loss_groups}
    unread = [f"--{name} {flags[name]}" for name, flag in FLAGS.items()
              if flag.group in method_groups - read - {"denoiser"} and name in flags and flags[name] != flag.default]
    if not unread:
        return None
    return f"warning: training_mode {mode.name} does not read {', '.join(unread)}; the run goes on without them"


def lr_decay_warning(flags):
    """One line when the linear lr decay outlasts the run (lr_anneal_steps > total_training_steps), else None: a
    shortened preset then stops at a high lr. A time budget re-plans both lengths together, so it gets none."""
    flags = as_flags(flags)
    total, anneal = flags.get("total_training_steps", 0) or 0, flags.get("lr_anneal_steps", 0) or 0
    if total <= 0 or anneal <= total or flags.get("time_budget_minutes", 0):
        return None
    return (
        f"warning: --lr_anneal_steps {anneal} outlasts --total_training_steps {total}: the run ends at "
        f"{1 - total / anneal:.0%} of --lr instead of decaying to 0; pass --lr_anneal_steps {total} to decay "
        "within the run"
    )




def not_applied_notes(config):
    """Lines for --dry_run (beside the configuration, which stays whole) naming the values that do not apply to
    this run: network keys read by another network family only (NCSN++'s, DiT's, the UNets' widths and levels), and
    the global batch when --batch_size fixes each rank's."""
    notes = []
    network = config.get("network") or {}
    family = network.get("model_type", "adm")
    others = {"adm": NCSNPP_FLAGS + DIT_FLAGS, "ncsnpp": DIT_FLAGS, "dit": NCSNPP_FLAGS + UNET_FLAGS}.get(family, ())
    unused = [k for k in network if k in others]
    if unused:
        notes.append(f"note: not applied (read by other network families only; the network is {family}): "
                     f"network {', '.join(unused)}")
    run = config.get("run") or {}
    if run.get("batch_size", -1) > 0 and "global_batch_size" in run:
        notes.append(f"note: not applied: run global_batch_size {run['global_batch_size']} (--batch_size "
                     f"{run['batch_size']} sets the batch of each rank)")
    return notes
