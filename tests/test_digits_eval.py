import numpy as np
import pytest
import torch

from cm.digits_data import SPLITS, digits_arrays, split_indices
from cm.digits_eval import (classifier_accuracy, coverage, digits_metrics, digits_split, load_digits_classifier,
                            memorisation_check, real_data_floor, real_digits_spread)
from cm.image_datasets import load_data


@pytest.fixture(scope="module")
def classifier():
    return load_digits_classifier()  # trained once per test run, in the run's cache folder (tests/conftest.py)


def test_classifier_is_accurate_on_held_out_digits(classifier):
    assert classifier_accuracy(classifier) > 0.9


def test_classifier_is_cached(classifier, tmp_path):
    again = load_digits_classifier()
    for a, b in zip(classifier.parameters(), again.parameters()):
        assert torch.equal(a, b)


def test_digits_fid_is_small_for_real_and_large_for_noise(classifier):
    floor = real_data_floor(16, classifier)
    assert floor["digits_fid"] < 2.0 and floor["coverage"] > 0.95
    noise = digits_metrics(torch.rand(600, 3, 16, 16) * 2 - 1, classifier)
    assert noise["digits_fid"] > 20 * floor["digits_fid"]
    x, _ = digits_split("floor", 16)
    as_uint8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert digits_metrics(as_uint8, classifier)["digits_fid"] == pytest.approx(floor["digits_fid"], rel=0.05)


def test_real_digits_against_real_digits_spread_above_the_fixed_floor_split(classifier):
    spread = real_digits_spread(16, classifier, splits=50)
    assert spread == real_digits_spread(16, classifier, splits=50)  # seeded
    assert spread != real_digits_spread(16, classifier, splits=50, seed=1)
    assert 0 < spread["p10"] <= spread["median"] <= spread["p90"] and spread["sd"] > 0
    floor = real_data_floor(16, classifier)["digits_fid"]
    assert spread["floor_percentile"] < 10 and floor < spread["p10"] < spread["mean"]  # the fixed split is a lucky one


def test_coverage():
    assert coverage(np.arange(10).repeat(5)) == pytest.approx(1.0)
    assert coverage(np.zeros(50, dtype=int)) == pytest.approx(0.1)


def test_the_splits_are_disjoint_and_cover_the_digits():
    parts = {name: set(split_indices(1797, name).tolist()) for name in SPLITS}
    assert [len(parts[n]) for n in ("train", "reference", "floor")] == [898, 449, 450]
    assert set().union(*parts.values()) == set(range(1797)) and sum(map(len, parts.values())) == 1797
    with pytest.raises(ValueError, match="unknown digits split"):
        split_indices(1797, "test")


def test_digits_train_loads_only_the_training_half():
    images, _ = digits_arrays(8)
    train = {bytes(row) for row in images[split_indices(len(images), "train")]}
    held_out = {bytes(row) for row in images[split_indices(len(images), "floor")]} - train
    data = load_data(data_dir="digits_train", batch_size=898, image_size=8, random_flip=False)
    batch, _ = next(data)
    seen = {bytes(row) for row in ((batch + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()}
    assert seen <= train and not seen & held_out


def test_memorisation_check_tells_copies_from_new_digits(classifier):
    copies = memorisation_check(digits_split("train", 16)[0][:300])
    assert copies["nearest_is_train"] == 1.0 and copies["copy_fraction"] == 1.0 and copies["nn_distance"] == 0.0
    floor = real_data_floor(16, classifier)  # held-out digits, each left out of the set it is compared with
    assert 0.4 < floor["nearest_is_train"] < 0.6 and floor["copy_fraction"] < 0.1
    assert floor["nn_distance"] == pytest.approx(floor["nn_distance_real"], rel=0.1)


def test_per_class_accuracy_reads_each_class_against_its_own_label(classifier):
    from cm.digits_eval import per_class_accuracy

    classes = np.array([0, 0, 1, 2, 2, 2])
    assert per_class_accuracy(classes, [0, 1, 1, 2, 2, 0], num_classes=3) == [0.5, 0.5, 1.0]
    assert np.isnan(per_class_accuracy(classes, [0, 0, 0, 0, 0, 0], num_classes=2)[1])  # no sample asked for 1
    x, y = digits_split("floor", 16)
    real = digits_metrics(x, classifier, y)
    assert real["label_accuracy"] > 0.9 and len(real["per_class_accuracy"]) == 10
    shuffled = digits_metrics(x, classifier, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))])
    assert shuffled["label_accuracy"] < 0.3  # labels that do not belong to the images
    assert shuffled["digits_fid"] == real["digits_fid"] and "label_accuracy" not in digits_metrics(x, classifier)
