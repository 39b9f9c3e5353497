"""The flag table, the resolved configuration and the table of training modes."""

import glob
import importlib.util
import inspect
import json
import os
import re
import shlex

import pytest
import torch
import yaml

from cm import config as cm_config
from cm import training_modes
from cm.flags import MODEL_AND_DIFFUSION_FLAGS
from cm.training_modes import FLAGS, script_flags
from cm.image_datasets import load_data
from cm.karras_diffusion import KarrasDenoiser
from cm.script_util import (
    cm_train_defaults,
    create_model,
    model_and_diffusion_defaults,
    parse_args_with_config,
    train_defaults,
)
from cm.train_cli import create_argparser, main
from cm.train_util import CMTrainLoop, TrainLoop

from helpers import TINY_MODEL, load_script, tiny_argv

ROOT = os.path.join(os.path.dirname(__file__), "..")
DATA = os.path.join(os.path.dirname(__file__), "data")
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def preset_args(path):
    with open(path) as f:
        mode = yaml.safe_load(f).get("training_mode", "edm")
    teacher = ["--teacher_model_path", "teacher.pt"] if training_modes.TRAINING_MODES[mode].teacher == "required" else []
    return parse_args_with_config(create_argparser(mode), ["--config", path, *teacher])


def resolve(argv, mode=None, world_size=1):
    return cm_config.resolve_training_config(create_argparser(mode).parse_args(argv), world_size)


# ----- the flag table -----------------------------------------------------------------------------


def test_the_reference_defaults_are_views_of_the_table():
    reference_model = dict(
        sigma_min=0.002, sigma_max=80.0, image_size=64, num_channels=128, num_res_blocks=2, num_heads=4,
        num_heads_upsample=-1, num_head_channels=-1, attention_resolutions="32,16,8", channel_mult="", dropout=0.0,
        class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False, use_fp16=False,
        use_new_attention_order=False, learn_sigma=False, weight_schedule="karras",
    )
    reference_cm = dict(
        teacher_model_path="", teacher_dropout=0.1, training_mode="consistency_distillation",
        target_ema_mode="fixed", scale_mode="fixed", total_training_steps=600000, start_ema=0.0, start_scales=40,
        end_scales=40, distill_steps_per_iter=50000, loss_norm="lpips",
    )
    reference_train = dict(
        data_dir="", schedule_sampler="lognormal", lr=1e-4, weight_decay=0.0, lr_anneal_steps=0,
        global_batch_size=2048, batch_size=-1, microbatch=-1, ema_rate="0.9999", log_interval=10,
        save_interval=10000, resume_checkpoint="", use_fp16=False, fp16_scale_growth=1e-3,
    )
    for ours, reference in ((model_and_diffusion_defaults(), reference_model), (cm_train_defaults(), reference_cm),
                            (train_defaults(), reference_train)):
        assert {k: ours[k] for k in reference} == reference
        assert all(ours[k] == FLAGS[k].default for k in ours)


def test_every_script_flag_comes_from_the_table_with_its_help_and_choices():
    parsers = {"train": create_argparser(None), "sample": load_script("image_sample").create_argparser(),
               "edit": load_script("image_edit").create_argparser(), "search": load_script("ternary_search").create_argparser()}
    for name, parser in parsers.items():
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        assert set(actions) == set(script_flags(name) + MODEL_AND_DIFFUSION_FLAGS), name
        for dest, action in actions.items():
            assert action.help.startswith(FLAGS[dest].help), dest
            assert action.choices == FLAGS[dest].choices, dest


def test_ncsnpp_flag_defaults_are_the_cifar10_network():
    from cm.ncsnpp import CIFAR10_CONFIG
    from cm.script_util import ncsnpp_defaults

    defaults = ncsnpp_defaults()
    assert defaults["fir_kernel"] == ",".join(str(t) for t in CIFAR10_CONFIG["fir_kernel"])
    assert all(defaults[k] == CIFAR10_CONFIG[k] for k in defaults if k != "fir_kernel")


