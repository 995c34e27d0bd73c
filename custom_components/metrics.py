"""Post-processing and metrics of the BraTS21 / MSLUB / IXI evaluation protocol.

Volumes are numpy arrays (H, W, D), axial slices last. The residual is masked with the brain mask eroded per slice,
median filtered (3D, size 5, exactly scipy's: ``median``), thresholded at a Dice-optimal threshold found on a val
split, cleaned of tiny 3D components, and scored. A voxel is anomalous when ``residual > threshold`` in the residual's
precision (a float64 threshold rounds to float32, as numpy 1.x did for the published numbers); labels are ``> 0``
(BraTS 1, 2, 4 are all lesion); undefined metrics (empty denominator, one class, an empty Hausdorff side) are NaN.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi
from sklearn.metrics import average_precision_score, roc_auc_score

from custom_components.median import median_of_padded
from custom_components.utils import check_choice

DEFAULT_FPR_RATES = (0.01, 0.05, 0.10)
REGIONS = ("brain", "volume")
SMALL_COMPONENT_SIZE = 7  # 3D components of at most this many voxels are dropped (below 26: filled size = size)

_CROSS_2D = ndi.generate_binary_structure(2, 1)[:, :, None]  # 4-connected cross, in-plane only


def _volume(array, name: str, like: np.ndarray | None = None) -> np.ndarray:
    """``array`` as a 3D numpy array (of the shape of the residual ``like`` when given), or a clear error."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{name}: expected a 3D volume (H, W, D), got shape {array.shape}; squeeze the channel axis.")
    if like is not None and array.shape != like.shape:
        raise ValueError(f"residual / {name}: shapes differ, {like.shape} vs {array.shape}.")
    return array


def _above(values: np.ndarray, threshold: float) -> np.ndarray:
    """``values > threshold`` with the threshold cast to the values' floating precision."""
    return values > (values.dtype.type(threshold) if np.issubdtype(values.dtype, np.floating) else threshold)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


def erode_brain_mask(mask) -> np.ndarray:
    """``mask > 0`` eroded per axial slice, also from the border, by the 2D cross ``H // 25`` times (3 at 96x96; the
    reference used the second axis, square here); zero iterations leave it (scipy would erode until nothing is left)."""
    mask = _volume(mask, "brain_mask") > 0
    iterations = mask.shape[0] // 25
    return ndi.binary_erosion(mask, structure=_CROSS_2D, iterations=iterations) if iterations else mask.copy()


def postprocess_residual(residual, brain_mask, median_size: int = 5) -> np.ndarray:
    """Residual x eroded brain mask, then the 3D median filter; float32. Only the box of the nonzero masked residual
    widened by ``median_size // 2`` can be nonzero after it (other windows hold only zeros): only it is filtered."""
    residual = _volume(residual, "residual").astype(np.float32, copy=False)
    mask = _volume(brain_mask, "brain_mask", residual)
    if not np.isfinite(residual).all():
        raise ValueError("residual contains NaN or Inf values.")
    if median_size < 1 or median_size % 2 == 0:
        raise ValueError(f"postprocess_residual: median_size must be a positive odd number, got {median_size}.")
    masked = residual * erode_brain_mask(mask)
    out = np.zeros_like(masked)
    if not masked.any():
        return out
    half = median_size // 2
    box = ndi.find_objects((masked != 0).view(np.uint8))[0]
    box = tuple(slice(max(s.start - half, 0), min(s.stop + half, n)) for s, n in zip(box, masked.shape))
    window = tuple(slice(s.start, s.stop + 2 * half) for s in box)  # box +- half, in padded coordinates
    out[box] = median_of_padded(np.pad(masked, half, mode="symmetric")[window], median_size)
    return out


def residual_map(image, reconstruction, brain_mask, median_size: int = 5) -> np.ndarray:
    """The post-processed residual of one volume: |image - reconstruction|, then ``postprocess_residual``."""
    return postprocess_residual(np.abs(image - reconstruction).astype(np.float32), brain_mask, median_size)


