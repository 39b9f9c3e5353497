"""Sample-quality metrics on feature vectors, with the reference evaluator's definitions and math.

- FID / sFID (Heusel et al. 2017; sFID: Nash et al. 2021): Frechet distance between Gaussians fitted
  to two feature sets, with scipy's sqrtm, the 1e-6 diagonal fallback and the imaginary-part check.
- Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over splits of 5000.
- Improved precision and recall (Kynkaanniemi et al. 2019): k-NN (k = 3) hyperspheres around each
  set; squared distances are computed in float16 first and in float32 when that overflows, as the
  reference does. The distance blocks run in PyTorch (CPU or CUDA); a numpy version is kept as
  the reference computation to compare against.
"""

import warnings

import numpy as np
import scipy
import torch
from scipy import linalg

FID_METHODS = ("sqrtm", "eigh")
_SCIPY_VERSION = tuple(int(part) for part in scipy.__version__.split(".")[:2])


class InvalidFIDException(Exception):
    """Kept for the reference's public names; this package raises ValueError for bad statistics."""


def _check_features(features, name="features"):
    """A 2-D float array [N, D] with N >= 2, as numpy."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"{name} must be a 2-D array [N, D] with N >= 2, got shape {features.shape}")
    return features


def _matrix_sqrt(matrix):
    """scipy.linalg.sqrtm without printing or warning about singular input (the reference passes disp=False)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        if _SCIPY_VERSION >= (1, 16):
            return linalg.sqrtm(matrix)
        return linalg.sqrtm(matrix, disp=False)[0]


