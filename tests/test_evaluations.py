import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.models.inception import Inception3

from evaluations import evaluator as ev
from evaluations.inception import (
    FID_WEIGHTS_NAME,
    INCEPTION_WEIGHTS_ENV,
    NUM_CLASSES,
    POOL_DIM,
    SPATIAL_DIM,
    FIDInceptionV3,
    convert_openai_state_dict,
    find_inception_weights,
    load_inception,
    resize_bilinear_tf1,
)
from evaluations.metrics import (
    DistanceBlock,
    FIDStatistics,
    ManifoldEstimator,
    batch_pairwise_distances,
    batch_pairwise_distances_torch,
    compute_inception_score,
    frechet_distance,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 OpenMP threads ran 10-20x slower with the other core busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def inception():
    return load_inception(pretrained=False)


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    """No weights file anywhere: env var unset, torch hub cache empty."""
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))


def images(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- FID


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_of_a_set_with_itself_is_zero(method):
    feats = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    assert abs(frechet_distance(feats, feats, method=method)) < 1e-6


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_fid_of_gaussians_equals_the_closed_form(method):
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    # diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    fid = FIDStatistics(mu1, np.diag(a)).frechet_distance(FIDStatistics(mu2, np.diag(b)), method=method)
    assert fid == pytest.approx(expected, rel=1e-9)
    # c I against a rotated covariance Q diag(b) Q^T: tr sqrt(c S2) = sqrt(c) sum sqrt(b)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    sigma2, c = q @ np.diag(b) @ q.T, 1.7
    expected = np.sum((mu1 - mu2) ** 2) + 6 * c + b.sum() - 2 * math.sqrt(c) * np.sqrt(b).sum()
    fid = FIDStatistics(mu1, c * np.eye(6)).frechet_distance(FIDStatistics(mu2, sigma2), method=method)
    assert fid == pytest.approx(expected, rel=1e-9)


def test_fid_statistics_follow_the_reference_estimators():
    feats = np.random.default_rng(2).normal(size=(50, 5)).astype(np.float32)
    stats = FIDStatistics.from_features(feats)
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(feats.astype(np.float64).T), rtol=1e-6)  # unbiased, N - 1


def test_fid_rejects_bad_input():
    with pytest.raises(ValueError, match="different lengths"):
        FIDStatistics(np.zeros(3), np.eye(3)).frechet_distance(FIDStatistics(np.zeros(4), np.eye(4)))
    with pytest.raises(ValueError, match="method"):
        FIDStatistics(np.zeros(3), np.eye(3)).frechet_distance(FIDStatistics(np.zeros(3), np.eye(3)), method="x")
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# ---------------------------------------------------------------- Inception Score


def test_inception_score_of_identical_predictions_is_one():
    probs = np.random.default_rng(3).dirichlet(np.ones(10), size=1).repeat(40, axis=0)
    assert compute_inception_score(probs) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("num_classes", [2, 10, 1008])
def test_inception_score_of_uniform_one_hot_predictions_is_the_class_count(num_classes):
    probs = np.eye(num_classes, dtype=np.float32)[np.arange(3 * num_classes) % num_classes]
    assert compute_inception_score(probs) == pytest.approx(num_classes, rel=1e-5)
    logits = np.log(probs * (1 - 1e-30) + 1e-30)
    assert compute_inception_score(logits, from_logits=True) == pytest.approx(num_classes, rel=1e-3)


def test_inception_score_averages_splits():
    # each split of 4 rows holds one class only: every split scores 1
    probs = np.eye(3)[np.repeat(np.arange(3), 4)]
    assert compute_inception_score(probs, split_size=4) == pytest.approx(1.0)
    assert compute_inception_score(probs, split_size=12) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="from_logits"):
        compute_inception_score(np.full((4, 3), 2.0))


# ---------------------------------------------------------------- precision / recall


def brute_force_sq_distances(u, v):
    return ((u.astype(np.float64)[:, None] - v.astype(np.float64)[None]) ** 2).sum(-1)


