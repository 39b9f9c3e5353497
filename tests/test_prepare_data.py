"""scripts/prepare_data.py on a few generated files: a fake CIFAR-10 tarball, a fake LSUN lmdb, an ImageNet-like
train folder and a plain folder; outputs are what --data_dir reads, runs resume, unreadable images are counted."""

import importlib.util
import io
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from cm.image_datasets import center_crop_arr, class_labels, list_image_files, load_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("script_prepare_data", os.path.join(ROOT, "scripts", "prepare_data.py"))
prep = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prep)

HAS_LMDB = importlib.util.find_spec("lmdb") is not None


def run(*flags):
    return prep.main([str(f) for f in flags])


def fake_cifar_tarball(path, per_batch=3, seed=0):
    """A tarball laid out like cifar-10-python.tar.gz (batches out of order), with per_batch images each."""
    rng = np.random.default_rng(seed)
    arrays = {}
    with tarfile.open(path, "w:gz") as archive:
        def add(name, obj):
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

        add("batches.meta", {b"label_names": [c.encode() for c in prep.CIFAR10_CLASSES]})
        for name in ["data_batch_3", "test_batch", "data_batch_1", "data_batch_5", "data_batch_2", "data_batch_4"]:
            images = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
            labels = [int(v) for v in rng.integers(0, 10, per_batch)]
            arrays[name] = (images, labels)
            rows = images.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # R plane, G plane, B plane
            add(name, {b"data": rows, b"labels": labels, b"filenames": [b"x.png"] * per_batch})
    return arrays


def add_member(archive, name, data):
    info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


