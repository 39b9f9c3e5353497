"""The quickstart's training_curves.png: matplotlib panels of the loss per noise-level quartile."""

import csv
import importlib.util
import os

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))


def load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart_plot", os.path.join(HERE, "..", "scripts", "quickstart.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_progress(path, steps, with_quartiles=True):
    keys = ["step", "loss"] + ([f"loss_q{q}" for q in range(4)] if with_quartiles else []) + ["lr"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        writer.writerow([0, "", "", "", "", "", 1e-3][: len(keys)])  # a row without a loss is left out
        for step in steps:
            loss = 0.4 * np.exp(-step / 300) + 0.01
            quartiles = [loss * f for f in (0.2, 0.6, 1.1, 1.9)] if with_quartiles else []
            writer.writerow([step, loss, *quartiles, 1e-3])


def colours(path):
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
        return image.size, len(np.unique(pixels, axis=0))


def test_training_curves_are_one_matplotlib_panel_per_stage(tmp_path):
    quickstart = load_quickstart()
    write_progress(tmp_path / "edm.csv", range(10, 600, 10))
    write_progress(tmp_path / "cd.csv", range(10, 120, 10), with_quartiles=False)
    out = tmp_path / "training_curves.png"
    quickstart.plot_curves([("EDM", str(tmp_path / "edm.csv")), ("CD", str(tmp_path / "cd.csv"))], str(out))
    size, count = colours(out)
    assert size == (2 * 640, 300)
    assert count > 50  # anti-aliased lines, text and tick labels, not an empty frame
    quickstart.plot_curves([("CT", str(tmp_path / "edm.csv"))], str(out), width=500, height=250)
    assert colours(out)[0] == (500, 250)


def test_a_log_without_losses_still_gives_a_picture(tmp_path):
    quickstart = load_quickstart()
    (tmp_path / "empty.csv").write_text("step,lr\n0,0.001\n")
    quickstart.plot_curves([("CT", str(tmp_path / "empty.csv"))], str(tmp_path / "c.png"))
    assert colours(tmp_path / "c.png")[0] == (640, 300)