# ----- presets and the resolved configuration ----------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_presets_resolve_to_the_values_they_had(path):
    """Every flag of every preset keeps the value it had before the flag table (tests/data/preset_flags.json; the
    LSUN EDM ema_rate since set to the reference launch line's, the digits presets' data_dir since moved to the
    training half digits_train, digits_ct's network and batch since changed for a CPU's five minutes: a cheaper
    UNet at batch 16, then a DiT at batch 128, then class-conditional at lr 2e-3),
    and lands in the group of the object it builds."""
    with open(os.path.join(DATA, "preset_flags.json")) as f:
        before = json.load(f).get(os.path.basename(path), {})  # presets added since have no earlier values
    args = preset_args(path)
    now = json.loads(json.dumps(vars(args), default=str))
    assert {k: now[k] for k in before if k != "teacher_model_path"} == {k: v for k, v in before.items() if k != "teacher_model_path"}
    config = json.loads(cm_config.config_to_json(cm_config.resolve_training_config(args)))
    for group in ("network", "denoiser", "schedule", "optimizer", "loop", "data"):
        given = {k: v for k, v in config[group].items() if FLAGS.get(k) and FLAGS[k].group == group}
        assert given == {k: now[k] for k in given}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_resolved_groups_are_the_keywords_of_the_objects_they_build(path):
    config = cm_config.resolve_training_config(preset_args(path))
    with torch.device("meta"):
        create_model(**config["network"])
    mode = training_modes.get_training_mode(config["training_mode"])
    diffusion = training_modes.build_denoiser(mode, config["denoiser"])
    assert getattr(diffusion, "distillation", False) == mode.boundary_condition  # sCM's TrigFlowDenoiser has none
    if "total_steps" in config["schedule"]:
        training_modes.get_training_mode(config["training_mode"]).schedule_fn(config["schedule"])
    assert set(config["data"]) <= set(inspect.signature(load_data).parameters)
    loop_kwargs = set(inspect.signature(TrainLoop.__init__).parameters)
    assert set(config["loop"]) | set(config["optimizer"]) <= loop_kwargs


def test_decisions_are_part_of_the_configuration():
    cd = resolve(tiny_argv(teacher_model_path="t.pt"), "consistency_distillation", world_size=1)
    assert cd["student_init"] == "teacher" and cd["denoiser"]["distillation"] is True
    assert cd["teacher"] == {"model_path": "t.pt", "in_loss": True, "solver": "heun", "stochastic": False,
                             "guidance_scale": 1.0, "network": {**cd["network"], "dropout": 0.1},
                             "denoiser": {**cd["denoiser"], "distillation": False}}
    ct = resolve(tiny_argv(), "consistency_training")
    assert ct["student_init"] == "random" and ct["teacher"] is None
    assert ct["schedule"]["scale_mode"] == "progressive" and ct["schedule"]["total_steps"] == 800000
    ct_from_teacher = resolve(tiny_argv(teacher_model_path="t.pt"), "consistency_training")
    assert ct_from_teacher["student_init"] == "teacher" and ct_from_teacher["teacher"]["in_loss"] is False
    scratch = resolve(tiny_argv(teacher_model_path="t.pt", init_from_teacher="false"), "consistency_training")
    assert scratch["student_init"] == "random"
    edm = resolve(tiny_argv(), "edm")
    assert edm["denoiser"]["distillation"] is False and edm["schedule"] == {"schedule_sampler": "lognormal"}
    assert edm["loop"]["total_training_steps"] == 0
    per_rank = resolve(tiny_argv(batch_size=-1, global_batch_size=2048), "edm", world_size=4)
    assert per_rank["loop"]["batch_size"] == per_rank["data"]["batch_size"] == 512


@pytest.mark.parametrize(
    "mode, flags, needle",
    [
        ("consistency_distillation", {}, "needs --teacher_model_path"),
        ("edm", {"teacher_model_path": "t.pt"}, "takes no teacher"),
        ("consistency_training", {"init_from_teacher": "true"}, "needs --teacher_model_path"),
        ("edm", {"learn_sigma": "true"}, "leave --learn_sigma false"),
    ],
)
def test_impossible_configurations_stop_with_one_line(mode, flags, needle):
    with pytest.raises(ValueError, match=needle):
        resolve(tiny_argv(**flags), mode)


def test_dry_run_prints_the_resolved_configuration(capsys):
    assert main("consistency_training", tiny_argv(dry_run="true", teacher_model_path="t.pt")) is None
    printed = json.loads(capsys.readouterr().out)
    expected = resolve(tiny_argv(teacher_model_path="t.pt"), "consistency_training")
    assert printed == json.loads(cm_config.config_to_json(expected))


def test_a_run_stores_its_resolved_configuration(tmp_path):
    loop = main("consistency_training", tiny_argv(log_dir=tmp_path, total_training_steps=1, loss_norm="l2"))
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored == json.loads(cm_config.config_to_json(loop.run_config))
    assert stored["network"]["image_size"] == TINY_MODEL["image_size"] and stored["run"]["world_size"] == 1
    state = torch.load(tmp_path / "state000001.pt", weights_only=False)
    assert state["config"] == loop.run_config


def test_a_mode_script_refuses_another_mode(capsys):
    with pytest.raises(SystemExit):
        main("consistency_training", tiny_argv(training_mode="edm"))
    assert "use scripts/cm_train.py --training_mode edm" in capsys.readouterr().err