@pytest.mark.parametrize("fp16", [True, False])
def test_torch_distances_equal_the_numpy_computation(fp16):
    rng = np.random.default_rng(4)
    u = rng.uniform(0, 2, (37, 64)).astype(np.float32)
    v = rng.uniform(0, 2, (23, 64)).astype(np.float32)
    numpy_dist = batch_pairwise_distances(u, v, fp16=fp16)
    torch_dist = batch_pairwise_distances_torch(torch.from_numpy(u), torch.from_numpy(v), fp16=fp16).numpy()
    assert numpy_dist.dtype == torch_dist.dtype == np.float32
    # fp16 results may differ by one float16 ulp (2^-10 relative) where float32 products round differently
    np.testing.assert_allclose(torch_dist, numpy_dist, rtol=2e-3 if fp16 else 1e-5, atol=1e-2 if fp16 else 1e-4)
    np.testing.assert_allclose(numpy_dist, brute_force_sq_distances(u, v), rtol=3e-3 if fp16 else 1e-5, atol=0.1)
    block = DistanceBlock(fp16=fp16)
    np.testing.assert_allclose(block.pairwise_distances(u, v), torch_dist)


def test_float16_overflow_falls_back_to_float32():
    u = np.full((3, 8), 200.0, dtype=np.float32)  # squared norms 320000 > float16 max
    v = np.zeros((2, 8), dtype=np.float32)
    expected = np.full((3, 2), 320000.0, dtype=np.float32)
    np.testing.assert_array_equal(batch_pairwise_distances(u, v), expected)
    np.testing.assert_array_equal(batch_pairwise_distances_torch(torch.from_numpy(u), torch.from_numpy(v)), expected)


def test_manifold_radii_are_third_nearest_neighbour_distances():
    feats = np.random.default_rng(5).normal(size=(30, 4)).astype(np.float32)
    radii = ManifoldEstimator(row_batch_size=7, col_batch_size=11, fp16=False).manifold_radii(feats)
    expected = np.sort(brute_force_sq_distances(feats, feats), axis=1)[:, 3]
    assert radii.shape == (30, 1)
    np.testing.assert_allclose(radii[:, 0], expected, rtol=1e-4, atol=1e-5)


def clouds():
    rng = np.random.default_rng(6)
    near = rng.normal(size=(40, 8)).astype(np.float32)
    far = (rng.normal(size=(40, 8)) + 100).astype(np.float32)
    return near, far


@pytest.mark.parametrize("batches", [(10000, 10000), (7, 9)])
def test_precision_recall_on_toy_point_clouds(batches):
    near, far = clouds()
    estimator = ManifoldEstimator(*batches)
    assert tuple(estimator.evaluate_pr(near, None, near.copy(), None)) == (1.0, 1.0)
    assert tuple(estimator.evaluate_pr(near, None, far, None)) == (0.0, 0.0)
    both = np.concatenate([near, far])
    precision, recall = estimator.evaluate_pr(both, None, near, None)  # samples cover half the real manifold
    assert precision[0] == 1.0
    assert recall[0] < 1.0 and recall[0] == pytest.approx(0.5)


def test_precision_recall_backends_and_batchings_agree():
    rng = np.random.default_rng(7)
    real = rng.normal(size=(60, 32)).astype(np.float32)
    fake = (rng.normal(size=(50, 32)) + 0.5).astype(np.float32)
    results = [
        ManifoldEstimator(*sizes, backend=backend).evaluate_pr(real, None, fake, None)
        for backend in ("numpy", "torch")
        for sizes in ((10000, 10000), (13, 17))
    ]
    for precision, recall in results[1:]:
        assert (precision, recall) == results[0]
    assert 0 < results[0][0][0] < 1 and 0 < results[0][1][0] < 1
    np.testing.assert_allclose(
        ManifoldEstimator(backend="numpy").manifold_radii(real), ManifoldEstimator().manifold_radii(real), rtol=2e-3
    )


def test_precision_recall_needs_more_points_than_neighbours():
    with pytest.raises(ValueError, match="more than 3"):
        ManifoldEstimator().manifold_radii(np.zeros((3, 4), np.float32))


# ---------------------------------------------------------------- Inception network


def test_tf1_resize_uses_top_left_alignment():
    row = torch.tensor([0.0, 100.0]).reshape(1, 1, 1, 2).expand(1, 1, 2, 2)
    out = resize_bilinear_tf1(row, size=4)
    # TF1 legacy: source x = dst * in / out = 0, 0.5, 1, 1.5 (clamped) -> 0, 50, 100, 100
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 50.0, 100.0, 100.0]))