def _trace_sqrt_product_sqrtm(sigma1, sigma2, eps):
    """tr sqrtm(sigma1 sigma2) exactly as the reference (TTUR's fid.py): eps fallback, imaginary-part check."""
    covmean = _matrix_sqrt(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _matrix_sqrt((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1 sigma2)")
        covmean = covmean.real
    return np.trace(covmean)


def _trace_sqrt_product_eigh(sigma1, sigma2):
    """tr sqrtm(S1 S2) = sum_i sqrt(lambda_i(W^1/2 V^T S2 V W^1/2)) where S1 = V W V^T (PSD sigmas)."""
    w, v = np.linalg.eigh(sigma1)
    root_w = np.sqrt(np.clip(w, 0, None))
    inner = (v.T @ sigma2 @ v) * root_w[:, None] * root_w[None, :]
    lam = np.linalg.eigvalsh((inner + inner.T) / 2)
    return np.sqrt(np.clip(lam, 0, None)).sum()


class FIDStatistics:
    """Mean and covariance of a feature set; `frechet_distance` gives FID (pool_3) or sFID (spatial).

    :param mu: mean vector [D].
    :param sigma: covariance matrix [D, D].
    """

    def __init__(self, mu, sigma):
        self.mu = mu
        self.sigma = sigma

    @classmethod
    def from_features(cls, features):
        """mu = mean over samples, sigma = unbiased covariance (np.cov, rowvar=False), as the reference.

        :param features: array [N, D], N >= 2.
        :return: FIDStatistics.
        """
        features = _check_features(features)
        return cls(np.mean(features, axis=0), np.cov(features, rowvar=False))

    def frechet_distance(self, other, eps=1e-6, method="sqrtm"):
        """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrtm(S1 S2) (Heusel et al. 2017, Eq. 6).

        :param other: FIDStatistics of the other set.
        :param eps: diagonal offset tried when sqrtm of the product is not finite (reference: 1e-6).
        :param method: "sqrtm" (the reference: scipy.linalg.sqrtm) or "eigh" (same value in exact
            arithmetic via symmetric eigendecompositions; ~5x faster at D = 2048, not the reference's rounding).
        :return: the distance as a float.
        """
        if method not in FID_METHODS:
            raise ValueError(f"method must be one of {FID_METHODS}, got {method!r}")
        mu1, mu2 = np.atleast_1d(self.mu), np.atleast_1d(other.mu)
        sigma1, sigma2 = np.atleast_2d(self.sigma), np.atleast_2d(other.sigma)
        if mu1.shape != mu2.shape:
            raise ValueError(f"mean vectors have different lengths: {mu1.shape}, {mu2.shape}")
        if sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
            raise ValueError(f"covariances {sigma1.shape}, {sigma2.shape} do not match means of shape {mu1.shape}")
        diff = mu1 - mu2
        if method == "sqrtm":
            tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
        else:
            tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
        return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def compute_statistics(activations):
    """FIDStatistics of an activation array [N, D] (the reference's Evaluator.compute_statistics).

    :param activations: array [N, D], N >= 2.
    :return: FIDStatistics.
    """
    return FIDStatistics.from_features(activations)


def frechet_distance(feats_a, feats_b, eps=1e-6, method="sqrtm"):
    """Frechet distance between Gaussians fitted to two feature sets (FID when the features are pool_3).

    :param feats_a: array [N1, D].
    :param feats_b: array [N2, D].
    :param eps: see FIDStatistics.frechet_distance.
    :param method: "sqrtm" (reference) or "eigh"; see FIDStatistics.frechet_distance.
    :return: the distance as a float.
    """
    stats_a = FIDStatistics.from_features(_check_features(feats_a, "feats_a"))
    stats_b = FIDStatistics.from_features(_check_features(feats_b, "feats_b"))
    return stats_a.frechet_distance(stats_b, eps=eps, method=method)


def _softmax(logits):
    """Row-wise softmax, computed stably in the logits' dtype."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def compute_inception_score(preds, split_size=5000, from_logits=False):
    """IS = mean over splits of exp(mean_x sum_y p(y|x) (log p(y|x) - log p(y))) (Salimans et al. 2016).

    Same loop as the reference (improved-gan's splits of `split_size` consecutive rows); the term is
    taken as 0 where p(y|x) = 0, its limit, instead of the reference's nan.

    :param preds: class probabilities [N, C] (the Inception softmax), or logits with from_logits=True.
    :param split_size: rows per split; the reference uses 5000 whatever N is.
    :param from_logits: apply a softmax over classes first.
    :return: the score as a float, in [1, C].
    """
    preds = np.asarray(preds)
    if preds.ndim != 2 or len(preds) == 0:
        raise ValueError(f"preds must be a 2-D array [N, C], got shape {preds.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be positive, got {split_size}")
    if from_logits:
        preds = _softmax(preds)
    elif (preds < 0).any() or not np.allclose(preds.sum(axis=1), 1, atol=1e-3):
        raise ValueError("preds must be probabilities (rows >= 0 summing to 1); pass from_logits=True for logits")
    scores = []
    for start in range(0, len(preds), split_size):
        part = preds[start : start + split_size]
        marginal = np.expand_dims(np.mean(part, 0), 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0)
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def _pairwise_float32_numpy(u, v):
    """max(||u||^2 - 2 u.v + ||v||^2, 0) in float32."""
    norm_u = np.sum(np.square(u), 1).reshape(-1, 1)
    norm_v = np.sum(np.square(v), 1).reshape(1, -1)
    return np.maximum(norm_u - 2 * np.matmul(u, v.T) + norm_v, 0.0)


def _pairwise_float16_numpy(u, v):
    """The same formula with every op's result rounded to float16 (float32 accumulation), as TF's fp16 graph."""
    u = u.astype(np.float16).astype(np.float32)
    v = v.astype(np.float16).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        norm_u = np.square(u).astype(np.float16).astype(np.float32).sum(1).astype(np.float16).reshape(-1, 1)
        norm_v = np.square(v).astype(np.float16).astype(np.float32).sum(1).astype(np.float16).reshape(1, -1)
        dots = np.matmul(u, v.T).astype(np.float16)
        return np.maximum(norm_u - 2 * dots + norm_v, np.float16(0))


def batch_pairwise_distances(U, V, fp16=True):
    """Squared Euclidean distances [N1, N2] (the reference's DistanceBlock), in numpy.

    :param U: array [N1, D].
    :param V: array [N2, D].
    :param fp16: compute in float16 first and fall back to float32 when any value overflows (reference);
        False computes in float32 only.
    :return: float32 array [N1, N2].
    """
    U, V = np.asarray(U, dtype=np.float32), np.asarray(V, dtype=np.float32)
    if fp16:
        dist = _pairwise_float16_numpy(U, V)
        if np.isfinite(dist).all():
            return dist.astype(np.float32)
    return _pairwise_float32_numpy(U, V)


def _pairwise_float32_torch(u, v):
    """max(||u||^2 - 2 u.v + ||v||^2, 0) in float32, in torch."""
    norm_u = u.square().sum(1, keepdim=True)
    norm_v = v.square().sum(1).unsqueeze(0)
    dist = torch.addmm(norm_u, u, v.T, alpha=-2.0)
    return dist.add_(norm_v).clamp_(min=0)


def _pairwise_float16_torch(u, v):
    """Torch twin of _pairwise_float16_numpy: float32 products, each op's result rounded to float16."""
    half = torch.float16
    u, v = u.to(half).float(), v.to(half).float()
    norm_u = u.square().to(half).float().sum(1, keepdim=True).to(half)
    norm_v = v.square().to(half).float().sum(1).unsqueeze(0).to(half)
    dist = torch.mm(u, v.T).to(half)
    dist = norm_u - dist.mul_(2)
    return dist.add_(norm_v).clamp_(min=0)


def batch_pairwise_distances_torch(U, V, fp16=True):
    """Squared Euclidean distances [N1, N2] on U's device; same math as batch_pairwise_distances.

    :param U: float tensor [N1, D].
    :param V: float tensor [N2, D] on the same device.
    :param fp16: float16 first with float32 fallback on overflow (reference), or float32 only.
    :return: float32 tensor [N1, N2].
    """
    U, V = U.float(), V.float()
    if fp16:
        dist = _pairwise_float16_torch(U, V)
        if torch.isfinite(dist).all():
            return dist.float()
    return _pairwise_float32_torch(U, V)


class DistanceBlock:
    """Pairwise squared distances between feature batches (the reference's DistanceBlock, without TF).

    :param device: torch device for the torch backend ("cpu", "cuda", ...).
    :param fp16: float16 first, float32 on overflow (reference), or float32 only.
    :param backend: "torch" (CPU or CUDA) or "numpy" (the reference computation, CPU only).
    """

    def __init__(self, device="cpu", fp16=True, backend="torch"):
        if backend not in ("torch", "numpy"):
            raise ValueError(f"backend must be 'torch' or 'numpy', got {backend!r}")
        self.device = torch.device(device)
        self.fp16 = fp16
        self.backend = backend

    def to_tensor(self, array):
        """A float32 tensor on this block's device (numpy backend: CPU)."""
        device = self.device if self.backend == "torch" else "cpu"
        return torch.as_tensor(np.asarray(array, dtype=np.float32)).to(device)

    def distances(self, U, V):
        """Squared distances of two float32 tensors [N1, D], [N2, D] as a float32 tensor [N1, N2]."""
        if self.backend == "numpy":
            return torch.from_numpy(batch_pairwise_distances(U.cpu().numpy(), V.cpu().numpy(), self.fp16))
        return batch_pairwise_distances_torch(U, V, self.fp16)

    def pairwise_distances(self, U, V):
        """Squared distances of two arrays [N1, D], [N2, D] as a float32 numpy array [N1, N2]."""
        return self.distances(self.to_tensor(U), self.to_tensor(V)).cpu().numpy()

    def less_thans(self, batch_1, radii_1, batch_2, radii_2):
        """Which rows of each batch lie inside some hypersphere of the other: ([N1, K2], [N2, K1]) bool arrays.

        :param batch_1: array [N1, D].
        :param radii_1: squared radii [N1, K1] around batch_1.
        :param batch_2: array [N2, D].
        :param radii_2: squared radii [N2, K2] around batch_2.
        """
        dist = self.distances(self.to_tensor(batch_1), self.to_tensor(batch_2))
        inside_1, inside_2 = _inside(dist, self.to_tensor(radii_1), self.to_tensor(radii_2))
        return inside_1.cpu().numpy(), inside_2.cpu().numpy()


def _inside(dist, radii_1, radii_2):
    """From distances [N1, N2]: rows of set 1 within any radius of set 2 [N1, K2], and vice versa [N2, K1]."""
    inside_1 = torch.stack([(dist <= radii_2[:, k]).any(1) for k in range(radii_2.shape[1])], 1)
    inside_2 = torch.stack([(dist <= radii_1[:, k, None]).any(0) for k in range(radii_1.shape[1])], 1)
    return inside_1, inside_2


class ManifoldEstimator:
    """k-NN manifolds of feature sets for improved precision and recall (Kynkaanniemi et al. 2019).

    :param row_batch_size: rows per distance block (memory/speed trade-off; reference 10000).
    :param col_batch_size: columns per distance block (reference 10000).
    :param nhood_sizes: neighbourhood sizes k; the radius of a point is its distance to its k-th
        nearest other point (reference: (3,)).
    :param clamp_to_percentile: drop (radius 0) hyperspheres larger than this percentile; None keeps all.
    :param eps: added to distances in the realism score.
    :param device: torch device of the distance blocks.
    :param fp16: distances in float16 first, float32 on overflow (reference), or float32 only.
    :param backend: "torch" or "numpy" distance blocks (see DistanceBlock).
    """

    def __init__(self, row_batch_size=10000, col_batch_size=10000, nhood_sizes=(3,), clamp_to_percentile=None,
                 eps=1e-5, device="cpu", fp16=True, backend="torch"):
        if row_batch_size < 1 or col_batch_size < 1:
            raise ValueError("row_batch_size and col_batch_size must be positive")
        if not nhood_sizes or min(nhood_sizes) < 1:
            raise ValueError(f"nhood_sizes must be positive integers, got {nhood_sizes}")
        self.distance_block = DistanceBlock(device, fp16, backend)
        self.row_batch_size = row_batch_size
        self.col_batch_size = col_batch_size
        self.nhood_sizes = tuple(nhood_sizes)
        self.num_nhoods = len(nhood_sizes)
        self.clamp_to_percentile = clamp_to_percentile
        self.eps = eps

    def _row_distances(self, rows, cols):
        """Distances of a row block to every column, computed in column blocks: tensor [len(rows), len(cols)]."""
        step = self.col_batch_size
        starts = range(0, len(cols), step)
        blocks = [self.distance_block.distances(rows, cols[start : start + step]) for start in starts]
        return torch.cat(blocks, 1) if len(blocks) > 1 else blocks[0]

    def manifold_radii(self, features):
        """Squared distance of every point to its k-th nearest neighbour, for each k in nhood_sizes.

        :param features: array [N, D], N > max(nhood_sizes).
        :return: float32 array [N, len(nhood_sizes)].
        """
        features = _check_features(features)
        kmax = max(self.nhood_sizes)
        if len(features) <= kmax:
            raise ValueError(
                f"need more than {kmax} feature vectors for k = {kmax} nearest neighbours, got {len(features)}"
            )
        feats = self.distance_block.to_tensor(features)
        radii = np.zeros([len(feats), self.num_nhoods], dtype=np.float32)
        for start in range(0, len(feats), self.row_batch_size):
            dist = self._row_distances(feats[start : start + self.row_batch_size], feats)
            # the point itself is the 0-th neighbour
            nearest = torch.topk(dist, kmax + 1, dim=1, largest=False, sorted=True).values
            radii[start : start + len(dist)] = nearest[:, list(self.nhood_sizes)].cpu().numpy()
        if self.clamp_to_percentile is not None:
            max_distances = np.percentile(radii, self.clamp_to_percentile, axis=0)
            radii[radii > max_distances] = 0
        return radii

    def evaluate(self, features, radii, eval_features):
        """Whether each eval point lies in the manifold of `features`, plus realism scores (reference API).

        :param features: reference array [N, D].
        :param radii: its radii [N, K] from manifold_radii.
        :param eval_features: array [M, D] to test.
        :return: dict with fraction, batch_predictions [M, K], max_realisim_score [M], nearest_indices [M].
        """
        feats = self.distance_block.to_tensor(features)
        radii_t = self.distance_block.to_tensor(radii)
        evals = self.distance_block.to_tensor(eval_features)
        predictions, realism, nearest = [], [], []
        for start in range(0, len(evals), self.row_batch_size):
            dist = self._row_distances(evals[start : start + self.row_batch_size], feats)
            predictions.append((dist[:, :, None] <= radii_t[None]).any(1).int())
            realism.append((radii_t[None, :, 0] / (dist + self.eps)).max(1).values)
            nearest.append(dist.argmin(1).int())
        predictions = torch.cat(predictions).cpu().numpy()
        return {
            "fraction": float(np.mean(predictions)),
            "batch_predictions": predictions,
            "max_realisim_score": torch.cat(realism).cpu().numpy(),
            "nearest_indices": torch.cat(nearest).cpu().numpy(),
        }

    def evaluate_pr(self, features_1, radii_1, features_2, radii_2):
        """Precision = share of set 2 inside set 1's manifold; recall = share of set 1 inside set 2's manifold.

        The reference's argument order: (features_1, radii_1, features_2, radii_2).

        :param features_1: reference (real) features [N1, D].
        :param radii_1: radii [N1, K] of features_1 (manifold_radii); None computes them.
        :param features_2: sample (generated) features [N2, D].
        :param radii_2: radii [N2, K] of features_2; None computes them.
        :return: (precision, recall), float64 arrays with one value per neighbourhood size.
        """
        features_1, features_2 = _check_features(features_1, "features_1"), _check_features(features_2, "features_2")
        if features_1.shape[1] != features_2.shape[1]:
            raise ValueError(f"feature dimensions differ: {features_1.shape[1]} and {features_2.shape[1]}")
        radii_1 = self.manifold_radii(features_1) if radii_1 is None else radii_1
        radii_2 = self.manifold_radii(features_2) if radii_2 is None else radii_2
        block = self.distance_block
        feats_1, feats_2 = block.to_tensor(features_1), block.to_tensor(features_2)
        radii_1, radii_2 = block.to_tensor(radii_1), block.to_tensor(radii_2)
        status_1 = torch.zeros(len(feats_1), radii_2.shape[1], dtype=torch.bool, device=feats_1.device)
        status_2 = torch.zeros(len(feats_2), radii_1.shape[1], dtype=torch.bool, device=feats_1.device)
        for start_1 in range(0, len(feats_1), self.row_batch_size):
            rows = slice(start_1, start_1 + self.row_batch_size)
            for start_2 in range(0, len(feats_2), self.col_batch_size):
                cols = slice(start_2, start_2 + self.col_batch_size)
                dist = block.distances(feats_1[rows], feats_2[cols])
                inside_1, inside_2 = _inside(dist, radii_1[rows], radii_2[cols])
                status_1[rows] |= inside_1
                status_2[cols] |= inside_2
        precision = status_2.double().mean(0).cpu().numpy()
        recall = status_1.double().mean(0).cpu().numpy()
        return precision, recall


def compute_prec_recall(activations_ref, activations_sample, manifold_estimator=None):
    """Improved precision and recall (k = 3) of samples against a reference set, as floats.

    :param activations_ref: reference pool_3 features [N1, D].
    :param activations_sample: sample pool_3 features [N2, D].
    :param manifold_estimator: a ManifoldEstimator; None uses the reference's settings on CPU.
    :return: (precision, recall).
    """
    estimator = manifold_estimator or ManifoldEstimator()
    precision, recall = estimator.evaluate_pr(activations_ref, None, activations_sample, None)
    return float(precision[0]), float(recall[0])


def _stats_of(activations, stats, what):
    """Precomputed (pool, spatial) statistics, or those of the activations."""
    if stats is not None:
        return stats
    if activations is None:
        raise ValueError(f"need the {what} activations or precomputed {what} statistics")
    return tuple(FIDStatistics.from_features(acts) for acts in activations)


ALL_METRICS_STAGES = 5  # the stages compute_all_metrics announces


def compute_all_metrics(ref_activations, sample_activations, sample_probs=None, ref_stats=None,
                        manifold_estimator=None, split_size=5000, fid_method="sqrtm", sample_stats=None,
                        stage=None):
    """Inception Score, FID, sFID, precision and recall from two activation sets (the reference's main()).

    :param ref_activations: (pool [N1, 2048], spatial [N1, 2023]) of the reference batch, or None when
        ref_stats is given (precision and recall are then None).
    :param sample_activations: (pool [N2, 2048], spatial [N2, 2023]) of the samples, or None when
        sample_stats is given (precision and recall are then None).
    :param sample_probs: Inception softmax of the samples [N2, 1008] for IS; None leaves IS out (None).
    :param ref_stats: (pool FIDStatistics, spatial FIDStatistics or None) precomputed for the reference
        batch; None computes them from ref_activations. A None spatial part leaves sFID out (None).
    :param manifold_estimator: ManifoldEstimator for precision/recall; None uses the reference's settings on CPU.
    :param split_size: IS split size (reference 5000).
    :param fid_method: "sqrtm" (reference) or "eigh"; see FIDStatistics.frechet_distance.
    :param sample_stats: like ref_stats, for the samples (the reference reads them from the sample npz too).
    :param stage: callable taking the name of each stage as it starts (e.g. a progress bar), or None.
    :return: dict with inception_score, fid, sfid, precision, recall.
    """
    stage = stage or (lambda name: None)
    stage("statistics")
    ref_stats = _stats_of(ref_activations, ref_stats, "reference")
    sample_stats = _stats_of(sample_activations, sample_stats, "sample")
    metrics = {"inception_score": None}
    stage("inception score")
    if sample_probs is not None:
        metrics["inception_score"] = compute_inception_score(sample_probs, split_size)
    stage("fid")
    metrics["fid"] = sample_stats[0].frechet_distance(ref_stats[0], method=fid_method)
    metrics["sfid"] = None
    stage("sfid")
    if sample_stats[1] is not None and ref_stats[1] is not None:
        metrics["sfid"] = sample_stats[1].frechet_distance(ref_stats[1], method=fid_method)
    metrics["precision"] = metrics["recall"] = None
    stage("precision and recall")
    if ref_activations is not None and sample_activations is not None:
        metrics["precision"], metrics["recall"] = compute_prec_recall(
            ref_activations[0], sample_activations[0], manifold_estimator
        )
    return metrics