def test_cm_train_keeps_the_reference_defaults_for_every_mode():
    args = create_argparser(None).parse_args(["--training_mode", "consistency_training"])
    assert (args.scale_mode, args.target_ema_mode, args.start_scales) == ("fixed", "fixed", 40)
    args = create_argparser("consistency_training").parse_args([])
    assert (args.scale_mode, args.target_ema_mode, args.start_scales) == ("progressive", "adaptive", 2)


# ----- the table of training modes ----------------------------------------------------------------


def test_no_mode_name_is_compared_outside_the_table():
    pattern = re.compile(
        r"""(?<![a-z_.])(training_mode|mode|mode_name)\s*(==|!=|\bin\b)|["']consistency["']\s+in\b"""
        r"""|["'](consistency_distillation|consistency_training)["']\s*(==|!=|\bin\b)"""
    )
    offenders = []
    sources = glob.glob(os.path.join(ROOT, "cm", "**", "*.py"), recursive=True)
    for path in sources + glob.glob(os.path.join(ROOT, "scripts", "*.py")):
        if os.path.basename(path) in ("training_modes.py", "flags.py"):
            continue
        with open(path) as f:
            offenders += [f"{os.path.basename(path)}:{i}" for i, line in enumerate(f, 1) if pattern.search(line)]
    assert offenders == []


TOY_METHOD = '''"""Toy: the consistency function at sigma_max maps noisy data to the data, l1 times --toy_weight."""

import torch

from cm.flags import flag_rows
from cm.modes.base import TrainingMode, unweighted
from cm.modes.consistency import consistency_schedule

FLAGS = flag_rows("toy", ("toy_weight", 1.0, "toy: weight of the l1 loss", None))


def bind_toy_loss(diffusion, context):
    weight = context.options["toy_weight"]

    def loss(model, x_start, model_kwargs, schedule):
        sigmas = torch.full((x_start.shape[0],), diffusion.sigma_max, device=x_start.device)
        noisy = x_start + diffusion.sigma_max * torch.randn_like(x_start)
        denoised = diffusion.denoise(model, noisy, sigmas, **model_kwargs)[1]
        return unweighted({"loss": weight * (denoised - x_start).abs().mean(dim=(1, 2, 3)), "sigma": sigmas})

    return loss


MODES = (
    TrainingMode(name="toy_denoising", description="toy: one-step denoising from sigma_max", bind_loss=bind_toy_loss,
                 loss_groups=("toy",), target=True, boundary_condition=True, make_schedule=consistency_schedule,
                 flag_defaults=dict(total_training_steps=3)),
)
'''


@pytest.fixture
def registry_restored():
    """The registry's tables as they were before the test (a test may register a method)."""
    modes, flags = dict(training_modes.TRAINING_MODES), dict(training_modes.FLAGS)
    yield
    for table, saved in ((training_modes.TRAINING_MODES, modes), (training_modes.FLAGS, flags)):
        table.clear()
        table.update(saved)


def test_a_new_method_is_one_module_one_preset_and_one_test(tmp_path, registry_restored):
    module_path = tmp_path / "toy_method.py"
    module_path.write_text(TOY_METHOD)
    spec = importlib.util.spec_from_file_location("toy_method", module_path)
    method = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(method)
    training_modes.register(method)
    toy = training_modes.get_training_mode("toy_denoising")
    assert "toy_weight" in script_flags("train") and "toy_weight" not in script_flags("sample")
    preset = tmp_path / "toy.yaml"
    preset.write_text("training_mode: toy_denoising\nloss_norm: l1\nstart_ema: 0.5\ntoy_weight: 2.0\n")
    loop = main(None, ["--config", str(preset), *tiny_argv(log_dir=tmp_path / "run", total_training_steps=3)])
    assert isinstance(loop, CMTrainLoop) and loop.step == 3 and loop.mode is toy
    assert loop.loss_options == {"toy_weight": 2.0}
    assert loop.diffusion.distillation and (tmp_path / "run" / "target_model000003.pt").exists()
    again = main(None, ["--config", str(preset), *tiny_argv(log_dir=tmp_path / "run", total_training_steps=4,
                                                           allow_config_change="true")])
    assert again.step == 4  # resumed from step 3
    with pytest.raises(ValueError, match="declared twice"):
        training_modes.register(method)


# ----- the reference's launch lines ---------------------------------------------------------------