def test_random_network_feature_shapes(inception):
    for size in (32, 299):
        x = torch.from_numpy(images(1, size, seed=size)).permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            pool, spatial = inception(x)
            probs = inception.softmax(pool)
        assert pool.shape == (1, POOL_DIM) and spatial.shape == (1, SPATIAL_DIM)
        assert probs.shape == (1, NUM_CLASSES)
        assert torch.isfinite(pool).all() and torch.isfinite(spatial).all() and pool.std() > 0
        torch.testing.assert_close(probs.sum(1), torch.ones(1))


def test_layer_names_load_torchvision_layout_weights_strictly(tmp_path, inception, monkeypatch):
    # pytorch-fid's weights file is a state dict of torchvision's Inception3(num_classes=1008, aux_logits=False)
    monkeypatch.setenv("CM_ALLOW_UNVERIFIED_WEIGHTS", "1")  # random weights under the published name
    layout = Inception3(num_classes=NUM_CLASSES, aux_logits=False, init_weights=False)
    assert set(layout.state_dict()) == set(inception.state_dict())
    path = tmp_path / FID_WEIGHTS_NAME
    torch.save({k: v for k, v in inception.state_dict().items() if "num_batches_tracked" not in k}, path)
    loaded = load_inception(str(path)).state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in inception.state_dict().items())


def test_reference_port_state_dict_is_renamed():
    state = {
        "layers.mixed_6.conv.weight": torch.zeros(192, 768, 1, 1),
        "layers.mixed_8.tower_1.conv_1.weight": torch.zeros(192, 192, 1, 7),
        "layers.mixed_10.tower_1_mixed_conv_1.var": torch.ones(384),
        "layers.conv_4.beta": torch.ones(192),
        "output.weight": torch.zeros(NUM_CLASSES, POOL_DIM),
    }
    out = convert_openai_state_dict(state)
    model_state = FIDInceptionV3().state_dict()
    assert set(out) == {
        "Mixed_6d.branch1x1.conv.weight", "Mixed_7a.branch7x7x3_2.conv.weight",
        "Mixed_7c.branch3x3dbl_3b.bn.running_var", "Conv2d_4a_3x3.bn.bias", "Conv2d_4a_3x3.bn.weight", "fc.weight",
    }
    for key, value in out.items():
        assert value.shape == model_state[key].shape, key
    torch.testing.assert_close(out["Conv2d_4a_3x3.bn.weight"], torch.ones(192))