def _flat(values, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``values`` and ``labels > 0`` as flat arrays of one length."""
    x, y = np.asarray(values).ravel(), np.asarray(labels).ravel() > 0
    if x.size != y.size:
        raise ValueError(f"{name}: {x.size} values but {y.size} labels.")
    return x, y


def find_best_threshold(residuals, labels, method: str = "bisection", steps: int = 10) -> tuple[float, float]:
    """Dice-optimal threshold on pooled voxels: ``(dice, threshold)``, prediction = residual > threshold.

    ``"bisection"``, the reference's search: from the range (0, max residual), ``steps`` times take the Dice at the 1/4
    and 3/4 points, keep the better half (lower on ties) and the best Dice and point (a later >= Dice replaces it); a
    range collapsed to p becomes (p, 1). ``"exact"``: the true optimum over the residual values (ties: the highest), or
    just below the smallest when predicting every voxel is best. No positive voxel: Dice NaN at the max residual.
    """
    x, y = _flat(residuals, labels, "find_best_threshold")
    if x.size == 0:
        raise ValueError("find_best_threshold: no voxels given.")
    check_choice("find_best_threshold: method", method, ("bisection", "exact"))
    x = x if x.dtype in (np.float32, np.float64) else x.astype(np.float64)
    positives = x[y]
    if method == "exact":
        return _exact(np.sort(x), np.sort(positives))
    if steps < 1:
        raise ValueError(f"find_best_threshold: steps must be >= 1, got {steps}.")

    def dice_at(point: float) -> float:
        n_pred = int(np.count_nonzero(_above(x, point)))
        return _ratio(2.0 * int(np.count_nonzero(_above(positives, point))), n_pred + positives.size)

    low, high, best_dice, best_point = 0.0, float(x.max()), 0.0, 0.0
    for _ in range(steps):
        if low == high:
            high = 1.0
        center, lower_point, upper_point = (low + (high - low) * f for f in (0.5, 0.25, 0.75))
        lower_dice, upper_dice = dice_at(lower_point), dice_at(upper_point)
        lower_wins = lower_dice >= upper_dice  # NaN compares False, as in the reference
        dice, point = (lower_dice, lower_point) if lower_wins else (upper_dice, upper_point)
        if dice >= best_dice:
            best_dice, best_point = dice, point
        low, high = (low, center) if lower_wins else (center, high)
    return best_dice, best_point


def _exact(voxels: np.ndarray, positives: np.ndarray) -> tuple[float, float]:
    """The best cut ``x >= u`` over the distinct positive values u (a lower cut only adds false positives) from the
    sorted voxels and positives, written ``x > t`` with t the largest voxel below u; ties go to the highest cut."""
    if not (np.isfinite(voxels[0]) and np.isfinite(voxels[-1])):  # NaN sorts last
        raise ValueError("find_best_threshold: residuals contain NaN or Inf values.")
    if positives.size == 0:
        return math.nan, float(voxels[-1])
    levels = np.unique(positives)
    below = np.searchsorted(voxels, levels)  # voxels under each cut
    dice = 2.0 * (positives.size - np.searchsorted(positives, levels)) / (voxels.size - below + positives.size)
    best = levels.size - 1 - int(np.argmax(dice[::-1]))
    threshold = np.nextafter(levels[best], levels.dtype.type(-np.inf)) if below[best] == 0 else voxels[below[best] - 1]
    return float(dice[best]), float(threshold)


def remove_small_components(binary) -> np.ndarray:
    """Drop 3D 26-connected components of at most ``SMALL_COMPONENT_SIZE`` voxels. The reference counts skimage's
    ``area_filled``; a hole needs a voxel's 26 neighbours in the component, so below 26 voxels the filled size is the
    size: one ``bincount``."""
    binary = _volume(binary, "binary") > 0
    labels, count = ndi.label(binary, structure=np.ones((3, 3, 3), dtype=bool))
    small = np.bincount(labels.ravel(), minlength=count + 1) <= SMALL_COMPONENT_SIZE
    small[0] = False  # the background
    return binary & ~small[labels]


def auroc_auprc(scores, labels) -> tuple[float, float]:
    """sklearn's ``roc_auc_score`` / ``average_precision_score`` of ``scores`` against ``labels > 0``; NaN where
    they are undefined (AUROC without both classes, AP without positives) instead of an error or a warning."""
    scores, labels = _flat(scores, labels, "auroc_auprc")
    if not labels.any():
        return math.nan, math.nan
    auprc = float(average_precision_score(labels, scores))
    return (math.nan if labels.all() else float(roc_auc_score(labels, scores))), auprc


def _inputs(residual, seg, brain_mask, region: str):
    """The checked residual, ``seg > 0``, ``brain_mask > 0`` and the voxels that count (``region``)."""
    residual = _volume(residual, "residual")
    seg = _volume(seg, "seg", residual) > 0
    mask = _volume(brain_mask, "brain_mask", residual) > 0
    if not mask.any():
        raise ValueError("brain_mask is empty: no brain voxel to score.")
    check_choice("region", region, REGIONS)
    return residual, seg, mask, mask if region == "brain" else np.ones_like(mask)


def _hausdorff(pred: np.ndarray, truth: np.ndarray) -> float:
    """Symmetric Hausdorff distance in voxels (MONAI, euclidean); NaN when either mask is empty."""
    if not pred.any() or not truth.any():
        return math.nan
    import torch
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        distance = compute_hausdorff_distance(torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None],
                                              include_background=True)
    return float(distance.item())


def segment(residual, threshold: float, region=None) -> np.ndarray:
    """The anomaly segmentation of a post-processed residual: ``residual > threshold`` without 3D components of
    <= 7 voxels, limited to ``region`` (a boolean volume) when given. Evaluation and inference both use it."""
    pred = remove_small_components(_above(_volume(residual, "residual"), threshold))
    return pred if region is None else pred & (np.asarray(region) > 0)


def threshold_metrics(residual, seg, brain_mask, threshold: float, region: str = "brain", hausdorff: bool = True
                      ) -> dict:
    """Metrics of ``segment(residual, threshold)``: dice, tpr, fpr, precision, recall, specificity, tp, fp, fn, tn and
    hausdorff (voxels; the slow one, skipped when False). ``region``: un-eroded ``brain_mask`` voxels or every voxel."""
    residual, seg, _, roi = _inputs(residual, seg, brain_mask, region)
    pred, truth = segment(residual, threshold, roi), seg & roi
    tp, n_pred, n_true = (int(np.count_nonzero(a)) for a in (pred & truth, pred, truth))
    fp, fn = n_pred - tp, n_true - tp
    tn = int(np.count_nonzero(roi)) - tp - fp - fn
    out = {"dice": _ratio(2.0 * tp, n_pred + n_true), "tpr": _ratio(tp, n_true), "fpr": _ratio(fp, fp + tn),
           "precision": _ratio(tp, n_pred), "recall": _ratio(tp, n_true), "specificity": _ratio(tn, tn + fp),
           "tp": tp, "fp": fp, "fn": fn, "tn": tn}
    if hausdorff:
        out["hausdorff"] = _hausdorff(pred, truth)
    return out


def volume_metrics(residual, seg, brain_mask, threshold: float, region: str = "brain") -> dict:
    """The protocol's per-volume metrics: ``threshold_metrics`` at ``threshold``; on ``region``'s voxels best_dice /
    best_threshold ("exact", no component removal), pixel auroc / auprc, slice_auroc / slice_auprc of the slice scores
    (mean residual in the brain; brainless slices left out for ``"brain"``, 0 for ``"volume"`` as the reference) vs
    "slice holds lesion"; volume_score (mean residual in the brain), lesion_voxels. NaN where a volume has no lesion."""
    residual, seg, mask, roi = _inputs(residual, seg, brain_mask, region)
    row = threshold_metrics(residual, seg, mask, threshold, region)
    values, labels = residual[roi], seg[roi]
    best_dice, best_threshold = find_best_threshold(values, labels, "exact")
    auroc, auprc = auroc_auprc(values, labels)
    voxels = mask.sum(axis=(0, 1))
    scores = np.where(mask, residual, 0).sum(axis=(0, 1), dtype=np.float64) / np.maximum(voxels, 1)
    keep = voxels > 0 if region == "brain" else slice(None)
    slice_auroc, slice_auprc = auroc_auprc(scores[keep], seg.any(axis=(0, 1))[keep])
    row.update(best_dice=best_dice, best_threshold=best_threshold, auroc=auroc, auprc=auprc, slice_auroc=slice_auroc,
               slice_auprc=slice_auprc, volume_score=float(residual[mask].mean(dtype=np.float64)),
               lesion_voxels=int(np.count_nonzero(seg)))
    return row


def thresholds_at_fpr(values, rates: Iterable[float] = DEFAULT_FPR_RATES) -> dict:
    """``{rate: t}``, t the smallest value with ``#(x > t) <= floor(rate * n)`` over the pooled healthy ``values``: the
    threshold the reference read off sklearn's ROC curve of all-healthy voxels."""
    values, rates = np.asarray(values).ravel(), list(rates)
    if values.size == 0:
        raise ValueError("thresholds_at_fpr: no healthy value to pool (empty brain masks?).")
    if not all(0.0 <= rate < 1.0 for rate in rates):
        raise ValueError(f"thresholds_at_fpr: rates must lie in [0, 1), got {rates}.")
    kths = [values.size - math.floor(rate * values.size + 1e-9) - 1 for rate in rates]  # floor: voxels allowed above
    return {rate: float(t) for rate, t in zip(rates, np.partition(values, kths)[kths])}


def summarize(rows: Sequence[Mapping]) -> dict:
    """``{metric: {"mean", "std" (population), "n"}}`` of every numeric column of ``rows`` (one dict per volume),
    ignoring NaN and infinite values; non-numeric columns (ids, paths) are left out."""
    import pandas as pd

    table = pd.DataFrame(list(rows)).select_dtypes("number").replace([np.inf, -np.inf], np.nan)
    return {str(key): {"mean": float(column.mean()), "std": float(column.std(ddof=0)), "n": int(column.count())}
            for key, column in table.items()}
