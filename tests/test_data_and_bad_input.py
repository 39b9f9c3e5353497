"""Data loading (folders, npz, digits) and the one-line errors of the training scripts."""

import numpy as np
import pytest
import torch
from PIL import Image

from cm.image_datasets import load_data
from cm.train_cli import main

from helpers import tiny_argv, tiny_model_and_diffusion


def write_images(folder, names, size=(20, 12)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        arr = np.full((size[1], size[0], 3), 20 * i, dtype=np.uint8)
        Image.fromarray(arr).save(folder / name)


def test_image_folder_with_class_prefixes_and_center_crop(tmp_path):
    write_images(tmp_path / "a", ["cat_1.png", "dog_1.jpg"])
    write_images(tmp_path / "a" / "sub", ["cat_2.png", "dog_2.png"])
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    data = load_data(data_dir=str(tmp_path / "a"), batch_size=4, image_size=8, class_cond=True,
                     deterministic=True, random_flip=False)
    x, cond = next(data)
    assert x.shape == (4, 3, 8, 8) and x.dtype == torch.float32
    assert -1 <= x.min() and x.max() <= 1
    assert sorted(cond["y"].tolist()) == [0, 0, 1, 1]  # cat -> 0, dog -> 1


def test_digits_and_npz_sources(tmp_path):
    x, cond = next(load_data(data_dir="digits", batch_size=5, image_size=16, class_cond=True))
    assert x.shape == (5, 3, 16, 16) and cond["y"].shape == (5,)
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "set.npz", images, np.arange(10))
    x, cond = next(load_data(data_dir=str(tmp_path / "set.npz"), batch_size=10, image_size=8, class_cond=True,
                             deterministic=True, random_flip=False))
    assert torch.allclose((x + 1) * 127.5, torch.from_numpy(images).permute(0, 3, 1, 2).float(), atol=1e-3)
    assert cond["y"].tolist() == list(range(10))


def test_data_stream_resumes_at_the_same_batch():
    a = load_data(data_dir="digits", batch_size=7, image_size=8, seed=3)
    for _ in range(300):  # past the end of the first epoch
        next(a)
    state = a.state_dict()
    expected = next(a)[0]
    b = load_data(data_dir="digits", batch_size=7, image_size=8, seed=3)
    b.load_state_dict(state)
    assert torch.equal(next(b)[0], expected)


def test_missing_and_empty_data_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_data(data_dir=str(tmp_path / "nowhere"), batch_size=2, image_size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        load_data(data_dir=str(tmp_path / "empty"), batch_size=2, image_size=8)
    with pytest.raises(ValueError, match="--data_dir"):
        load_data(data_dir="", batch_size=2, image_size=8)


def test_unreadable_image_is_skipped_with_a_warning_or_stops(tmp_path, capsys):
    write_images(tmp_path / "d", ["a_1.png", "a_2.png", "a_3.png"])
    (tmp_path / "d" / "a_0.png").write_bytes(b"not a png")
    data = load_data(data_dir=str(tmp_path / "d"), batch_size=4, image_size=8, deterministic=True, num_workers=0)
    x, _ = next(data)
    assert x.shape[0] == 4
    assert "a_0.png" in capsys.readouterr().err
    strict = load_data(data_dir=str(tmp_path / "d"), batch_size=4, image_size=8, deterministic=True,
                       on_bad_image="error", num_workers=0)
    with pytest.raises(ValueError, match="cannot read image .*a_0.png"):
        next(strict)


def test_npz_of_the_wrong_size(tmp_path):
    np.savez(tmp_path / "big.npz", np.zeros((4, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="32x32 images but --image_size is 8"):
        load_data(data_dir=str(tmp_path / "big.npz"), batch_size=2, image_size=8)


def test_distillation_without_a_teacher_stops_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main("consistency_distillation", tiny_argv(log_dir=tmp_path, loss_norm="l2"))
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs --teacher_model_path" in err


def test_teacher_checkpoint_that_does_not_fit_names_the_differences(tmp_path, capsys):
    other, _ = tiny_model_and_diffusion(num_channels=64)
    torch.save(other.state_dict(), tmp_path / "teacher.pt")
    with pytest.raises(SystemExit):
        main("consistency_distillation",
             tiny_argv(log_dir=tmp_path / "run", loss_norm="l2", teacher_model_path=tmp_path / "teacher.pt"))
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not fit the model flags" in err and "shape mismatches" in err


def test_unknown_training_mode_and_flag_values_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main("consistency_training", tiny_argv(log_dir=tmp_path, loss_norm="l3"))
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "invalid choice: 'l3'" in err
