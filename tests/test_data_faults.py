"""Bad training data: counted, limited, converted, validated, and reported in one line naming the file."""

import os
import signal
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from cm import image_datasets, logger
from cm.image_datasets import DataError, load_data, npz_member_memmap

from helpers import quiet_logger, tiny_argv


@pytest.fixture(autouse=True)
def _own_logger(tmp_path):
    quiet_logger(str(tmp_path / "log"))


def write_pngs(folder, count, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + count):
        Image.fromarray(np.full((8, 8, 3), 10 * i, dtype=np.uint8)).save(folder / f"a_{i}.png")


def write_broken(folder, names):
    for name in names:
        (folder / name).write_bytes(b"not an image")


def first_batch(path, **kw):
    kw = dict(dict(batch_size=1, image_size=8, deterministic=True, random_flip=False, num_workers=0), **kw)
    x, _ = next(load_data(data_dir=str(path), **kw))
    return ((x[0] + 1) * 127.5).round().permute(1, 2, 0).numpy()


# ----- image folders ---------------------------------------------------------------------------


def test_a_folder_of_only_unreadable_images_is_one_clear_line(tmp_path):
    (tmp_path / "d").mkdir()
    write_broken(tmp_path / "d", ["a.png", "b.jpg", "c.gif"])
    with pytest.raises(DataError, match=r"none of the 3 images under .*d can be read, e.g. .*: not an image file") as info:
        first_batch(tmp_path / "d", max_bad_images=-1)
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match=r"could not be read, more than max_bad_images allows \(1\)"):
        first_batch(tmp_path / "d")  # the default limit (1%, rounded up) stops sooner


def test_symlinked_folders_are_listed_once_even_in_a_loop(tmp_path):
    write_pngs(tmp_path / "d" / "cats", 2)
    write_pngs(tmp_path / "d", 1, start=5)
    os.symlink(".", tmp_path / "d" / "loop")  # d/loop -> d: a loop
    os.symlink(tmp_path / "d" / "cats", tmp_path / "d" / "alias")  # a second way into d/cats
    write_pngs(tmp_path / "elsewhere", 1, start=7)
    os.symlink(tmp_path / "elsewhere", tmp_path / "d" / "more")  # a linked folder outside d is followed
    files = image_datasets.list_image_files(str(tmp_path / "d"))
    real = sorted(os.path.realpath(f) for f in files)
    assert len(files) == 4 and len(set(real)) == 4
    assert sorted(os.path.basename(f) for f in files) == ["a_0.png", "a_1.png", "a_5.png", "a_7.png"]


def test_skipped_images_are_counted_per_epoch_and_in_all(tmp_path, capsys):
    write_pngs(tmp_path / "d", 6)
    write_broken(tmp_path / "d", ["a_90.png", "a_91.png"])
    log_dir = logger.configure(dir=str(tmp_path / "log"), format_strs=["log"])
    data = load_data(data_dir=str(tmp_path / "d"), batch_size=4, image_size=8, max_bad_images=2, num_workers=0)
    for _ in range(2 * data.per_epoch):  # two epochs
        next(data)
    next(data)  # the first batch of the third epoch ends the second
    data.log_summary()
    text = open(os.path.join(log_dir, "log.txt")).read()
    assert "data: skipped" in text and "in epoch 0" in text and "in epoch 1" in text
    assert "unreadable images in all (2 distinct files)" in text
    assert data.skipped_total >= 2 and data.bad_files == {str(tmp_path / "d" / "a_90.png"), str(tmp_path / "d" / "a_91.png")}
    warnings = capsys.readouterr().err
    assert warnings.count("a_90.png") == 1  # one warning per file, not per epoch


def test_more_bad_images_than_the_limit_stop_with_one_line(tmp_path):
    write_pngs(tmp_path / "d", 6)
    write_broken(tmp_path / "d", ["a_90.png", "a_91.png", "a_92.png"])
    for limit in (2, 0.2):  # a count, then a fraction of the 9 files (rounded up: 2)
        data = load_data(data_dir=str(tmp_path / "d"), batch_size=9, image_size=8, max_bad_images=limit,
                         deterministic=True, num_workers=0)
        with pytest.raises(DataError, match=r"3 images under .* could not be read, more than max_bad_images allows \(2\)"):
            next(data)
    with pytest.raises(ValueError, match="max_bad_images must be"):
        load_data(data_dir=str(tmp_path / "d"), batch_size=2, image_size=8, max_bad_images=-0.5)