def test_missing_weights_give_one_clear_error(no_weights, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=FID_WEIGHTS_NAME) as err:
        find_inception_weights()
    assert INCEPTION_WEIGHTS_ENV in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_inception_weights(str(tmp_path / "nope.pth"))
    ref = tmp_path / "ref.npz"
    np.savez(ref, images(4, 8, 0))
    assert ev.main([str(ref), str(ref), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and FID_WEIGHTS_NAME in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_cli_rejects_an_unknown_device(tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    np.savez(ref, images(4, 8, 0))
    assert ev.main([str(ref), str(ref), "--random_weights", "--device", "abacus", "--quiet"]) == 1
    assert capsys.readouterr().err.strip() == "error: unknown device 'abacus'"


# ---------------------------------------------------------------- npz batches and the evaluator


def test_npz_arrays_stream_in_batches(tmp_path):
    arr = images(11, 5, 1)
    for save in (np.savez, np.savez_compressed):
        path = tmp_path / f"{save.__name__}.npz"
        save(path, arr)
        with ev.open_npz_array(str(path)) as reader:
            batches = reader.read_batches(4)
            assert len(batches) == 3
            np.testing.assert_array_equal(np.concatenate(list(batches)), arr)


def test_bad_npz_input_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError):
        ev.npz_keys(str(tmp_path / "missing.npz"))
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ValueError, match="not an .npz"):
        ev.npz_keys(str(tmp_path / "text.npz"))
    np.savez(tmp_path / "other.npz", images=images(2, 4, 0))
    with pytest.raises(ValueError, match="no array 'arr_0'"):
        with ev.open_npz_array(str(tmp_path / "other.npz")):
            pass
    for name, arr in [("float", images(2, 4, 0).astype(np.float32)), ("nchw", images(2, 4, 0).transpose(0, 3, 1, 2))]:
        np.savez(tmp_path / f"{name}.npz", arr)
        evaluator = ev.Evaluator(MeanColour(), progress=False)
        with pytest.raises(ValueError, match="uint8 images"):
            evaluator.read_activations(str(tmp_path / f"{name}.npz"))


class MeanColour(torch.nn.Module):
    """Stand-in feature network: pool = mean RGB, spatial = mean of each image half; IS over 3 'classes'."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        half = x.shape[2] // 2
        spatial = torch.stack([x[:, :, :half].mean((1, 2, 3)), x[:, :, half:].mean((1, 2, 3))], 1)
        return x.mean((2, 3)) * self.scale, spatial

    def softmax(self, pool):
        return torch.softmax(pool / 255, dim=1)


def test_precomputed_reference_statistics_are_used(tmp_path):
    evaluator = ev.Evaluator(MeanColour(), batch_size=3, progress=False)
    ref_images, sample_images = images(20, 6, 1), images(12, 6, 2)
    np.savez(tmp_path / "sample.npz", sample_images)
    np.savez(tmp_path / "ref_plain.npz", ref_images)
    stats = {"mu": np.full(3, 10.0), "sigma": np.eye(3) * 4, "mu_s": np.zeros(2), "sigma_s": np.eye(2)}
    np.savez(tmp_path / "ref_stats.npz", ref_images, **stats)
    np.savez(tmp_path / "ref_stats_only.npz", **stats)

    sample_acts = evaluator.read_activations(str(tmp_path / "sample.npz"))
    sample_stats = [FIDStatistics.from_features(a) for a in sample_acts]
    plain = evaluator.evaluate(str(tmp_path / "ref_plain.npz"), str(tmp_path / "sample.npz"))
    ref_acts = evaluator.read_activations(str(tmp_path / "ref_plain.npz"))
    assert plain["fid"] == pytest.approx(frechet_distance(sample_acts[0], ref_acts[0]), rel=1e-9)

    given = evaluator.evaluate(str(tmp_path / "ref_stats.npz"), str(tmp_path / "sample.npz"))
    expected_fid = sample_stats[0].frechet_distance(FIDStatistics(stats["mu"], stats["sigma"]))
    expected_sfid = sample_stats[1].frechet_distance(FIDStatistics(stats["mu_s"], stats["sigma_s"]))
    assert given["fid"] == pytest.approx(expected_fid) and given["sfid"] == pytest.approx(expected_sfid)
    assert given["fid"] != pytest.approx(plain["fid"])
    assert (given["precision"], given["recall"]) == (plain["precision"], plain["recall"])  # from the images

    only = evaluator.evaluate(str(tmp_path / "ref_stats_only.npz"), str(tmp_path / "sample.npz"))
    assert only["fid"] == pytest.approx(expected_fid) and only["precision"] is None and only["recall"] is None
    assert 1 <= only["inception_score"] <= 3

    np.savez(tmp_path / "ref_partial.npz", ref_images, mu=stats["mu"], sigma=stats["sigma"])
    with pytest.raises(ValueError, match="lacks"):
        evaluator.evaluate(str(tmp_path / "ref_partial.npz"), str(tmp_path / "sample.npz"))


@pytest.fixture(scope="module")
def cli_inception():
    """The CLI's random-weights network (seed 0), built once for every in-process CLI run of this module."""
    return load_inception(pretrained=False)


@pytest.fixture
def shared_random_inception(cli_inception, monkeypatch):
    """ev.main's load_inception hands out cli_inception for --random_weights on the CPU (seed 0, the CLI's)."""
    real = ev.load_inception

    def load(weights_path=None, device="cpu", pretrained=True, seed=0, allow_unverified=None):
        if not pretrained and seed == 0 and torch.device(device).type == "cpu":
            return cli_inception
        return real(weights_path, device, pretrained, seed, allow_unverified)

    monkeypatch.setattr(ev, "load_inception", load)


def test_cli_end_to_end_with_random_weights(tmp_path):
    np.savez(tmp_path / "ref.npz", images(5, 32, 10))
    np.savez_compressed(tmp_path / "sample.npz", images(4, 40, 11))
    # one thread each for torch and BLAS (see one_thread)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(ROOT / "evaluations" / "evaluator.py"), "ref.npz", "sample.npz",
           "--random_weights", "--fid_method", "eigh", "--batch_size", "3", "--json", "--quiet"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:5]] == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    metrics = json.loads(lines[5])
    assert set(metrics) == {"inception_score", "fid", "sfid", "precision", "recall"}
    assert all(math.isfinite(value) for value in metrics.values())
    assert 1 <= metrics["inception_score"] <= NUM_CLASSES and metrics["fid"] > 0 and metrics["sfid"] > 0
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    assert lines[1] == f"FID: {metrics['fid']}"


