import numpy as np
import pytest
import torch

from cm.digits_eval import classifier_accuracy, coverage, digits_metrics, digits_split, load_digits_classifier, real_data_floor


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    import os

    os.environ["CM_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    return load_digits_classifier()


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
    (_, _), (x, _) = digits_split(16)
    as_uint8 = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert digits_metrics(as_uint8, classifier)["digits_fid"] == pytest.approx(floor["digits_fid"], rel=0.05)


def test_coverage():
    assert coverage(np.arange(10).repeat(5)) == pytest.approx(1.0)
    assert coverage(np.zeros(50, dtype=int)) == pytest.approx(0.1)