def test_sixteen_bit_palette_and_transparent_images_become_the_right_rgb(tmp_path):
    grey16 = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 32896 / 257 = 128

    def only(image, name):
        folder = tmp_path / name
        folder.mkdir()
        image.save(folder / f"{name}.png")
        return first_batch(folder)

    assert np.all(only(grey16, "grey16") == 128)
    assert Image.open(tmp_path / "grey16" / "grey16.png").mode.startswith("I")  # 16-bit on disk
    half = np.zeros((8, 8, 2), dtype=np.uint8)
    half[..., 0], half[:4, :, 1], half[4:, :, 1] = 40, 255, 0  # grey 40: top opaque, bottom transparent
    la = only(Image.fromarray(half, mode="LA"), "la")
    assert np.all(la[:4] == 40) and np.all(la[4:] == 255)
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 51  # 20% opaque red over white
    assert np.allclose(only(Image.fromarray(rgba, mode="RGBA"), "rgba")[0, 0], [0.2 * 200 + 0.8 * 255, 204, 204], atol=1)
    palette = Image.fromarray(np.array([[0, 1] * 4] * 8, dtype=np.uint8), mode="P")
    palette.putpalette([10, 20, 30, 90, 100, 110] + [0] * 762)
    palette.info["transparency"] = 0
    out = only(palette, "palette")
    assert np.all(out[:, 0] == 255) and np.all(out[:, 1] == [90, 100, 110])


def test_an_unreadable_data_folder_is_one_line_naming_it(tmp_path, monkeypatch):
    write_pngs(tmp_path / "d" / "locked", 2)

    def listdir(path):
        if path.endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return sorted(os.listdir(path))

    monkeypatch.setattr(image_datasets.bf, "listdir", listdir)
    with pytest.raises(DataError, match=r"cannot list data directory .*locked: Permission denied$"):
        load_data(data_dir=str(tmp_path / "d"), batch_size=1, image_size=8)


def test_a_worker_that_dies_or_fails_is_one_line_naming_the_file(tmp_path, monkeypatch):
    write_pngs(tmp_path / "d", 4)
    real = image_datasets.read_image

    def deadly(path):
        if path.endswith("a_2.png"):
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process, as the OOM killer would
        return real(path)

    monkeypatch.setattr(image_datasets, "read_image", deadly)
    data = load_data(data_dir=str(tmp_path / "d"), batch_size=1, image_size=8, deterministic=True, num_workers=1)
    with pytest.raises(DataError, match=r"a data-loading worker died .* the batch that starts with .*a_\d\.png") as info:
        for _ in range(4):
            next(data)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(image_datasets, "read_image", real)
    write_broken(tmp_path / "d", ["a_0.png"])
    strict = load_data(data_dir=str(tmp_path / "d"), batch_size=1, image_size=8, deterministic=True, num_workers=1,
                       on_bad_image="error")
    with pytest.raises(DataError, match=r"^cannot read image .*a_0.png: not an image file Pillow can decode$"):
        next(strict)


def test_resume_keeps_the_batches_and_the_counts_with_workers(tmp_path):
    write_pngs(tmp_path / "d", 9)
    write_broken(tmp_path / "d", ["a_90.png"])
    a = load_data(data_dir=str(tmp_path / "d"), batch_size=2, image_size=8, seed=1, num_workers=1)
    for _ in range(7):
        next(a)
    state = a.state_dict()
    expected = [next(a)[0] for _ in range(3)]
    b = load_data(data_dir=str(tmp_path / "d"), batch_size=2, image_size=8, seed=1, num_workers=1)
    b.load_state_dict(state)
    assert all(torch.equal(next(b)[0], x) for x in expected)
    assert b.skipped_total >= state["skipped_total"] and b.bad_files == a.bad_files


def test_the_command_line_stops_with_one_line_on_an_unreadable_folder(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    write_broken(tmp_path / "d", ["a.png", "b.png"])
    with pytest.raises(SystemExit) as info:
        from cm.train_cli import main

        main("consistency_training", tiny_argv(log_dir=tmp_path / "run", data_dir=tmp_path / "d", total_training_steps=1,
                                               loss_norm="l2", batch_size=1))
    assert info.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("train:")]
    assert len(err) == 1 and err[0].startswith("error: none of the 2 images under") and str(tmp_path / "d") in err[0]