# ---------------------------------------------------------------- the reference's names and argument order


def test_evaluate_pr_takes_the_reference_argument_order():
    near, far = clouds()
    both = np.concatenate([near, far])
    estimator = ManifoldEstimator(fp16=False)
    radii_both, radii_near = estimator.manifold_radii(both), estimator.manifold_radii(near)
    given = estimator.evaluate_pr(both, radii_both, near, radii_near)  # (features_1, radii_1, features_2, radii_2)
    assert tuple(map(tuple, given)) == tuple(map(tuple, estimator.evaluate_pr(both, None, near, None)))
    assert (given[0][0], given[1][0]) == (1.0, pytest.approx(0.5))
    # radii of the wrong set change the answer: the radii are really read from positions 2 and 4
    shrunk = estimator.evaluate_pr(both, np.full_like(radii_both, -1.0), near, radii_near)  # empty balls
    assert shrunk[0][0] == 0.0


def test_npz_readers_keep_the_reference_names(tmp_path):
    arr = images(7, 4, 3)
    np.savez(tmp_path / "c.npz", arr)
    np.savez(tmp_path / "f.npz", np.asfortranarray(arr))
    with ev.open_npz_array(str(tmp_path / "c.npz"), "arr_0") as reader:
        assert isinstance(reader, ev.StreamingNpzArrayReader) and isinstance(reader, ev.NpzArrayReader)
        batches = reader.read_batches(3)
        assert isinstance(batches, ev.BatchIterator) and len(batches) == 3
        np.testing.assert_array_equal(np.concatenate(list(batches)), arr)
        assert reader.remaining() == 0 and reader.read_batch(3) is None
    with ev.open_npz_array(str(tmp_path / "f.npz"), "arr_0") as reader:
        assert isinstance(reader, ev.MemoryNpzArrayReader)
        np.testing.assert_array_equal(np.concatenate(list(reader.read_batches(5))), arr)
    memory = ev.MemoryNpzArrayReader.load(str(tmp_path / "c.npz"), "arr_0")
    assert memory.remaining() == 7 and memory.read_batch(10).shape == (7, 4, 4, 3) and memory.read_batch(1) is None
    import io

    with pytest.raises(ValueError, match="truncated"):
        ev._read_bytes(io.BytesIO(b"abc"), 5, "array data")


# ---------------------------------------------------------------- folders and mu/sigma statistics files


def write_folder(folder, arr):
    from PIL import Image

    folder.mkdir()
    for i, image in enumerate(arr):
        sub = folder / ("a" if i % 2 else "b")  # nested folders are read too, sorted by path
        sub.mkdir(exist_ok=True)
        Image.fromarray(image).save(sub / f"{i:03d}.png")
    return sorted(folder.rglob("*.png"))


def test_image_folders_give_the_numbers_of_the_same_images_in_an_npz(tmp_path):
    evaluator = ev.Evaluator(MeanColour(), batch_size=4, progress=False)
    ref_images, sample_images = images(14, 6, 21), images(9, 6, 22)
    ref_paths = write_folder(tmp_path / "ref", ref_images)
    write_folder(tmp_path / "sample", sample_images)
    order = [int(p.stem) for p in ref_paths]
    np.savez(tmp_path / "ref.npz", ref_images[order])
    np.savez(tmp_path / "sample.npz", sample_images[[int(p.stem) for p in sorted((tmp_path / "sample").rglob("*.png"))]])
    from_folders = evaluator.evaluate(str(tmp_path / "ref"), str(tmp_path / "sample"))
    from_npz = evaluator.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"))
    assert from_folders == from_npz and all(v is not None for v in from_folders.values())
    mixed = evaluator.evaluate(str(tmp_path / "ref"), str(tmp_path / "sample.npz"))
    assert mixed == from_npz


