"""Quality metrics for models of the embedded scikit-learn digits.

The digits are split once (cm.digits_data.SPLITS): generators and a small classifier (seeded, a few seconds on
a CPU, cached) learn from the "train" half; the "reference" and "floor" quarters are seen by neither.
"digits-FID" is the Frechet distance between classifier features of generated images and of the reference
quarter; the floor quarter scored the same way is the real-data floor. Coverage is exp(entropy of the
predicted-class histogram) / 10: 1 when all ten digits are equally frequent, 0.1 when only one digit appears.
A nearest-neighbour check (memorisation_check) tells new digits from copies of the training half.
"""

import math
import os
import weakref

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint_io import atomic_save
from .digits_data import digits_arrays
from .image_util import from_uint8

CACHE_VERSION = 2  # 2: trained on the "train" half of cm.digits_data.SPLITS
COPY_QUANTILE = 0.05  # memorisation_check: a "copy" is nearer the training half than 95% of held-out digits are


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

        images = from_uint8(images)
    gray = images.float().mean(dim=1, keepdim=True)
    if gray.shape[-1] != 8:
        gray = F.interpolate(gray, size=8, mode="area")
    return ((gray + 1) / 2).clamp(0, 1).flatten(1)


def digits_split(split, image_size=8):
    """Images in [-1, 1] (N, 3, S, S) and labels of one split ("train", "reference" or "floor")."""

    images, labels = digits_arrays(image_size, split)
    return from_uint8(images), torch.from_numpy(labels)


def train_digits_classifier(steps=1500, seed=0):
    """Fit the classifier on the training half (full-batch Adam, seeded)."""
    g = torch.Generator().manual_seed(seed)
    x, y = digits_split("train")
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
        atomic_save(model.state_dict(), path)
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


_REFERENCE_FEATURES = weakref.WeakKeyDictionary()  # classifier -> {image size: features of the reference split}


def _reference_features(classifier, image_size):
    """Classifier features of the reference split at image_size, computed once per (classifier, size)."""
    per_size = _REFERENCE_FEATURES.setdefault(classifier, {})
    if image_size not in per_size:
        reference_x, _ = digits_split("reference", image_size)
        per_size[image_size], _ = classifier_outputs(reference_x, classifier)
    return per_size[image_size]


def per_class_accuracy(classes, labels, num_classes=10):
    """Per class c: the share of the images labelled c that the classifier reads as c (NaN where none is)."""
    labels = np.asarray(labels)
    return [float((classes[labels == c] == c).mean()) if (labels == c).any() else float("nan")
            for c in range(num_classes)]


def digits_metrics(samples, classifier=None, labels=None):
    """digits-FID of samples against the reference split at the samples' resolution, coverage, class histogram;
    given the labels the samples were asked for (class-conditional samples), also the per-class accuracy (the
    share of class-c samples the classifier reads as c) and its mean over the classes, label_accuracy.

    The reference split's features are cached per (classifier, size): a classifier must not change after use.
    """
    from evaluations.metrics import frechet_distance

    classifier = classifier or load_digits_classifier()
    ref_feats = _reference_features(classifier, _image_size(samples))
    feats, classes = classifier_outputs(samples, classifier)
    metrics = {
        "digits_fid": float(frechet_distance(feats, ref_feats)),
        "coverage": coverage(classes),
        "class_histogram": np.bincount(classes, minlength=10).tolist(),
    }
    if labels is not None:
        per_class = per_class_accuracy(classes, labels)
        metrics.update(per_class_accuracy=per_class, label_accuracy=float(np.nanmean(per_class)))
    return metrics


def real_data_floor(image_size=8, classifier=None):
    """digits_metrics and memorisation_check of the floor split at image_size: what new real digits score (the
    check leaves each floor digit out of the held-out digits it is compared with)."""
    floor_x, floor_y = digits_split("floor", image_size)
    num_reference = len(digits_split("reference", image_size)[0])
    own_index = num_reference + torch.arange(len(floor_x))  # each floor digit's place among the held-out ones
    return {**digits_metrics(floor_x, classifier, floor_y), **memorisation_check(floor_x, skip=own_index)}


def real_digits_spread(image_size=8, classifier=None, splits=200, seed=0):
    """What new real digits score against each other: the digits-FID between the reference and floor splits pooled
    and cut at random into two sets of their sizes, `splits` times (seeded).

    Returns the scores' mean, standard deviation, median, 10th and 90th percentiles, and floor_percentile, the share
    (in %) of random splits that score below the fixed one real_data_floor reports.
    """
    from evaluations.metrics import frechet_distance

    classifier = classifier or load_digits_classifier()
    reference, _ = digits_split("reference", image_size)
    floor, _ = digits_split("floor", image_size)
    feats, _ = classifier_outputs(torch.cat([reference, floor]), classifier)
    cut, g = len(reference), torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(splits):
        order = torch.randperm(len(feats), generator=g).numpy()
        scores.append(float(frechet_distance(feats[order[cut:]], feats[order[:cut]])))
    scores = np.array(scores)
    fixed = float(frechet_distance(feats[cut:], feats[:cut]))
    p10, median, p90 = np.percentile(scores, [10, 50, 90])
    return {"mean": float(scores.mean()), "sd": float(scores.std()), "median": float(median), "p10": float(p10),
            "p90": float(p90), "floor_percentile": float(100 * (scores < fixed).mean())}


def nearest_distances(queries, references, skip=None):
    """Euclidean distance from each row of queries to its nearest row of references; skip[i]: a reference
    index that query i may not use (itself)."""
    distances = torch.cdist(queries.double(), references.double(), compute_mode="donot_use_mm_for_euclid_dist")
    if skip is not None:
        distances[torch.arange(len(queries)), skip] = float("inf")
    return distances.min(dim=1).values


def memorisation_check(samples, skip=None):
    """Nearest-neighbour memorisation check, on the classifier's 8x8 grayscale inputs (pixels in [0, 1]).

    nearest_is_train: fraction of samples whose nearest real digit lies in the training half rather than the
        held-out half (reference and floor, as many digits): 0.5 for new digits, 1 for copies of training digits.
    copy_fraction: fraction of samples nearer a training digit than 95% of held-out digits are (COPY_QUANTILE):
        about 0.05 for new digits, 1 for copies.
    nn_distance: median distance of a sample to its nearest training digit (nn_distance_real: of a held-out one).
    skip: per sample, an index of the held-out digits to leave out (for held-out digits checked themselves).
    """
    size = _image_size(samples)
    train = to_classifier_inputs(digits_split("train", size)[0])
    held_out = torch.cat([to_classifier_inputs(digits_split(s, size)[0]) for s in ("reference", "floor")])
    real_to_train = nearest_distances(held_out, train)
    queries = to_classifier_inputs(samples)
    to_train = nearest_distances(queries, train)
    to_held_out = nearest_distances(queries, held_out, skip)
    threshold = torch.quantile(real_to_train, COPY_QUANTILE)
    return {
        "nearest_is_train": float((to_train < to_held_out).double().mean()),
        "copy_fraction": float((to_train < threshold).double().mean()),
        "nn_distance": float(to_train.median()),
        "nn_distance_real": float(real_to_train.median()),
    }


def classifier_accuracy(classifier=None):
    """Accuracy on the held-out digits (reference and floor splits)."""
    classifier = classifier or load_digits_classifier()
    held_out = [digits_split(s) for s in ("reference", "floor")]
    x, y = torch.cat([x for x, _ in held_out]), torch.cat([y for _, y in held_out])
    _, pred = classifier_outputs(x, classifier)
    return float((torch.from_numpy(pred) == y).float().mean())
