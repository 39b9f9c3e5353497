import importlib.util
import json
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SEARCH_SAMPLES = 32  # behind each score of the two-step search (300 by default): the tests check the search runs


def load_quickstart():
    path = os.path.join(HERE, "..", "scripts", "quickstart.py")
    spec = importlib.util.spec_from_file_location("quickstart", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode, default_ts", [("ct", [0, 23, 40]), ("cd", [0, 10, 17])])
def test_quickstart_runs_end_to_end_in_a_short_mode(tmp_path, mode, default_ts, capsys):
    metrics = load_quickstart().main(["--mode", mode, "--steps", "8", "--out", str(tmp_path), "--num_samples", "64",
                                      "--search_samples", str(SEARCH_SAMPLES)])
    names = set(os.listdir(tmp_path))
    for name in ("onestep_grid.png", "twostep_grid.png", "twostep_default_grid.png", "real_grid.png",
                 "training_curves.png", "metrics.json", "samples_onestep_64x16x16x3.npz",
                 "samples_twostep_64x16x16x3.npz", "samples_twostep_default_64x16x16x3.npz"):
        assert name in names, name
    with open(tmp_path / "metrics.json") as f:
        saved = json.load(f)
    assert saved["steps"] == 8 and saved["mode"] == mode
    assert saved["two_step_ts_default"] == default_ts and len(saved["two_step_ts_searched"]) == 3
    assert saved["two_step_ctm_gamma"] == 0.9  # CTM's gamma-sampling, the quickstart's two-step re-noising
    spread = saved["real digits (random halves)"]
    assert spread["p10"] <= spread["median"] <= spread["p90"] and 0 <= spread["floor_percentile"] <= 100
    floor = saved["real digits (floor)"]
    for row in ("one-step", "two-step default", "two-step searched", "real digits (floor)"):
        assert 0 <= saved[row]["nearest_is_train"] <= 1 and 0 <= saved[row]["copy_fraction"] <= 1
        assert metrics[row]["digits_fid"] == saved[row]["digits_fid"]
    for row in ("one-step", "two-step default", "two-step searched"):  # each the mean over four draws of 64
        draws = saved[row]["digits_fid_draws"]
        assert len(draws) == 4 and saved[row]["digits_fid"] == pytest.approx(sum(draws) / 4, rel=1e-12)
    assert "digits_fid_draws" not in floor  # one fixed split of real digits
    assert metrics["one-step"]["digits_fid"] > floor["digits_fid"]  # 8 steps are far from the data
    hardware = saved["hardware"]
    assert hardware["cpu"] and isinstance(hardware["cpu_bf16_native"], bool) and hardware["cpu_cores"] >= 1
    printed = capsys.readouterr().out
    assert f"hardware: {hardware['cpu']}" in printed and "native bfloat16:" in printed
    assert f"two-step {tuple(default_ts)} default" in printed and "nearest=train" in printed
    assert f"10-90% {spread['p10']:.2f}-{spread['p90']:.2f}" in printed
    assert "means over 4 draws of 64 (sampling seeds 0, 1000, 2000, 3000)" in printed
    one = saved["one-step"]
    assert f"{one['digits_fid']:>11.3f}{one['digits_fid_sd']:>6.3f}{one['digits_fid_draws'][0]:>7.3f}" in printed
    stage = "ct" if mode == "ct" else "cd"
    assert "model000008.pt" in os.listdir(tmp_path / stage)
    from PIL import Image
    width, _ = Image.open(tmp_path / "onestep_grid.png").size
    if mode == "ct":  # the default is class-conditional: a column per digit, and how often a sample is as asked
        assert width == 4 * (10 * 17 + 1) and "as asked" in printed
        for row in ("one-step", "two-step searched", "real digits (floor)"):
            assert 0 <= saved[row]["label_accuracy"] <= 1 and len(saved[row]["per_class_accuracy"]) == 10
        assert floor["label_accuracy"] > 0.9  # the classifier on real held-out digits
    else:
        assert width == 4 * (8 * 17 + 1) and "as asked" not in printed and "label_accuracy" not in saved["one-step"]


def test_a_class_conditional_model_is_sampled_with_every_class_in_turn(tmp_path):
    import torch
    quickstart = load_quickstart()
    args = quickstart.training_args("digits_ct.yaml", "consistency_training", str(tmp_path),
                                    quickstart.parse_args(["--out", str(tmp_path)]),
                                    ["--dit_size", "1x16x2/8", "--batch_size", "2"])
    loop = quickstart.build_loop(args)
    model = loop.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # DiT starts with zero outputs (adaLN-Zero), where the label would not show
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    assert quickstart.sample_labels(model, 12).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    first = quickstart.draw(loop.diffusion, model, 12, 16, seed=3, sampler="onestep", steps=40)
    again = quickstart.draw(loop.diffusion, model, 10, 16, seed=3, sampler="onestep", steps=40)
    assert torch.allclose(first[:10], again, atol=1e-5)  # sample k depends on the seed and k alone, label included
    from cm.random_util import get_generator
    from cm.sampling import karras_sample

    def asked(labels):
        with torch.inference_mode():
            return karras_sample(loop.diffusion, model, (10, 3, 16, 16), generator=get_generator("determ", 10, 3),
                                 sampler="onestep", steps=40, model_kwargs={"y": labels})
    assert torch.equal(again, asked(torch.arange(10)))  # sample k asks for class k mod 10
    assert not torch.equal(again, asked(torch.zeros(10, dtype=torch.long)))
    unconditional = quickstart.build_loop(quickstart.training_args(
        "digits_ct.yaml", "consistency_training", str(tmp_path / "u"), quickstart.parse_args(["--out", str(tmp_path)]),
        ["--dit_size", "1x16x2/8", "--batch_size", "2", "--class_cond", "false"])).model
    assert quickstart.sample_labels(unconditional, 12) is None


def test_scores_are_means_over_draws_with_their_own_seeds_and_the_first_draw_is_kept(tmp_path):
    import torch
    from cm.digits_eval import digits_metrics, load_digits_classifier

    quickstart = load_quickstart()
    opts = quickstart.parse_args(["--out", str(tmp_path), "--seed", "2", "--num_samples", "20", "--num_draws", "3"])
    loop = quickstart.build_loop(quickstart.training_args("digits_ct.yaml", "consistency_training", str(tmp_path),
                                                          opts, ["--dit_size", "1x16x2/8", "--batch_size", "2"]))
    model = loop.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # away from adaLN-Zero's constant output, so that the draws differ
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    classifier = load_digits_classifier()
    assert quickstart.draw_seeds(2, 3) == [2, 1002, 2002]  # clear of the two-step search's seed + 1

    def score(images):
        return digits_metrics(images, classifier)

    samplers = {"one-step": dict(sampler="onestep", steps=40)}
    first, rows = quickstart.scored_draws(loop.diffusion, model, samplers, 16, opts, score)
    draws = [quickstart.draw(loop.diffusion, model, 20, 16, seed, sampler="onestep", steps=40).cpu()
             for seed in (2, 1002, 2002)]
    assert torch.equal(first["one-step"], draws[0])
    fids = [score(x)["digits_fid"] for x in draws]
    assert rows["one-step"]["digits_fid_draws"] == fids and len(set(fids)) == 3
    assert rows["one-step"]["digits_fid"] == pytest.approx(sum(fids) / 3, rel=1e-12)


def test_mean_over_draws_averages_numbers_and_per_class_lists():
    quickstart = load_quickstart()
    row = quickstart.mean_over_draws([
        {"digits_fid": 1.0, "coverage": 0.9, "per_class_accuracy": [1.0, 0.5]},
        {"digits_fid": 3.0, "coverage": 0.7, "per_class_accuracy": [0.0, 0.5]},
    ])
    assert row["digits_fid"] == 2.0 and row["coverage"] == pytest.approx(0.8)
    assert row["per_class_accuracy"] == [0.5, 0.5] and isinstance(row["coverage"], float)
    assert row["digits_fid_draws"] == [1.0, 3.0] and row["digits_fid_sd"] == 1.0
    single = quickstart.mean_over_draws([{"digits_fid": 0.7, "coverage": 1.0}])
    assert single["digits_fid"] == 0.7 and single["digits_fid_sd"] == 0.0  # --num_draws 1: the one draw's scores


def test_the_generator_trains_on_the_training_half(tmp_path):
    quickstart = load_quickstart()
    opts = quickstart.parse_args(["--out", str(tmp_path)])
    for _, config, mode in quickstart.PLANS["ct"] + quickstart.PLANS["cd"]:
        assert quickstart.training_args(config, mode, str(tmp_path), opts).data_dir == "digits_train"


def test_the_default_trains_a_dit_and_train_flags_reach_every_stage(tmp_path):
    quickstart = load_quickstart()
    default = quickstart.training_args("digits_ct.yaml", "consistency_training", str(tmp_path),
                                       quickstart.parse_args(["--out", str(tmp_path)]))
    assert (default.model_type, default.dit_size, default.dit_final_conv, default.batch_size) == ("dit", "4x192x4/8",
                                                                                                  True, 128)
    assert (default.class_cond, default.num_classes, default.lr, default.ct_target) == (True, 10, 2e-3, "stf")
    opts = quickstart.parse_args(["--out", str(tmp_path), "--train_flags", "--model_type adm --batch_size 16"])
    for _, config, mode in quickstart.PLANS["ct"] + quickstart.PLANS["cd"]:
        args = quickstart.training_args(config, mode, str(tmp_path), opts)
        assert (args.model_type, args.batch_size, args.data_dir) == ("adm", 16, "digits_train")


def test_time_budget_replans_steps_and_schedules_to_end_on_time(tmp_path, monkeypatch):
    from cm import time_budget

    quickstart = load_quickstart()
    monkeypatch.setattr(time_budget, "TIMING_STEPS", 4)
    monkeypatch.setattr(time_budget, "FINAL_STRETCH", 6)
    opts = quickstart.parse_args(["--out", str(tmp_path), "--precision", "fp32"])
    args = quickstart.training_args("digits_ct.yaml", "consistency_training", str(tmp_path / "ct"), opts,
                                    ["--batch_size", "4"])
    assert not args.use_bf16
    loop = quickstart.train_stage(args, budget_s=3.0, fixed_steps=0)
    assert loop.budget.final and loop.budget.elapsed() <= 1.5 * 3.0
    assert 4 < loop.step == loop.total_training_steps == loop.lr_anneal_steps != args.total_training_steps
    # the schedule was re-planned for the final step count: N(k) reaches end_scales + 1 on the last step
    assert loop.schedule_fn(loop.step - 1)["num_scales"] == args.end_scales + 1
    assert loop.opt.param_groups[0]["lr"] == 0.0


def test_default_two_step_times_follow_the_reference_fraction_of_the_grid():
    quickstart = load_quickstart()
    assert quickstart.default_two_step_ts(40) == (0, 22, 39)  # the reference's ImageNet-64 --ts 0,22,39
    assert quickstart.default_two_step_ts(41) == (0, 23, 40)
    assert quickstart.default_two_step_ts(3) == (0, 1, 2)


def test_hardware_names_the_cpu_and_its_bfloat16_support():
    quickstart = load_quickstart()
    info = quickstart.hardware("cpu")
    line = quickstart.describe_hardware(info)
    assert info["cpu"] in line and ("native bfloat16: yes" in line) == info["cpu_bf16_native"]


def test_precision_auto_follows_the_hardware():
    quickstart = load_quickstart()
    from cm.fp16_util import bf16_is_native

    opts = quickstart.parse_args(["--device", "cpu"])
    assert quickstart.use_bf16(opts) == bf16_is_native("cpu")
    assert quickstart.use_bf16(quickstart.parse_args(["--precision", "bf16"]))


@pytest.mark.parametrize("mode, stages", [("ect", ("edm", "ect")), ("ayf", ("edm", "ayf"))])  # sct, scd: test_scm_training.py
def test_quickstart_runs_a_two_stage_tuning_plan(tmp_path, mode, stages):
    quickstart = load_quickstart()
    metrics = quickstart.main(["--mode", mode, "--steps", "3", "--out", str(tmp_path), "--num_samples", "32",
                               "--search_samples", str(SEARCH_SAMPLES)])
    assert metrics["mode"] == mode and metrics["steps"] == 3
    assert [name.lower() for name, _, _ in quickstart.PLANS[mode]] == list(stages)
    for stage in stages:
        assert "model000003.pt" in os.listdir(tmp_path / stage), stage
    for row in ("one-step", "two-step default", "two-step searched"):
        assert metrics[row]["digits_fid"] > 0 and 0 < metrics[row]["coverage"] <= 1
    assert len(metrics["two_step_ts_default"]) == len(metrics["two_step_ts_searched"])


def test_a_rerun_into_the_same_out_starts_fresh_and_moves_the_old_results_aside(tmp_path, capsys, monkeypatch):
    quickstart = load_quickstart()
    monkeypatch.setattr(quickstart, "best_two_step_ts", lambda diffusion, model, n, *rest: (0, n // 2, n - 1))
    argv = ["--steps", "2", "--out", str(tmp_path), "--num_samples", "16"]
    quickstart.main(argv)
    first = json.loads((tmp_path / "metrics.json").read_text())
    capsys.readouterr()
    metrics = quickstart.main(argv[:1] + ["3"] + argv[2:])
    moved = [line for line in capsys.readouterr().out.splitlines() if "held an earlier run" in line]
    previous = [n for n in os.listdir(tmp_path) if n.startswith("previous-")]
    assert len(moved) == 1 and len(previous) == 1 and previous[0] in moved[0]
    assert json.loads((tmp_path / previous[0] / "metrics.json").read_text()) == first  # the old results, kept
    assert "model000002.pt" in os.listdir(tmp_path / previous[0] / "ct")
    assert metrics["steps"] == 3 and sorted(n for n in os.listdir(tmp_path / "ct") if n.startswith("model")) == [
        "model000003.pt"]  # a fresh run, not a resume


def test_a_quickstart_failure_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CM_DEBUG", raising=False)
    (tmp_path / "taken").write_text("a file, not a folder")
    with pytest.raises(SystemExit) as exit_info:
        load_quickstart().main(["--steps", "2", "--out", str(tmp_path / "taken")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "taken" in err and "Traceback" not in err


@pytest.mark.parametrize("extra, expected", [
    (["--ctm_gamma", "1.2"], "must lie in [0, 1]"),
    (["--mode", "sct", "--ctm_gamma", "0.5"], "multistep only, not trigflow_twostep"),
    (["--num_draws", "0"], "--num_draws must be at least 1"),
    (["--num_samples", "1"], "--num_samples at least 2"),
])
def test_a_wrong_ctm_gamma_or_draw_count_stops_before_the_out_folder_is_touched(tmp_path, capsys, monkeypatch, extra, expected):
    monkeypatch.delenv("CM_DEBUG", raising=False)
    (tmp_path / "metrics.json").write_text("{}")  # an earlier run's results stay where they are
    with pytest.raises(SystemExit) as exit_info:
        load_quickstart().main(["--steps", "2", "--out", str(tmp_path)] + extra)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1 and expected in err, err
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"]


def test_ctm_gamma_resolves_per_plan():
    quickstart = load_quickstart()

    def resolve(argv):
        opts = quickstart.parse_args(argv)
        return quickstart.two_step_ctm_gamma(opts, quickstart.PLANS[opts.mode])

    assert resolve([]) == quickstart.TWO_STEP_CTM_GAMMA == 0.9
    assert resolve(["--ctm_gamma", "1"]) == 1.0 and resolve(["--mode", "cd", "--ctm_gamma", "0"]) == 0.0
    assert resolve(["--mode", "sct"]) is None and resolve(["--mode", "meanflow", "--ctm_gamma", "1"]) == 1.0