def test_image_folder_errors_are_one_line(tmp_path):
    from PIL import Image

    evaluator = ev.Evaluator(MeanColour(), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        evaluator.read_activations(str(tmp_path / "empty"))
    (tmp_path / "mixed").mkdir()
    Image.fromarray(images(1, 6, 0)[0]).save(tmp_path / "mixed" / "a.png")
    Image.fromarray(images(1, 8, 0)[0]).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(ValueError, match="must share a size") as err:
        evaluator.read_activations(str(tmp_path / "mixed"))
    assert "\n" not in str(err.value)
    Image.fromarray(images(1, 6, 0)[0][..., 0]).save(tmp_path / "grey.png")  # greyscale files become RGB
    (tmp_path / "grey").mkdir()
    (tmp_path / "grey.png").rename(tmp_path / "grey" / "g.png")
    assert evaluator.read_activations(str(tmp_path / "grey"))[0].shape == (1, 3)


def test_mu_sigma_statistics_files_are_written_and_read(tmp_path):
    evaluator = ev.Evaluator(MeanColour(), batch_size=5, progress=False)
    ref_images, sample_images = images(16, 6, 31), images(12, 6, 32)
    np.savez(tmp_path / "ref.npz", ref_images)
    np.savez(tmp_path / "sample.npz", sample_images)
    stats = evaluator.write_statistics(str(tmp_path / "ref.npz"), str(tmp_path / "ref_stats.npz"))
    with np.load(tmp_path / "ref_stats.npz") as data:
        assert sorted(data.files) == ["mu", "sigma"]  # pytorch-fid / EDM fid.py layout
        np.testing.assert_array_equal(data["mu"], stats.mu)
        np.testing.assert_array_equal(data["sigma"], stats.sigma)
    full = evaluator.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"))
    only = evaluator.evaluate(str(tmp_path / "ref_stats.npz"), str(tmp_path / "sample.npz"))
    assert only["fid"] == full["fid"] and only["inception_score"] == full["inception_score"]
    assert only["sfid"] is None and only["precision"] is None and only["recall"] is None
    assert ev.format_metrics(only).splitlines()[2] == "sFID: n/a"
    with pytest.raises(ValueError, match="must end in .npz"):
        ev.save_statistics(str(tmp_path / "stats.txt"), stats)


def test_statistics_stored_in_the_sample_npz_are_honoured(tmp_path):
    evaluator = ev.Evaluator(MeanColour(), batch_size=4, progress=False)
    ref_images, sample_images = images(15, 6, 41), images(11, 6, 42)
    np.savez(tmp_path / "ref.npz", ref_images)
    np.savez(tmp_path / "sample.npz", sample_images)
    stored = {"mu": np.full(3, 90.0), "sigma": np.eye(3) * 9, "mu_s": np.full(2, 5.0), "sigma_s": np.eye(2)}
    np.savez(tmp_path / "sample_stats.npz", sample_images, **stored)
    plain = evaluator.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"))
    given = evaluator.evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "sample_stats.npz"))
    ref_pool, ref_spatial = (FIDStatistics.from_features(a) for a in evaluator.read_activations(str(tmp_path / "ref.npz")))
    assert given["fid"] == pytest.approx(FIDStatistics(stored["mu"], stored["sigma"]).frechet_distance(ref_pool))
    assert given["sfid"] == pytest.approx(FIDStatistics(stored["mu_s"], stored["sigma_s"]).frechet_distance(ref_spatial))
    assert given["fid"] != pytest.approx(plain["fid"])
    for key in ("inception_score", "precision", "recall"):  # still from the sample images
        assert given[key] == plain[key]
    # the reference's Evaluator.read_statistics does the same
    assert evaluator.read_statistics(str(tmp_path / "sample_stats.npz"), None)[0].mu[0] == 90.0


