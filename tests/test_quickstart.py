import importlib.util
import json
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def load_quickstart():
    path = os.path.join(HERE, "..", "scripts", "quickstart.py")
    spec = importlib.util.spec_from_file_location("quickstart", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cm-cache"))


@pytest.mark.parametrize("mode", ["ct", "cd"])
def test_quickstart_runs_end_to_end_in_a_short_mode(tmp_path, mode):
    metrics = load_quickstart().main(["--mode", mode, "--steps", "8", "--out", str(tmp_path), "--num_samples", "64"])
    names = set(os.listdir(tmp_path))
    for name in ("onestep_grid.png", "twostep_grid.png", "real_grid.png", "training_curves.png", "metrics.json",
                 "samples_onestep_64x16x16x3.npz", "samples_twostep_64x16x16x3.npz"):
        assert name in names, name
    with open(tmp_path / "metrics.json") as f:
        saved = json.load(f)
    assert saved["steps"] == 8 and saved["mode"] == mode
    floor = saved["real digits (floor)"]["digits_fid"]
    assert metrics["one-step"]["digits_fid"] > floor  # 8 steps are far from the data
    stage = "ct" if mode == "ct" else "cd"
    assert "model000008.pt" in os.listdir(tmp_path / stage)


def test_time_budget_replans_steps_and_schedules_to_end_on_time(tmp_path, monkeypatch):
    quickstart = load_quickstart()
    monkeypatch.setattr(quickstart, "TIMING_STEPS", 4)
    monkeypatch.setattr(quickstart, "FINAL_STRETCH", 6)
    opts = quickstart.parse_args(["--out", str(tmp_path), "--precision", "fp32"])
    args = quickstart.training_args("digits_ct.yaml", "consistency_training", str(tmp_path / "ct"), opts,
                                    ["--batch_size", "4"])
    assert not args.use_bf16
    loop = quickstart.train_stage(args, budget_s=3.0, fixed_steps=0)
    assert loop.step == loop.total_training_steps == loop.lr_anneal_steps == args.total_training_steps > 4
    # the schedule was re-planned for the final step count: N(k) reaches end_scales + 1 on the last step
    assert loop.ema_scale_fn(loop.step - 1)[1] == args.end_scales + 1
    assert loop.opt.param_groups[0]["lr"] == 0.0


def test_precision_auto_follows_the_hardware():
    quickstart = load_quickstart()
    from cm.fp16_util import bf16_is_native

    opts = quickstart.parse_args(["--device", "cpu"])
    assert quickstart.use_bf16(opts) == bf16_is_native("cpu")
    assert quickstart.use_bf16(quickstart.parse_args(["--precision", "bf16"]))