class _MakesDirectory:
    """Pickles to a call of os.makedirs(path): what a hostile batch file would hold."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (self.path,)


def read(path):
    with Image.open(path) as image:
        return np.asarray(image)


def test_cifar_tarball_becomes_class_labelled_pngs_that_load_data_reads(tmp_path):
    arrays = fake_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    out = tmp_path / "cifar_train"
    counts = run("--kind", "cifar10", "--source", tmp_path / "cifar-10-python.tar.gz", "--output_dir", out,
                 "--allow_unverified", "true")
    assert (counts["written"], counts["skipped"]) == (15, 0)
    for k in range(1, 6):
        images, labels = arrays[f"data_batch_{k}"]
        for i, (image, label) in enumerate(zip(images, labels)):
            path = out / f"{prep.CIFAR10_CLASSES[label]}_{10000 * (k - 1) + i:05d}.png"
            np.testing.assert_array_equal(read(path), image)
    files = list_image_files(str(out))
    by_name = {os.path.basename(f): label for f, label in zip(files, class_labels(files))}
    expected = {f"{prep.CIFAR10_CLASSES[l]}_{10000 * (k - 1) + i:05d}.png": l
                for k in range(1, 6) for i, l in enumerate(arrays[f"data_batch_{k}"][1])}
    # --class_cond labels are CIFAR's own when all ten classes occur; here: their order is CIFAR's
    assert sorted(set(by_name.values())) == list(range(len(set(expected.values()))))
    assert [expected[n] for n in sorted(by_name, key=by_name.get)] == sorted(expected.values())
    images, cond = next(load_data(data_dir=str(out), batch_size=4, image_size=32, class_cond=True,
                                  deterministic=True, random_flip=False, num_workers=0))
    assert images.shape == (4, 3, 32, 32) and cond["y"].shape == (4,)

    test = run("--kind", "cifar10", "--split", "test", "--source", tmp_path / "cifar-10-python.tar.gz",
               "--output_dir", tmp_path / "cifar_test", "--allow_unverified", "true")
    assert test["written"] == 3
    images, labels = arrays["test_batch"]
    np.testing.assert_array_equal(read(tmp_path / "cifar_test" / f"{prep.CIFAR10_CLASSES[labels[1]]}_00001.png"),
                                  images[1])


def test_runs_resume_and_leave_no_partial_files(tmp_path):
    fake_cifar_tarball(tmp_path / "c.tar.gz")
    flags = ["--kind", "cifar10", "--source", tmp_path / "c.tar.gz", "--output_dir", tmp_path / "out",
             "--allow_unverified", "true"]
    first = run(*flags, "--max_images", "4")
    assert first["written"] == 4
    again = run(*flags)
    assert (again["existing"], again["written"]) == (4, 11)
    victim = sorted((tmp_path / "out").iterdir())[3]
    victim.unlink()
    third = run(*flags)
    assert (third["existing"], third["written"]) == (14, 1) and victim.exists()
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]


def test_imagenet_train_folder_becomes_64px_with_adm_downsampling(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "train"
    sources = {}
    for wnid, name, size in [("n01440764", "n01440764_10026.JPEG", (150, 100)), ("n02102040", "img_7.JPEG", (90, 140))]:
        (src / wnid).mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        image.save(src / wnid / name, quality=95)
        sources[wnid] = src / wnid / name
    (src / "n02102040" / "broken.JPEG").write_bytes(b"not a jpeg")
    counts = run("--kind", "imagenet", "--source", src, "--output_dir", tmp_path / "in64", "--image_size", 16)
    assert (counts["written"], counts["skipped"]) == (2, 1)
    assert counts["skipped_examples"][0].startswith("n02102040/n02102040_broken.png: not a readable image")
    out_a = tmp_path / "in64" / "n01440764" / "n01440764_10026.png"
    out_b = tmp_path / "in64" / "n02102040" / "n02102040_img_7.png"
    with Image.open(sources["n01440764"]) as image:
        np.testing.assert_array_equal(read(out_a), center_crop_arr(image.convert("RGB"), 16))
    assert read(out_b).shape == (16, 16, 3)
    files = list_image_files(str(tmp_path / "in64"))
    assert list(class_labels(files)) == [0, 1]


def test_any_folder_is_resized_keeping_its_layout(tmp_path):
    src = tmp_path / "photos"
    (src / "trip").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(src / "a.png")
    Image.new("RGBA", (31, 77), (0, 0, 255, 255)).save(src / "trip" / "b.webp")
    Image.new("L", (20, 20), 90).save(src / "trip" / "c.bmp")
    counts = run("--kind", "folder", "--source", src, "--output_dir", tmp_path / "small", "--image_size", 12)
    assert counts["written"] == 3
    outputs = sorted(os.path.relpath(p, tmp_path / "small") for p in list_image_files(str(tmp_path / "small")))
    assert outputs == ["a.png", os.path.join("trip", "b.png"), os.path.join("trip", "c.png")]
    assert all(read(tmp_path / "small" / o).shape == (12, 12, 3) for o in outputs)
    np.testing.assert_array_equal(read(tmp_path / "small" / "a.png")[0, 0], [200, 10, 10])


def test_box_resize_center_crop_is_the_reference_lsun_resize():
    image = Image.fromarray(np.arange(20 * 40 * 3, dtype=np.uint8).reshape(20, 40, 3))
    out = prep.box_resize_center_crop(image, 10)
    expected = np.asarray(image.resize((20, 10), resample=Image.BOX))[:, 5:15]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.skipif(not HAS_LMDB, reason="lmdb is not installed (pip install lmdb)")
def test_lsun_lmdb_export_is_cropped_and_resized(tmp_path):
    import lmdb

    rng = np.random.default_rng(2)
    path = tmp_path / "bedroom_train_lmdb"
    env = lmdb.open(str(path), map_size=1 << 24)
    arrays = []
    with env.begin(write=True) as txn:
        for i, (w, h) in enumerate([(48, 36), (36, 60), (40, 40)]):
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(arr).save(buffer, format="WEBP", lossless=True)
            txn.put(f"{i:04d}".encode(), buffer.getvalue())
            arrays.append(arr)
        txn.put(b"0003", b"corrupt record")
    env.close()
    counts = run("--kind", "lsun", "--source", path, "--output_dir", tmp_path / "lsun", "--image_size", 16)
    assert (counts["written"], counts["skipped"]) == (3, 1)
    for i, arr in enumerate(arrays):
        out = read(tmp_path / "lsun" / f"bedroom_{i:07d}.png")
        np.testing.assert_array_equal(out, prep.box_resize_center_crop(Image.fromarray(arr), 16))
    again = run("--kind", "lsun", "--source", path, "--output_dir", tmp_path / "lsun", "--image_size", 16)
    assert (again["existing"], again["written"], again["skipped"]) == (3, 0, 1)


def test_missing_lmdb_names_the_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lmdb", None)  # import lmdb now fails
    (tmp_path / "cat_train_lmdb").mkdir()
    with pytest.raises(SystemExit):
        run("--kind", "lsun", "--source", tmp_path / "cat_train_lmdb", "--output_dir", tmp_path / "o")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install lmdb" in err


def test_bad_input_is_one_line(tmp_path, capsys):
    for flags in (
        ["--kind", "folder", "--source", tmp_path, "--output_dir", tmp_path / "o"],
        ["--kind", "cifar10", "--source", tmp_path / "missing.tar.gz", "--output_dir", tmp_path / "o"],
        ["--source", tmp_path],
    ):
        with pytest.raises(SystemExit):
            run(*flags)
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    (tmp_path / "not.tar.gz").write_bytes(b"nope")
    with pytest.raises(SystemExit):
        run("--kind", "cifar10", "--source", tmp_path / "not.tar.gz", "--output_dir", tmp_path / "o")
    assert "not a readable tarball" in capsys.readouterr().err


def test_command_line_shows_progress_and_a_summary(tmp_path):
    fake_cifar_tarball(tmp_path / "c.tar.gz", per_batch=2)
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "prepare_data.py"), "--kind", "cifar10",
           "--source", str(tmp_path / "c.tar.gz"), "--output_dir", str(tmp_path / "out"), "--allow_unverified", "true"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{tmp_path / 'out'}: wrote 10, kept 0 already there, skipped 0 unreadable"
    assert "prepare" in result.stderr  # the tqdm bar


def test_hostile_cifar_pickle_runs_nothing_and_is_one_line(tmp_path, capsys):
    victim = tmp_path / "created_by_the_pickle"
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        add_member(archive, "data_batch_1", pickle.dumps({b"data": _MakesDirectory(str(victim)), b"labels": [0]}))
    flags = ["--kind", "cifar10", "--source", tarball, "--output_dir", tmp_path / "out"]
    with pytest.raises(SystemExit):  # not the official tarball: refused before reading it
        run(*flags)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--allow_unverified" in err
    assert prep.CIFAR10_MD5 in err and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # read anyway: the unpickler refuses os.makedirs without calling it
        run(*flags, "--allow_unverified", "true")
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("prepare:")]  # no progress bar
    assert lines[0].startswith("warning: ") and len(lines) == 2, err
    assert lines[1].startswith("error: ") and "data_batch_1" in lines[1] and "os.makedirs" in lines[1]
    assert not victim.exists()


def python2_cifar_pickle(rows, labels):
    """The opcodes Python 2's cPickle (protocol 2) writes for a CIFAR-10 batch: str keys and data, the array
    rebuilt by numpy.core.multiarray._reconstruct, numpy.ndarray and numpy.dtype (as in the official files)."""
    import struct

    def short(b):
        return b"U" + bytes([len(b)]) + b

    n, width = rows.shape
    dtype = b"cnumpy\ndtype\n" + short(b"u1") + b"K\x00K\x01\x87R" + (
        b"(K\x03" + short(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + short(b"b") + b"\x87R"
             + b"(K\x01" + b"K" + bytes([n]) + b"M" + struct.pack("<H", width) + b"\x86" + dtype + b"\x89"
             + b"T" + struct.pack("<I", rows.size) + rows.tobytes() + b"tb")
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + short(b"data") + array + short(b"labels") + label_list + b"u."


def test_cifar_batches_built_from_allowed_types_only(tmp_path):
    rows = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    batch = {b"data": rows, b"labels": [3, 9], b"filenames": [b"a.png", b"b.png"], b"batch_label": b"x"}
    for protocol in (2, 4, 5):  # Python 2's cPickle files are protocol 2; 5 rebuilds arrays from a buffer
        out = prep.read_cifar_batch(io.BytesIO(pickle.dumps(batch, protocol=protocol)), "batch")
        np.testing.assert_array_equal(out[b"data"], rows)
        assert out[b"labels"] == [3, 9] and out[b"filenames"] == [b"a.png", b"b.png"]
    out = prep.read_cifar_batch(io.BytesIO(python2_cifar_pickle(rows, [3, 9])), "batch")
    np.testing.assert_array_equal(out[b"data"], rows)
    assert out[b"labels"] == [3, 9]
    with pytest.raises(ValueError, match="batch refers to builtins.eval"):
        prep.read_cifar_batch(io.BytesIO(b"cbuiltins\neval\n(S'1'\ntR."), "batch")
    with pytest.raises(ValueError, match="not a CIFAR-10 batch"):
        prep.read_cifar_batch(io.BytesIO(pickle.dumps({b"data": rows, b"labels": [3, 10]})), "batch")


def test_official_tarball_md5_is_accepted_without_the_flag(tmp_path, monkeypatch, capsys):
    arrays = fake_cifar_tarball(tmp_path / "c.tar.gz", per_batch=1)
    monkeypatch.setattr(prep, "CIFAR10_MD5", prep.file_digest(tmp_path / "c.tar.gz", "md5"))
    counts = run("--kind", "cifar10", "--split", "test", "--source", tmp_path / "c.tar.gz",
                 "--output_dir", tmp_path / "o")
    assert counts["written"] == 1 and "warning" not in capsys.readouterr().err
    images, labels = arrays["test_batch"]
    np.testing.assert_array_equal(read(tmp_path / "o" / f"{prep.CIFAR10_CLASSES[labels[0]]}_00000.png"), images[0])
