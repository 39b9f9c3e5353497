"""Quality metrics for models of the embedded scikit-learn digits.

A small classifier trained on a fixed 2/3 of the 1,797 digits (seeded, a few seconds on a CPU, cached)
provides features and class predictions. "digits-FID" is the Frechet distance between classifier
features of generated images and of the training split; the held-out third gives the real-data floor.
Coverage is exp(entropy of the predicted-class histogram) / 10: 1 when all ten digits are equally
frequent, 0.1 when only one digit appears.
"""

import math
import os
import weakref

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE_VERSION = 1
TRAIN_FRACTION = 2 / 3


class DigitsClassifier(nn.Module):
    """MLP on 8x8 grayscale digits in [0, 1]: 64 -> 256 -> 64 features -> 10 classes."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def to_classifier_inputs(images):
    """Images (N, C, H, W) in [-1, 1], or uint8 (N, H, W, C), -> (N, 64) grayscale 8x8 in [0, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if images.dtype == torch.uint8:
        from .image_util import from_uint8

        images = from_uint8(images)
    gray = images.float().mean(dim=1, keepdim=True)
    if gray.shape[-1] != 8:
        gray = F.interpolate(gray, size=8, mode="area")
    return ((gray + 1) / 2).clamp(0, 1).flatten(1)


def digits_split(image_size=8):
    """(train, test) images in [-1, 1] (N, 3, S, S) and labels, split by a fixed seeded permutation."""
    from .digits_data import digits_arrays
    from .image_util import from_uint8

    images, labels = digits_arrays(image_size)
    x = from_uint8(images)
    y = torch.from_numpy(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(len(x) * TRAIN_FRACTION)
    train, test = order[:cut], order[cut:]
    return (x[train], y[train]), (x[test], y[test])


def train_digits_classifier(steps=1500, seed=0):
    """Fit the classifier on the training split (full-batch Adam, seeded)."""
    g = torch.Generator().manual_seed(seed)
    (x, y), _ = digits_split()
    inputs = to_classifier_inputs(x)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        noisy = inputs + 0.05 * torch.randn(inputs.shape, generator=g)
        loss = F.cross_entropy(model(noisy), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def _cache_path():
    root = os.environ.get("CM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cm")
    return os.path.join(root, f"digits_classifier_v{CACHE_VERSION}.pt")


def load_digits_classifier():
    """The cached classifier, trained and cached on first use (a cache that cannot be written is skipped)."""
    path = _cache_path()
    model = DigitsClassifier()
    if os.path.isfile(path):
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval().requires_grad_(False)
        except (RuntimeError, OSError, ValueError):
            pass
    model = train_digits_classifier()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    except OSError:
        pass
    return model


@torch.no_grad()
def classifier_outputs(images, classifier):
    """(features, predicted classes) of a batch of images."""
    inputs = to_classifier_inputs(images)
    feats = classifier.features(inputs)
    return feats.double().numpy(), classifier.head(feats).argmax(dim=1).numpy()


def coverage(classes, num_classes=10):
    """exp(entropy of the class histogram) / num_classes: 1 for a uniform spread over the classes."""
    p = np.bincount(classes, minlength=num_classes) / max(len(classes), 1)
    p = p[p > 0]
    return float(math.exp(-(p * np.log(p)).sum()) / num_classes)


def _image_size(images):
    return images.shape[1] if images.dtype in (np.uint8, torch.uint8) and images.shape[-1] in (1, 3) else images.shape[-1]


_REFERENCE_FEATURES = weakref.WeakKeyDictionary()  # classifier -> {image size: features of the training split}


def _reference_features(classifier, image_size):
    """Classifier features of the training split at image_size, computed once per (classifier, size)."""
    per_size = _REFERENCE_FEATURES.setdefault(classifier, {})
    if image_size not in per_size:
        (train_x, _), _ = digits_split(image_size)
        per_size[image_size], _ = classifier_outputs(train_x, classifier)
    return per_size[image_size]


def digits_metrics(samples, classifier=None):
    """digits-FID of samples against the training split at the samples' resolution, coverage, class histogram.

    The training split's features are cached per (classifier, size): a classifier must not change after use.
    """
    from evaluations.metrics import frechet_distance

    classifier = classifier or load_digits_classifier()
    ref_feats = _reference_features(classifier, _image_size(samples))
    feats, classes = classifier_outputs(samples, classifier)
    return {
        "digits_fid": float(frechet_distance(feats, ref_feats)),
        "coverage": coverage(classes),
        "class_histogram": np.bincount(classes, minlength=10).tolist(),
    }


def real_data_floor(image_size=8, classifier=None):
    """digits_metrics of the held-out real digits at image_size: the best a model can expect."""
    _, (test_x, _) = digits_split(image_size)
    return digits_metrics(test_x, classifier)


def classifier_accuracy(classifier=None):
    """Accuracy on the held-out split."""
    classifier = classifier or load_digits_classifier()
    _, (x, y) = digits_split()
    _, pred = classifier_outputs(x, classifier)
    return float((torch.from_numpy(pred) == y).float().mean())