def reference_launch_lines():
    with open(os.path.join(DATA, "reference_launch_lines.txt")) as f:
        return [shlex.split(line) for line in f if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("line", reference_launch_lines(), ids=lambda line: " ".join(line[:3]))
def test_reference_launch_lines_build_the_reference_objective(line):
    script, argv = line[0], line[1:]
    argv = [a.replace("/path/to/", "/data/") for a in argv]
    args = create_argparser("edm" if script == "edm_train" else None).parse_args(argv)
    config = cm_config.resolve_training_config(args, world_size=8)
    flags = dict(zip(argv[0::2], argv[1::2]))
    assert config["loop"]["ema_rate"] == flags["--ema_rate"]
    assert config["loop"]["batch_size"] * 8 == int(flags["--global_batch_size"])
    assert config["denoiser"]["weight_schedule"] == flags["--weight_schedule"]
    if script == "edm_train":
        assert config["training_mode"] == "edm" and config["teacher"] is None
        assert config["schedule"] == {"schedule_sampler": flags["--schedule_sampler"]}
        return
    # the teacher runs in eval mode (its dropout flag has no effect) and the student starts from it, CT included
    assert config["teacher"]["stochastic"] is False and config["student_init"] == "teacher"
    assert config["teacher"]["in_loss"] == (flags["--training_mode"] == "consistency_distillation")
    assert config["denoiser"]["loss_norm"] == flags["--loss_norm"] and config["denoiser"]["distillation"]
    schedule = config["schedule"]
    assert schedule["target_ema_mode"] == flags["--target_ema_mode"] and schedule["scale_mode"] == flags["--scale_mode"]
    assert schedule["start_ema"] == float(flags["--start_ema"]) and schedule["start_scales"] == int(flags["--start_scales"])
    assert schedule["total_steps"] == int(flags["--total_training_steps"])
    if "--end_scales" in flags:
        assert schedule["end_scales"] == int(flags["--end_scales"])
    assert config["optimizer"] == dict(optimizer="radam", lr=float(flags["--lr"]), weight_decay=0.0, lr_anneal_steps=0,
                                       lr_warmup_steps=0, adam_betas="0.9,0.999")  # RAdam's default betas


def test_a_run_shorter_than_its_lr_decay_warns_in_one_line(capsys):
    from cm.config import lr_decay_warning
    from cm.train_cli import main

    assert lr_decay_warning({"total_training_steps": 1700, "lr_anneal_steps": 1700}) is None
    assert lr_decay_warning({"total_training_steps": 0, "lr_anneal_steps": 1700}) is None
    assert lr_decay_warning({"total_training_steps": 30, "lr_anneal_steps": 1700, "time_budget_minutes": 5}) is None
    line = lr_decay_warning({"total_training_steps": 30, "lr_anneal_steps": 1700})
    assert "98% of --lr" in line and "--lr_anneal_steps 30" in line and "\n" not in line
    preset = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "digits_ct.yaml")
    main(None, ["--config", preset, "--total_training_steps", "30", "--dry_run"])
    err = capsys.readouterr().err
    assert err.count("warning: --lr_anneal_steps 2300 outlasts --total_training_steps 30") == 1


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_a_method_flag_the_mode_does_not_read_warns_in_one_line(path, capsys):
    from cm.config import unread_flags_warning
    from cm.train_cli import main

    assert unread_flags_warning(preset_args(path)) is None  # every preset sets only what its mode reads
    if os.path.basename(path) != "digits_cd.yaml":
        return
    line = unread_flags_warning({"training_mode": "consistency_distillation", "ct_target": "stf", "ect_q": 4})
    assert line == ("warning: training_mode consistency_distillation does not read --ct_target stf, --ect_q 4; "
                    "the run goes on without them")
    assert unread_flags_warning({"training_mode": "consistency_training", "ct_target": "stf"}) is None
    assert unread_flags_warning({"training_mode": "consistency_tuning", "ct_target": "stf", "ect_q": 4}) is None
    main(None, ["--config", path, "--teacher_model_path", "t.pt", "--ect_c", "0.1", "--dry_run"])
    err = capsys.readouterr().err
    assert err.count("warning: training_mode consistency_distillation does not read --ect_c 0.1;") == 1


def test_dry_run_names_what_does_not_apply_beside_the_whole_configuration(capsys):
    from cm.train_cli import main as train_main

    train_main(None, ["--training_mode", "consistency_training", "--batch_size", "4", "--dry_run"])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["network"]["fir"] is True  # the configuration itself stays whole
    notes = captured.err.strip().splitlines()
    adm = [n for n in notes if n.startswith("note: not applied (read by other network families only; the network is adm)")]
    assert len(adm) == 1 and "fir_kernel" in adm[0] and "dit_size" in adm[0] and "num_channels" not in adm[0]
    assert any("global_batch_size" in n and "--batch_size 4" in n for n in notes)
    train_main(None, ["--training_mode", "consistency_training", "--model_type", "dit", "--dry_run"])
    dit = capsys.readouterr().err
    assert "the network is dit)" in dit and "num_channels" in dit and "fir_kernel" in dit and "dit_size" not in dit
    train_main(None, ["--training_mode", "consistency_training", "--model_type", "ncsnpp", "--dry_run"])
    err = capsys.readouterr().err
    assert "the network is ncsnpp)" in err and "dit_size" in err and "fir_kernel" not in err
