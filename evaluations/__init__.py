"""Sample-quality evaluation without TensorFlow: FID, sFID, Inception Score, precision and recall.

`evaluations.evaluator` is the command-line tool and keeps the reference's public names;
`evaluations.metrics` holds the math on feature arrays; `evaluations.inception` the FID Inception-v3.
"""

from evaluations.metrics import (
    DistanceBlock,
    FIDStatistics,
    ManifoldEstimator,
    compute_all_metrics,
    compute_inception_score,
    compute_prec_recall,
    compute_statistics,
    frechet_distance,
)

__all__ = [
    "DistanceBlock",
    "FIDStatistics",
    "ManifoldEstimator",
    "compute_all_metrics",
    "compute_inception_score",
    "compute_prec_recall",
    "compute_statistics",
    "frechet_distance",
]