def test_cli_writes_a_statistics_file_and_evaluates_against_it(tmp_path, capsys, shared_random_inception):
    from PIL import Image

    (tmp_path / "real").mkdir()
    for i, image in enumerate(images(5, 16, 51)):
        Image.fromarray(image).save(tmp_path / "real" / f"{i}.png")
    np.savez(tmp_path / "sample.npz", images(4, 16, 52))
    common = ["--random_weights", "--quiet", "--batch_size", "3", "--device", "cpu", "--fid_method", "eigh"]
    assert ev.main(["--save_stats", str(tmp_path / "real"), str(tmp_path / "stats.npz")] + common) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'stats.npz'}: mu [2048], sigma [2048, 2048]")
    assert ev.main([str(tmp_path / "stats.npz"), str(tmp_path / "sample.npz"), "--json"] + common) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    metrics = json.loads(lines[-1])
    assert metrics["fid"] > 0 and metrics["sfid"] is None and metrics["precision"] is None
    assert lines[2] == "sFID: n/a"
    assert ev.main([str(tmp_path / "real"), str(tmp_path / "sample.npz"), "--json"] + common) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fid"] == pytest.approx(metrics["fid"], rel=1e-6)


def test_unreadable_image_in_a_folder_is_one_line_naming_it(tmp_path, capsys, shared_random_inception):
    from PIL import Image

    (tmp_path / "real").mkdir()
    for i, image in enumerate(images(3, 8, 53)):
        Image.fromarray(image).save(tmp_path / "real" / f"{i}.png")
    (tmp_path / "real" / "1.png").write_bytes(b"")  # a 0-byte PNG among readable ones
    common = ["--random_weights", "--quiet", "--device", "cpu"]
    assert ev.main(["--save_stats", str(tmp_path / "real"), str(tmp_path / "stats.npz")] + common) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read image ") and err.count("\n") == 1, err
    assert str(tmp_path / "real" / "1.png") in err and not (tmp_path / "stats.npz").exists()
    (tmp_path / "real" / "0.png").write_bytes(b"\x89PNG\r\n")  # the first file, which gives the size, cut off
    with pytest.raises(ValueError, match="cannot read image .*0.png"):
        ev.ImageFolderReader(ev.list_images(str(tmp_path / "real")))


def test_save_stats_never_replaces_a_file_unless_asked(tmp_path, capsys):
    reference = tmp_path / "ref_batch.npz"
    np.savez(reference, images(2, 8, 54))
    before = reference.read_bytes()
    np.savez(tmp_path / "sample.npz", images(2, 8, 55))
    common = ["--random_weights", "--quiet", "--device", "cpu", "--batch_size", "2"]
    # the two arguments swapped: the reference batch would be the file written
    assert ev.main(["--save_stats", str(tmp_path / "sample.npz"), str(reference)] + common) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(reference) in err and "--overwrite" in err
    assert reference.read_bytes() == before
    with pytest.raises(ValueError, match="already exists"):
        ev.save_statistics(str(reference), FIDStatistics(np.zeros(2), np.eye(2)))
    assert reference.read_bytes() == before
    ev.save_statistics(str(reference), FIDStatistics(np.zeros(2), np.eye(2)), overwrite=True)
    with np.load(reference) as data:
        assert sorted(data.files) == ["mu", "sigma"]


def test_an_unexpected_evaluator_failure_is_one_line(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the device stopped answering")

    monkeypatch.delenv("CM_DEBUG", raising=False)
    monkeypatch.setattr(ev, "load_inception", broken)
    ref = tmp_path / "ref.npz"
    np.savez(ref, images(4, 8, 0))
    with pytest.raises(SystemExit) as exit_info:
        ev.main([str(ref), str(ref), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("error: RuntimeError: the device stopped answering (full traceback in "), err


def test_every_stage_of_an_evaluation_shows_progress(tmp_path, capsys):
    np.savez(tmp_path / "ref.npz", images(14, 6, 21))
    np.savez(tmp_path / "sample.npz", images(9, 6, 22))
    quiet = ev.Evaluator(MeanColour(), batch_size=4, progress=False).evaluate(str(tmp_path / "ref.npz"),
                                                                             str(tmp_path / "sample.npz"))
    capsys.readouterr()
    shown = ev.Evaluator(MeanColour(), batch_size=4, progress=True).evaluate(str(tmp_path / "ref.npz"),
                                                                            str(tmp_path / "sample.npz"))
    err = capsys.readouterr().err
    assert shown == quiet
    assert "statistics" in err and "evaluations:" in err and f"/{ev.ALL_METRICS_STAGES} [" in err  # bars by stage
