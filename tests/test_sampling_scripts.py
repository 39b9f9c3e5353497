"""scripts/image_sample.py and scripts/ternary_search.py on tiny 8-px models: npz format, determinism over batch
sizes and ranks, mpiexec, the ternary search itself, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cm.image_util import image_grid, rank_batches, to_uint8
from cm.train_cli import main as train_main

from helpers import TINY_MODEL, load_script, tiny_argv, tiny_model_and_diffusion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


image_sample = load_script("image_sample")
ternary = load_script("ternary_search")

MODEL_FLAGS = [f"--{k}={v}" for k, v in TINY_MODEL.items()]
CC_FLAGS = MODEL_FLAGS + ["--class_cond=true", "--num_classes=10"]


@pytest.fixture(scope="module")
def trained_ema(tmp_path_factory):
    """An EMA checkpoint written by our training loop (one consistency-training step of the tiny digits model)."""
    log_dir = tmp_path_factory.mktemp("ct")
    train_main("consistency_training", tiny_argv(log_dir=log_dir, total_training_steps=1, loss_norm="l2"))
    return str(log_dir / "ema_0.9999_000001.pt")


@pytest.fixture(scope="module")
def class_cond_ckpt(tmp_path_factory):
    """A plain state dict of a random class-conditional tiny model (10 classes)."""
    torch.manual_seed(1)
    model, _ = tiny_model_and_diffusion(class_cond=True, num_classes=10)
    path = tmp_path_factory.mktemp("cc") / "model.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def sample(log_dir, ckpt, *extra, flags=CC_FLAGS):
    argv = flags + ["--model_path", ckpt, "--log_dir", str(log_dir), "--training_mode", "consistency_distillation"]
    return image_sample.main(argv + list(extra))


def test_npz_reads_back_with_shapes_dtypes_and_labels(tmp_path, class_cond_ckpt):
    path = sample(tmp_path, class_cond_ckpt, "--num_samples", "5", "--batch_size", "2", "--sampler", "onestep")
    assert os.path.basename(path) == "samples_5x8x8x3.npz"
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (5, 8, 8, 3) and images.dtype == np.uint8
    assert labels.shape == (5,) and labels.dtype == np.int64 and ((labels >= 0) & (labels < 10)).all()
    assert len(set(images.reshape(5, -1).sum(1).tolist())) > 1  # not five copies of one image
    assert (tmp_path / "samples_grid.png").exists() and (tmp_path / "sample_config.json").exists()


def test_checkpoint_of_the_training_loop_samples_with_multistep(tmp_path, trained_ema):
    path = sample(
        tmp_path, trained_ema, "--num_samples", "3", "--sampler", "multistep", "--ts", "0,20,39", "--grid", "none",
        flags=MODEL_FLAGS,
    )
    with np.load(path) as data:
        assert data.files == ["arr_0"] and data["arr_0"].shape == (3, 8, 8, 3)
    assert not (tmp_path / "samples_grid.png").exists()


@pytest.mark.parametrize("generator", ["determ", "determ-indiv"])
def test_sample_k_depends_only_on_seed_and_k(tmp_path, class_cond_ckpt, generator):
    runs = []
    for batch in (1, 3, 7):
        path = sample(
            tmp_path / f"b{batch}", class_cond_ckpt, "--num_samples", "7", "--batch_size", str(batch),
            "--generator", generator, "--sampler", "multistep", "--ts", "0,10,39", "--grid", "none",
        )
        with np.load(path) as data:
            runs.append((data["arr_0"], data["arr_1"]))
    for images, labels in runs[1:]:
        assert np.array_equal(images, runs[0][0]) and np.array_equal(labels, runs[0][1])
    other_seed = sample(
        tmp_path / "seed1", class_cond_ckpt, "--num_samples", "7", "--generator", generator, "--seed", "1",
        "--sampler", "multistep", "--ts", "0,10,39", "--grid", "none",
    )
    with np.load(other_seed) as data:
        assert not np.array_equal(data["arr_0"], runs[0][0])


def test_dummy_generator_is_seeded(tmp_path, class_cond_ckpt):
    runs = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        path = sample(tmp_path / name, class_cond_ckpt, "--num_samples", "3", "--generator", "dummy", "--seed", seed,
                      "--sampler", "onestep", "--grid", "none")
        with np.load(path) as data:
            runs.append(data["arr_0"])
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])


@pytest.mark.parametrize("generator", ["determ-indiv", "determ"])
def test_mpiexec_two_ranks_write_one_npz_equal_to_one_process(tmp_path, class_cond_ckpt, generator):
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    common = CC_FLAGS + [
        "--model_path", class_cond_ckpt, "--training_mode", "consistency_distillation", "--num_samples", "5",
        "--batch_size", "2", "--generator", generator, "--sampler", "multistep", "--ts", "0,10,39",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", CM_DIST_TIMEOUT="60", CUDA_VISIBLE_DEVICES="")
    script = os.path.join(ROOT, "scripts", "image_sample.py")
    result = subprocess.run(
        [exe, "-n", "2", sys.executable, script, *common, "--log_dir", str(tmp_path / "mpi")],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert [f for f in os.listdir(tmp_path / "mpi") if f.endswith(".npz")] == ["samples_5x8x8x3.npz"]
    assert "img/s" in result.stdout
    single = image_sample.main(common + ["--log_dir", str(tmp_path / "one"), "--batch_size", "5"])
    with np.load(tmp_path / "mpi" / "samples_5x8x8x3.npz") as a, np.load(single) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_rank_batches_cover_every_sample_once():
    for n, batch, world in [(7, 3, 1), (7, 2, 2), (5, 4, 3), (1, 16, 4)]:
        covered = []
        for done, b in rank_batches(n, batch, world):
            covered += [done + r + world * i for r in range(world) for i in range(b)]
        kept = [k for k in covered if k < n]
        assert sorted(kept) == list(range(n))


def test_uint8_conversion_and_grid():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert to_uint8(x)[0, :, :, 0].tolist() == [[0, 127], [255, 255]]
    grid = image_grid(np.zeros((5, 4, 4, 3), np.uint8), ncols=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3) and grid[0, 0, 0] == 255 and grid[1, 1, 0] == 0


def one_error_line(capsys, fn, argv, status=1):
    with pytest.raises(SystemExit) as exit_info:
        fn(argv)
    assert exit_info.value.code == status
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert "error:" in err[0]
    return err[0]


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], "no checkpoint given"),
        (["--model_path", "/nonexistent/model.pt"], "does not exist"),
        (["--sampler", "multistep", "--ts", "0,40"], "strictly increasing indices in [0, 39]"),
        (["--sampler", "multistep", "--ts", "0,20,10"], "strictly increasing"),
        (["--sampler", "multistep"], "needs --ts"),
        (["--sampler", "unknown"], "invalid choice"),
        (["--generator", "random"], "invalid choice"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--use_fp16", "true", "--use_bf16", "true"], "choose one of"),
        (["--sampler", "multistep", "--ts", "0,20,39", "--ctm_gamma", "1.5"], "must lie in [0, 1]"),
        (["--ctm_gamma", "0.5"], "applies to --sampler multistep only, not heun"),
    ],
)
def test_bad_sampling_input_gives_one_error_line(tmp_path, capsys, class_cond_ckpt, extra, expected):
    argv = CC_FLAGS + ["--log_dir", str(tmp_path)] + extra
    if "--model_path" not in extra and expected != "no checkpoint given":
        argv += ["--model_path", class_cond_ckpt]
    status = 2 if expected == "invalid choice" else 1
    assert expected in one_error_line(capsys, image_sample.main, argv, status)


def test_checkpoint_that_does_not_fit_names_keys_and_shapes(tmp_path, capsys, class_cond_ckpt):
    where = ["--model_path", class_cond_ckpt, "--log_dir", str(tmp_path)]
    line = one_error_line(capsys, image_sample.main, MODEL_FLAGS + where)
    assert "unexpected keys: label_emb.weight" in line
    wide = [f for f in CC_FLAGS if not f.startswith("--num_channels")] + ["--num_channels=64"]
    line = one_error_line(capsys, image_sample.main, wide + where)
    assert "shape mismatches: " in line and "vs model" in line


def test_config_file_supplies_flags_and_the_command_line_wins(tmp_path, class_cond_ckpt):
    config = tmp_path / "sample.yaml"
    lines = [f"{k}: {v}" for k, v in TINY_MODEL.items()] + [
        "class_cond: true", "num_classes: 10", "sampler: heun", "steps: 3", "num_samples: 4",
        f"model_path: {class_cond_ckpt}",
    ]
    config.write_text("\n".join(lines) + "\n")
    path = image_sample.main(["--config", str(config), "--sampler", "onestep", "--log_dir", str(tmp_path)])
    assert os.path.basename(path) == "samples_4x8x8x3.npz"
    assert json.loads((tmp_path / "sample_config.json").read_text())["sample"]["sampler"] == "onestep"


def test_dry_run_prints_the_configuration(capsys):
    assert image_sample.main(["--dry_run", "true", "--sampler", "onestep", "--seed", "3"]) is None
    config = json.loads(capsys.readouterr().out)
    assert config["sample"]["sampler"] == "onestep" and config["run"]["seed"] == 3
    assert config["sample"]["generator"] == "determ" and config["denoiser"]["distillation"] is False


# ----- ternary search ----------------------------------------------------------------------------


@pytest.mark.parametrize("lo, hi", [(1, 38), (1, 2), (5, 5), (0, 199)])
def test_ternary_search_finds_the_minimum_of_convex_objectives(lo, hi):
    for best in sorted({lo, hi, (lo + hi) // 2, lo + (hi - lo) // 3, hi - 1 if hi > lo else hi}):
        calls = []

        def objective(i):
            calls.append(i)
            return (i - best) ** 2 + 0.5 * abs(i - best)

        found, values = ternary.ternary_search(objective, lo, hi)
        assert found == best, (lo, hi, best, values)
        assert len(calls) == len(set(calls))  # every index evaluated once
        assert len(calls) <= 2 * np.log(hi - lo + 2) / np.log(1.5) + 3


def test_ternary_search_range_and_errors():
    assert ternary.search_range((0,), (39,), 40) == (1, 38)
    assert ternary.search_range((0, 17), (39,), 40) == (18, 38)
    with pytest.raises(ValueError, match="strictly between"):
        ternary.search_range((0, 17), (18,), 40)
    with pytest.raises(ValueError, match="strictly increasing"):
        ternary.search_range((0,), (40,), 40)
    with pytest.raises(ValueError, match="empty"):
        ternary.ternary_search(lambda i: i, 3, 2)


def test_ternary_search_script_with_the_digits_metric(tmp_path, trained_ema):
    result = ternary.main(
        MODEL_FLAGS + ["--model_path", trained_ema, "--training_mode", "consistency_training", "--steps", "8",
                       "--begin", "0", "--end", "7", "--num_samples", "32", "--log_dir", str(tmp_path)]
    )
    assert result["metric"] == "digits_fid"
    assert result["best_ts"][0] == 0 and result["best_ts"][2] == 7 and 1 <= result["best_ts"][1] <= 6
    best = str(result["best_ts"][1])
    assert result["probes"][best] == min(result["probes"].values())
    saved = json.loads((tmp_path / "ternary_search.json").read_text())
    assert saved["best_ts"] == result["best_ts"]


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--begin", "5", "--end", "6"], "strictly between"),
        (["--end", "45"], "strictly increasing"),
        (["--metric", "fid"], "needs --ref_batch"),
        (["--ref_batch", "/nonexistent/ref.npz"], "does not exist"),
        (["--metric", "is"], "invalid choice"),
        (["--ctm_gamma", "-0.1"], "must lie in [0, 1]"),
    ],
)
def test_bad_search_input_gives_one_error_line(tmp_path, capsys, trained_ema, extra, expected):
    argv = MODEL_FLAGS + ["--model_path", trained_ema, "--log_dir", str(tmp_path)] + extra
    status = 2 if expected == "invalid choice" else 1
    assert expected in one_error_line(capsys, ternary.main, argv, status)


def test_ternary_search_of_a_flow_map_probes_its_flow_times(tmp_path):
    """A MeanFlow checkpoint is searched with the meanflow sampler on 1 - i / steps; the search ends at t = 0."""
    train_main("meanflow", tiny_argv(log_dir=tmp_path / "run", total_training_steps=1))
    flags = MODEL_FLAGS + ["--second_time_embed=true", "--training_mode=meanflow",
                           "--model_path", str(tmp_path / "run" / "model000001.pt"), "--steps", "6",
                           "--num_samples", "16"]
    result = ternary.main(flags + ["--begin", "0", "--end", "6", "--log_dir", str(tmp_path / "search")])
    assert result["best_ts"][0] == 0 and result["best_ts"][2] == 6 and 1 <= result["best_ts"][1] <= 5
    assert result["probes"][str(result["best_ts"][1])] == min(result["probes"].values())
    # the probe at p is the meanflow sampler's two jumps 1 -> 1 - p / 6 -> 0
    p = result["best_ts"][1]
    path = image_sample.main(flags + ["--sampler", "meanflow", "--ts", f"0,{p}", "--log_dir", str(tmp_path / "s")])
    with np.load(path) as data:
        images = data["arr_0"]
    # equal up to uint8 roundings of the two scripts' batch splits
    assert ternary.digits_scorer()(images) == pytest.approx(result["probes"][str(p)], rel=1e-3)
    with pytest.raises(ValueError, match="pass --end 6"):
        ternary.flow_search_range((0,), (5,), 6)
    assert ternary.flow_search_range((0, 2), (6,), 6) == (3, 5)