# ----- npz arrays ------------------------------------------------------------------------------


def test_float_npz_in_range_is_used_as_is_and_out_of_range_is_one_line(tmp_path):
    images = np.linspace(-1, 1, 4 * 8 * 8 * 3, dtype=np.float32).reshape(4, 8, 8, 3)
    np.savez(tmp_path / "ok.npz", images)
    x, _ = next(load_data(data_dir=str(tmp_path / "ok.npz"), batch_size=4, image_size=8, deterministic=True,
                          random_flip=False))
    assert torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2))
    np.savez(tmp_path / "bad.npz", images * 3)
    with pytest.raises(DataError, match=r"bad.npz: arr_0 holds values outside \[-1, 1\] \(min -3, max 3\)"):
        load_data(data_dir=str(tmp_path / "bad.npz"), batch_size=2, image_size=8)
    late = np.zeros((300, 8, 8, 3), dtype=np.float32)
    late[299] = np.nan  # beyond the early look: caught when its batch is read
    np.savez(tmp_path / "late.npz", late)
    data = load_data(data_dir=str(tmp_path / "late.npz"), batch_size=100, image_size=8, deterministic=True)
    with pytest.raises(DataError, match="outside"):
        for _ in range(3):
            next(data)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 3, 8, 8), np.uint8), r"C = 1 or 3, got shape \(4, 3, 8, 8\); it looks like N x C x H x W"),
        (np.zeros((4, 8, 8, 3), np.int64), "dtype int64; expected uint8"),
        (np.zeros((4, 8, 8), np.uint8), "N x H x W x C"),
        (np.zeros((0, 8, 8, 3), np.uint8), "holds no images"),
    ],
)
def test_npz_layout_and_dtype_are_checked(tmp_path, array, message):
    np.savez(tmp_path / "x.npz", array)
    with pytest.raises(DataError, match=message):
        load_data(data_dir=str(tmp_path / "x.npz"), batch_size=1, image_size=8)


def test_npz_labels_and_corrupt_files_are_checked(tmp_path):
    np.savez(tmp_path / "x.npz", np.zeros((4, 8, 8, 3), np.uint8), np.arange(3))
    with pytest.raises(DataError, match=r"arr_1 must hold 4 integer labels, got int64 \(3,\)"):
        load_data(data_dir=str(tmp_path / "x.npz"), batch_size=1, image_size=8, class_cond=True)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "x.npz").read_bytes()[:200])
    with pytest.raises(DataError, match=r"cannot read .*cut.npz as an .npz file"):
        load_data(data_dir=str(tmp_path / "cut.npz"), batch_size=1, image_size=8)


def test_npz_is_memory_mapped_and_each_rank_reads_only_its_shard(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", images, np.arange(12))
    np.savez_compressed(tmp_path / "packed.npz", images)
    mapped = npz_member_memmap(str(tmp_path / "plain.npz"), "arr_0")
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, images)
    assert npz_member_memmap(str(tmp_path / "packed.npz"), "arr_0") is None  # read whole instead
    x, _ = next(load_data(data_dir=str(tmp_path / "packed.npz"), batch_size=12, image_size=8, deterministic=True,
                          random_flip=False))
    assert torch.equal(((x + 1) * 127.5).round().byte(), torch.from_numpy(images).permute(0, 3, 1, 2).expand(-1, 3, -1, -1))

    class Recording:
        def __init__(self, array):
            self.array, self.rows = array, set()

        def __len__(self):
            return len(self.array)

        def __getitem__(self, index):
            self.rows.update(np.atleast_1d(index).tolist())
            return self.array[index]

    seen = []
    for rank in range(2):
        monkeypatch.setattr(image_datasets.dist_util, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(image_datasets.dist_util, "get_world_size", lambda: 2)
        data = load_data(data_dir=str(tmp_path / "plain.npz"), batch_size=3, image_size=8, seed=5)
        assert isinstance(data.source.images, np.memmap)
        data.source.images = Recording(data.source.images)
        for _ in range(data.per_epoch):
            next(data)
        seen.append(data.source.images.rows)
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]


def test_npz_memmap_handles_zip64_members(tmp_path):
    images = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    with zipfile.ZipFile(tmp_path / "z.npz", "w", allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array(f, images)
    assert np.array_equal(npz_member_memmap(str(tmp_path / "z.npz"), "arr_0"), images)
