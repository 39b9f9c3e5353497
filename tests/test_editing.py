"""Zero-shot editing (cm/editing.py, scripts/image_edit.py): every task keeps what it must keep."""

import numpy as np
import pytest
import torch

from cm import editing
from cm.image_util import from_uint8
from cm.random_util import get_generator
from cm.sampling import get_sigmas_karras

from helpers import TINY_MODEL, load_script, tiny_model_and_diffusion

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


image_edit = load_script("image_edit")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, diffusion = tiny_model_and_diffusion(distillation=True)
    return model.eval(), diffusion


@pytest.fixture(scope="module")
def denoiser(tiny):
    return editing.make_denoiser(tiny[1], tiny[0])


def smooth_denoiser(x, sigma):
    """A cheap stand-in consistency function for any image size: a shrunk, blurred, sigma-dependent map."""
    s = sigma.view(-1, 1, 1, 1).to(x)
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return torch.tanh(blurred / (1 + s) + 0.1 * torch.sin(3 * x.roll(1, dims=1)))


def images(n=3, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def sigmas():
    return editing.editing_sigmas((0, 10, 20, 30, 39), 40, SIGMA_MIN, SIGMA_MAX)


def gen(n, seed=0):
    return get_generator("determ-indiv", n, seed)


def test_editing_sigmas_are_grid_points_without_sigma_min():
    grid = get_sigmas_karras(40, SIGMA_MIN, SIGMA_MAX)
    assert torch.equal(sigmas(), grid[[0, 10, 20, 30]])
    with pytest.raises(ValueError, match="strictly increasing"):
        editing.editing_sigmas((0, 45), 40, SIGMA_MIN, SIGMA_MAX)
    levels = editing.levels_from(5.0, sigmas(), SIGMA_MIN)
    assert levels[0] == 5.0 and (levels[1:] < 5.0).all() and (levels[1:] > SIGMA_MIN).all()


@pytest.mark.parametrize("kind", ["box", "half", "strokes"])
def test_inpaint_keeps_the_known_pixels(denoiser, kind):
    x = images()
    mask = editing.make_mask(kind, 8, seed=3)
    assert 0 < mask.sum() < 64
    out, masked = editing.inpaint(denoiser, x, mask, sigmas(), gen(3))
    keep = (mask == 0).expand_as(x)
    assert torch.equal(out[keep], x[keep])
    assert torch.equal(masked[~keep], torch.zeros_like(masked[~keep]))
    assert not torch.equal(out[~keep], x[~keep])


def test_colorize_keeps_the_luminance(denoiser):
    x = images()
    out, gray = editing.colorize(denoiser, x, sigmas(), gen(3))
    assert torch.allclose(editing.grayscale(out), editing.grayscale(x), atol=1e-5)
    assert torch.allclose(gray, editing.grayscale(x))
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3  # colour was added
    assert out.abs().max() <= 1 + 1e-6


def test_fit_range_tones_down_what_would_be_clipped_and_keeps_the_known_part():
    y = torch.tensor([-0.95, -0.9, -0.97]).view(1, 3, 1, 1).repeat(1, 1, 2, 2)  # a dark pixel
    chroma = torch.tensor([1.0, -0.3, -0.6]).view(1, 3, 1, 1)  # no luminance: 0.2989 - 0.1761 - 0.0684 ~ 0.054
    chroma = chroma - editing.grayscale(chroma) / sum(editing.LUMA)
    c = editing.colorize_constraint()
    x = c.replace(y + 0.8 * chroma, y)
    assert x.min() < -1  # clamping would brighten it
    fitted = c.fit_range(x, y)
    assert fitted.abs().max() <= 1 + 1e-6
    assert torch.allclose(editing.grayscale(fitted), editing.grayscale(y), atol=1e-6)
    inside = c.replace(y + 0.01 * chroma, y)
    assert torch.allclose(c.fit_range(inside, y), inside, atol=1e-6)  # nothing to do


@pytest.mark.parametrize(
    "size, factor, fn", [(8, 2, None), (8, 4, None), (12, 3, smooth_denoiser), (10, 5, smooth_denoiser)]
)
def test_superres_output_downsamples_to_the_input(denoiser, size, factor, fn):
    low = images(size=size // factor)
    out, up = editing.superres(fn or denoiser, low, factor, sigmas(), gen(3))
    assert out.shape == (3, 3, size, size)
    assert torch.allclose(editing.downsample(out, factor), low, atol=1e-5)
    assert out.abs().max() <= 1 + 1e-6
    assert torch.allclose(editing.downsample(up, factor), low, atol=1e-6)


def test_orthogonal_bases_and_constraints_are_exact_projections():
    for first in ([0.2989, 0.5870, 0.1140], [1.0] * 9):
        q = editing.orthogonal_basis(first)
        assert torch.allclose(q.T @ q, torch.eye(len(first), dtype=torch.float64), atol=1e-12)
        v = torch.tensor(first, dtype=torch.float64)
        assert torch.allclose(q[:, 0], v / v.norm())
    x, y = images(2, 12), images(2, 12, seed=1)
    box = editing.make_mask("box", 12)
    for c in (editing.colorize_constraint(), editing.superres_constraint(3), editing.inpaint_constraint(box)):
        assert torch.allclose(c.inverse(c.forward(x)), x, atol=1e-6)
        mixed = c.replace(x, y)
        assert torch.allclose(c.project(mixed), c.project(y), atol=1e-5)
        assert torch.allclose(mixed - c.project(mixed), x - c.project(x), atol=1e-5)


def test_interpolation_ends_are_the_one_step_samples(denoiser):
    z = gen(4).randn(4, 3, 8, 8)
    z0, z1 = z[0::2], z[1::2]
    frames = editing.interpolate(denoiser, z0, z1, 5, SIGMA_MAX)
    assert frames.shape == (2, 5, 3, 8, 8)
    s = torch.full((2,), SIGMA_MAX)
    assert torch.allclose(frames[:, 0], denoiser(z0 * SIGMA_MAX, s), atol=1e-5)
    assert torch.allclose(frames[:, -1], denoiser(z1 * SIGMA_MAX, s), atol=1e-5)
    assert not torch.allclose(frames[:, 2], frames[:, 0], atol=1e-3)


def test_slerp_is_exact_at_the_ends_and_keeps_the_norm():
    z0, z1 = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    assert torch.equal(editing.slerp(z0, z1, 0.0), z0) and torch.equal(editing.slerp(z0, z1, 1.0), z1)
    norm = lambda z: z.flatten(1).norm(dim=1)  # noqa: E731
    z1 = z1 * (norm(z0) / norm(z1)).view(-1, 1, 1, 1)  # on one sphere, every interpolant stays on it
    for alpha in (0.25, 0.5, 0.9):
        assert torch.allclose(norm(editing.slerp(z0, z1, alpha)), norm(z0), rtol=1e-5)
    assert torch.allclose(editing.slerp(z0, z0, 0.3), z0, atol=1e-5)


def test_stroke_at_sigma_max_ignores_the_stroke(denoiser):
    a, b = images(seed=1), images(seed=2)
    out_a = editing.stroke_guided(denoiser, a, SIGMA_MAX, sigmas(), gen(3), SIGMA_MIN, SIGMA_MAX)
    out_b = editing.stroke_guided(denoiser, b, SIGMA_MAX, sigmas(), gen(3), SIGMA_MIN, SIGMA_MAX)
    assert torch.equal(out_a, out_b)
    low_a = editing.stroke_guided(denoiser, a, 0.5, sigmas(), gen(3), SIGMA_MIN, SIGMA_MAX)
    low_b = editing.stroke_guided(denoiser, b, 0.5, sigmas(), gen(3), SIGMA_MIN, SIGMA_MAX)
    assert not torch.allclose(low_a, low_b, atol=1e-3)
    with pytest.raises(ValueError, match="sigma must be in"):
        editing.stroke_guided(denoiser, a, 100.0, sigmas(), gen(3), SIGMA_MIN, SIGMA_MAX)


def test_denoise_is_one_consistency_step_when_no_level_lies_below(denoiser):
    x = images()
    noisy = x + 0.3 * torch.randn_like(x)
    out = editing.denoise(denoiser, noisy, 0.3, [], gen(3))
    assert torch.equal(out, denoiser(noisy, torch.full((3,), 0.3)))
    refined = editing.denoise(denoiser, noisy, 0.3, sigmas(), gen(3))
    assert refined.shape == x.shape and not torch.equal(refined, out)


def test_edit_loop_without_a_constraint_is_multistep_sampling(tiny):
    model, diffusion = tiny
    from cm.sampling import karras_sample

    g1, g2 = gen(2, seed=5), gen(2, seed=5)
    reference = karras_sample(diffusion, model, (2, 3, 8, 8), 40, sampler="multistep", ts=(0, 10, 39), generator=g1)
    x = g2.randn(2, 3, 8, 8) * SIGMA_MAX
    levels = editing.editing_sigmas((0, 10, 39), 40, SIGMA_MIN, SIGMA_MAX)
    ours = editing.edit_loop(editing.make_denoiser(diffusion, model), x, levels, g2)
    assert torch.allclose(ours, reference, atol=1e-6)


# ----- the script --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny):
    path = tmp_path_factory.mktemp("edit") / "ema.pt"
    torch.save(tiny[0].state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from sklearn.datasets import load_digits

    digits = load_digits().images[:4] / 16.0
    rgb = np.stack([digits, digits[:, ::-1], 1 - digits], axis=-1)
    path = tmp_path_factory.mktemp("inputs") / "digits.npz"
    np.savez(path, (rgb * 255).round().astype(np.uint8))
    return str(path)


def edit(tmp_path, ckpt, *extra):
    argv = [f"--{k}={v}" for k, v in TINY_MODEL.items()]
    argv += ["--model_path", ckpt, "--log_dir", str(tmp_path), "--batch_size", "3", "--ts", "0,13,26,39"]
    return image_edit.main(argv + list(extra))


def test_script_inpaint_colorize_superres_keep_their_inputs(tmp_path, ckpt, inputs):
    with np.load(inputs) as data:
        original = data["arr_0"]
    result = edit(tmp_path, ckpt, "--task", "inpaint", "--input", inputs, "--mask", "half")
    known = editing.make_mask("half", 8)[0, 0].numpy() == 0
    assert np.array_equal(result["results"][:, known], original[:, known])
    result = edit(tmp_path, ckpt, "--task", "colorize", "--input", inputs)
    luma = lambda a: editing.grayscale(from_uint8(a))  # noqa: E731
    assert (luma(result["results"]) - luma(original)).abs().max() <= 1.5 / 127.5
    result = edit(tmp_path, ckpt, "--task", "superres", "--input", inputs, "--factor", "2")
    low = editing.downsample(from_uint8(original), 2)
    assert (editing.downsample(from_uint8(result["results"]), 2) - low).abs().max() <= 1.5 / 127.5
    for task in ("inpaint", "colorize", "superres"):
        assert (tmp_path / f"{task}.png").exists()
        with np.load(tmp_path / f"{task}_4x8x8x3.npz") as data:
            assert data["arr_0"].shape == data["arr_1"].shape == (4, 8, 8, 3) and data["arr_0"].dtype == np.uint8


def test_script_interpolate_stroke_denoise_and_image_files(tmp_path, ckpt, inputs):
    from PIL import Image

    result = edit(tmp_path, ckpt, "--task", "interpolate", "--num_samples", "2", "--num_frames", "4")
    assert result["results"].shape == (8, 8, 8, 3)
    with np.load(tmp_path / "interpolate_8x8x8x3.npz") as data:
        assert data.files == ["arr_0"]
    with np.load(inputs) as data:
        Image.fromarray(data["arr_0"][0]).resize((20, 16)).save(tmp_path / "a.png")
    files = f"{tmp_path / 'a.png'},{tmp_path / 'a.png'}"
    assert edit(tmp_path, ckpt, "--task", "stroke", "--input", files, "--sigma", "2")["results"].shape == (2, 8, 8, 3)
    assert edit(tmp_path, ckpt, "--task", "denoise", "--input", inputs)["given"].shape == (4, 8, 8, 3)
    # a batch of 3 and a batch of 1 give image 3 the same noise as a batch of 4
    whole = edit(tmp_path, ckpt, "--task", "denoise", "--input", inputs, "--batch_size", "4")
    assert np.array_equal(whole["results"], edit(tmp_path, ckpt, "--task", "denoise", "--input", inputs)["results"])


def test_script_limits_inputs_and_grid_rows(tmp_path, ckpt, inputs):
    from PIL import Image

    result = edit(tmp_path, ckpt, "--task", "denoise", "--input", inputs, "--num_samples", "3", "--grid_rows", "2")
    assert result["results"].shape == (3, 8, 8, 3)  # the first 3 of 4 inputs, all in the npz
    strip = np.asarray(Image.open(result["png"]))
    assert strip.shape[0] == 2 * (8 + 1) + 1  # two rows of 8-px images, 1-px borders


def test_script_mask_file(tmp_path, ckpt, inputs):
    from PIL import Image

    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 1:7] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    result = edit(tmp_path, ckpt, "--task", "inpaint", "--input", inputs, "--mask", str(tmp_path / "mask.png"))
    with np.load(inputs) as data:
        assert np.array_equal(result["results"][:, mask == 0], data["arr_0"][:, mask == 0])


@pytest.mark.parametrize(
    "extra, expected, status",
    [
        (["--task", "outpaint"], "invalid choice", 2),
        (["--mask", "circle"], "unknown mask 'circle'", 1),
        (["--mask", "MASK16"], "is 16x16 pixels, expected 8x8", 1),
        (["--input", "/nonexistent.png"], "does not exist", 1),
        (["--task", "superres", "--factor", "3"], "divide image_size 8", 1),
        (["--task", "denoise", "--sigma", "90"], "sigma must be in", 1),
        (["--ts", "0,50"], "strictly increasing", 1),
        (["--model_path", ""], "no checkpoint given", 1),
        (["--task", "interpolate", "--num_frames", "1"], "num_frames >= 2", 1),
    ],
)
def test_bad_editing_input_gives_one_error_line(tmp_path, capsys, ckpt, inputs, extra, expected, status):
    from PIL import Image

    Image.new("L", (16, 16)).save(tmp_path / "m16.png")
    extra = [str(tmp_path / "m16.png") if e == "MASK16" else e for e in extra]
    if "--input" not in extra:
        extra += ["--input", inputs]
    with pytest.raises(SystemExit) as exit_info:
        edit(tmp_path, ckpt, *extra)
    assert exit_info.value.code == status
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "error:" in err[0] and expected in err[0], err


def test_unknown_task_in_the_library_names_the_tasks():
    with pytest.raises(ValueError, match="allowed: inpaint, colorize, superres, interpolate, stroke, denoise"):
        editing.check_task("outpaint")
