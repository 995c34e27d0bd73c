"""Post-processing and metrics of the BraTS21 / MSLUB / IXI evaluation protocol.

Volumes are numpy arrays (H, W, D) with the axial slices along the last axis. The residual map is
masked with the brain mask eroded per slice, median filtered (3D, size 5), thresholded at a
Dice-optimal threshold found on a validation split, cleaned of tiny 3D components, and scored.
Everything is vectorised; the 3D median filter is ``median.median_of_padded`` (exactly scipy's, faster).

Conventions shared by all functions:
- a voxel is predicted anomalous when ``residual > threshold``, compared in the residual's own
  precision (a float64 threshold is rounded to float32 for a float32 residual, as numpy 1.x's
  value-based casting did when the published numbers were computed);
- label volumes are binarised with ``> 0`` (BraTS labels 1, 2, 4 are all "lesion");
- undefined metrics (a rate with an empty denominator, AUROC with one class only, Hausdorff with
  an empty side) are NaN; ``summarize`` ignores NaN.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi
from sklearn.metrics import average_precision_score, roc_auc_score

from custom_components.median import median_of_padded

SMALL_COMPONENT_SIZE = 7  # 3D components of at most this many voxels (filled) are removed
DEFAULT_FPR_RATES = (0.01, 0.05, 0.10)
REGIONS = ("brain", "volume")

_CROSS_2D = ndi.generate_binary_structure(2, 1)[:, :, None]  # 4-connected cross, in-plane only
_FULL_3D = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------


def _volume(array, name: str) -> np.ndarray:
    """``array`` as a 3D numpy array, or a clear error."""
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(
            f"{name}: expected a 3D volume (H, W, D), got shape {array.shape}; squeeze the channel axis first."
        )
    return array


def _same_shape(reference: np.ndarray, other: np.ndarray, names: str) -> None:
    if reference.shape != other.shape:
        raise ValueError(f"{names}: shapes differ, {reference.shape} vs {other.shape}.")


def _above(values: np.ndarray, threshold: float) -> np.ndarray:
    """``values > threshold`` with the threshold cast to the values' floating precision."""
    if np.issubdtype(values.dtype, np.floating):
        return values > values.dtype.type(threshold)
    return values > threshold


def _dice_from_counts(tp: int, n_pred: int, n_true: int) -> float:
    """2 TP / (|prediction| + |truth|); NaN when both are empty."""
    denominator = n_pred + n_true
    return 2.0 * tp / denominator if denominator else math.nan


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else math.nan


# ----------------------------------------------------------------------------------------------
# brain mask erosion
# ----------------------------------------------------------------------------------------------


def erosion_iterations(height: int) -> int:
    """Erosion steps of the brain mask: ``H // 25`` (3 at 96x96, 7 at 192x192)."""
    return int(height) // 25


def erode_brain_mask(mask, iterations: int | None = None) -> np.ndarray:
    """Erode ``mask > 0`` per axial slice with the 4-connected 2D cross, ``H // 25`` times by default.

    Voxels outside the volume count as background, so the brain shrinks away from the slice border
    too. Zero iterations leave the mask unchanged (scipy would erode until nothing is left). The
    reference took the count from the second axis; the volumes here are square in-plane.
    """
    mask = _volume(mask, "brain_mask") > 0
    if iterations is None:
        iterations = erosion_iterations(mask.shape[0])
    if iterations < 0:
        raise ValueError(f"brain mask erosion: iterations must be >= 0, got {iterations}.")
    if iterations == 0:
        return mask.copy()
    return ndi.binary_erosion(mask, structure=_CROSS_2D, iterations=iterations)


def postprocess_residual(residual, brain_mask, median_size: int = 5) -> np.ndarray:
    """Residual x eroded brain mask, then the 3D median filter; float32 (H, W, D).

    Only the bounding box of the nonzero masked residual, widened by ``median_size // 2``, can be
    nonzero after the filter (any other window holds only zeros), so only that box is filtered.
    """
    residual = _volume(residual, "residual").astype(np.float32, copy=False)
    mask = _volume(brain_mask, "brain_mask")
    _same_shape(residual, mask, "residual / brain_mask")
    if not np.isfinite(residual).all():
        raise ValueError("residual contains NaN or Inf values.")
    if median_size < 1 or median_size % 2 == 0:
        raise ValueError(f"postprocess_residual: median_size must be a positive odd number, got {median_size}.")
    masked = residual * erode_brain_mask(mask)
    out = np.zeros_like(masked)
    nonzero = masked != 0
    if not nonzero.any():
        return out
    half = median_size // 2
    box = []
    for axis in range(3):
        present = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(present[0] - half, 0), min(present[-1] + 1 + half, masked.shape[axis])))
    padded = np.pad(masked, half, mode="symmetric")
    window = tuple(slice(s.start, s.stop + 2 * half) for s in box)  # box +- half, in padded coordinates
    out[tuple(box)] = median_of_padded(padded[window], median_size)
    return out


def residual_map(image, reconstruction, brain_mask, median_size: int = 5) -> np.ndarray:
    """The post-processed residual of one volume: |image - reconstruction|, then ``postprocess_residual``."""
    return postprocess_residual(np.abs(image - reconstruction).astype(np.float32), brain_mask, median_size)


# ----------------------------------------------------------------------------------------------
# threshold search
# ----------------------------------------------------------------------------------------------


def _flat(values, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``values`` and ``labels > 0`` as flat arrays of one length."""
    x, y = np.asarray(values).ravel(), np.asarray(labels).ravel() > 0
    if x.size != y.size:
        raise ValueError(f"{name}: {x.size} values but {y.size} labels.")
    return x, y


def _pooled(residuals, labels) -> tuple[np.ndarray, np.ndarray]:
    x, y = _flat(residuals, labels, "find_best_threshold")
    if x.size == 0:
        raise ValueError("find_best_threshold: no voxels given.")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    return x, y


def _bisection(x: np.ndarray, y: np.ndarray, steps: int) -> tuple[float, float]:
    """The reference's interval-halving search, step for step (see ``find_best_threshold``)."""
    positives = x[y]
    n_true = positives.size

    def dice_at(point: float) -> float:
        return _dice_from_counts(
            int(np.count_nonzero(_above(positives, point))), int(np.count_nonzero(_above(x, point))), n_true
        )

    low, high = 0.0, float(x.max())
    best_dice, best_point = 0.0, 0.0
    for _ in range(steps):
        if low == high:
            high = 1.0
        center = low + (high - low) * 0.5
        lower_point = low + (high - low) * 0.25
        upper_point = low + (high - low) * 0.75
        lower_dice, upper_dice = dice_at(lower_point), dice_at(upper_point)
        if lower_dice >= upper_dice:  # NaN compares False, as in the reference
            if lower_dice >= best_dice:
                best_dice, best_point = lower_dice, lower_point
            high = center
        else:
            if upper_dice >= best_dice:
                best_dice, best_point = upper_dice, upper_point
            low = center
    return best_dice, best_point


def _positive_levels(pos_sorted: np.ndarray, neg_sorted: np.ndarray):
    """Distinct positive values u (ascending) with #positives >= u and #negatives >= u."""
    levels, first = np.unique(pos_sorted, return_index=True)
    tp = pos_sorted.size - first
    fp = neg_sorted.size - np.searchsorted(neg_sorted, levels, side="left")
    return levels, tp, fp


def _threshold_below(level: np.generic, pos_sorted: np.ndarray, neg_sorted: np.ndarray) -> float:
    """Threshold t with ``x > t`` <=> ``x >= level``: the largest value below ``level``.

    Looked up in the sorted arrays; just below ``level`` when nothing is smaller (every voxel is predicted).
    """
    found = None
    for array in (pos_sorted, neg_sorted):
        i = int(np.searchsorted(array, level, side="left"))
        if i > 0 and (found is None or array[i - 1] > found):
            found = array[i - 1]
    if found is None:
        found = np.nextafter(level, type(level)(-np.inf))
    return float(found)


def find_best_threshold(residuals, labels, method: str = "bisection", steps: int = 10) -> tuple[float, float]:
    """Dice-optimal threshold on pooled voxels: returns ``(dice, threshold)``, prediction = residual > threshold.

    ``"bisection"`` is the reference's search, kept for comparability: start with the range
    (0, max residual); at each of ``steps`` steps evaluate the Dice at the 1/4 and 3/4 points of the
    range, keep the better half (the lower half when they tie), and remember the best Dice and its
    point (a later point replaces it when its Dice is >=); a range that collapsed to a point p
    becomes (p, 1).
    ``"exact"`` returns the true optimum over all distinct residual values (ties: the highest
    threshold); the threshold is a residual value, or just below the smallest one when predicting
    every voxel is best. With no positive voxel the Dice is NaN (threshold = max residual).
    """
    x, y = _pooled(residuals, labels)
    if method == "bisection":
        if steps < 1:
            raise ValueError(f"find_best_threshold: steps must be >= 1, got {steps}.")
        return _bisection(x, y, steps)
    if method == "exact":
        return _exact(x, y)
    raise ValueError(f"find_best_threshold: method must be 'bisection' or 'exact', got {method!r}.")


def _exact(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Dice-optimal threshold over all distinct residual values (prediction = x > threshold).

    The candidates are the cuts ``x >= u`` at the distinct positive values u (lowering a cut below a positive value
    only adds false positives), scored from the sorted positives and negatives; ties go to the highest cut.
    """
    high = x.max()
    if not (np.isfinite(x.min()) and np.isfinite(high)):
        raise ValueError("find_best_threshold: residuals contain NaN or Inf values.")
    pos_sorted, neg_sorted = np.sort(x[y]), np.sort(x[~y])
    if pos_sorted.size == 0:
        return math.nan, float(high)
    levels, tp, fp = _positive_levels(pos_sorted, neg_sorted)
    dice = 2.0 * tp / (tp + fp + pos_sorted.size)
    best = levels.size - 1 - int(np.argmax(dice[::-1]))
    return float(dice[best]), _threshold_below(levels[best], pos_sorted, neg_sorted)


# ----------------------------------------------------------------------------------------------
# connected components
# ----------------------------------------------------------------------------------------------


def remove_small_components(binary, max_size: int = SMALL_COMPONENT_SIZE) -> np.ndarray:
    """Drop 3D 26-connected components of at most ``max_size`` voxels (0 to 25).

    The reference counts skimage's ``area_filled`` (holes filled); a hole needs all 26 neighbours of a voxel inside
    the component, so below 26 voxels the filled size is the size and one ``bincount`` decides.
    """
    if not 0 <= max_size < 26:
        raise ValueError(f"remove_small_components: max_size must lie in [0, 25], got {max_size}.")
    binary = _volume(binary, "binary") > 0
    labels, count = ndi.label(binary, structure=_FULL_3D)
    small = np.bincount(labels.ravel(), minlength=count + 1) <= max_size
    small[0] = False  # the background
    return binary & ~small[labels]


# ----------------------------------------------------------------------------------------------
# ranking metrics
# ----------------------------------------------------------------------------------------------


def auroc_auprc(scores, labels) -> tuple[float, float]:
    """sklearn's ``roc_auc_score`` / ``average_precision_score`` of ``scores`` against ``labels > 0``; NaN where
    they are undefined (AUROC without both classes, AP without positives) instead of an error or a warning."""
    scores, labels = _flat(scores, labels, "auroc_auprc")
    if not labels.any():
        return math.nan, math.nan
    auprc = float(average_precision_score(labels, scores))
    return (math.nan if labels.all() else float(roc_auc_score(labels, scores))), auprc


# ----------------------------------------------------------------------------------------------
# per-volume metrics
# ----------------------------------------------------------------------------------------------


def slice_scores(residual, brain_mask) -> np.ndarray:
    """Mean residual inside the brain for every axial slice (last axis); NaN where a slice has no brain."""
    residual = _volume(residual, "residual")
    mask = _volume(brain_mask, "brain_mask") > 0
    _same_shape(residual, mask, "residual / brain_mask")
    voxels = mask.sum(axis=(0, 1))
    sums = np.where(mask, residual, 0).sum(axis=(0, 1), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(voxels > 0, sums / np.maximum(voxels, 1), np.nan)


def _region(mask: np.ndarray, region: str) -> np.ndarray:
    if region == "brain":
        return mask
    if region == "volume":
        return np.ones_like(mask)
    raise ValueError(f"region must be one of {REGIONS}, got {region!r}.")


def _inputs(residual, seg, brain_mask, region: str):
    residual = _volume(residual, "residual")
    seg = _volume(seg, "seg") > 0
    mask = _volume(brain_mask, "brain_mask") > 0
    _same_shape(residual, seg, "residual / seg")
    _same_shape(residual, mask, "residual / brain_mask")
    if not mask.any():
        raise ValueError("brain_mask is empty: no brain voxel to score.")
    return residual, seg, mask, _region(mask, region)


def _hausdorff(pred: np.ndarray, truth: np.ndarray) -> float:
    """Symmetric Hausdorff distance in voxels (MONAI, euclidean); NaN when either mask is empty."""
    if not pred.any() or not truth.any():
        return math.nan
    import torch
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        distance = compute_hausdorff_distance(
            torch.from_numpy(pred)[None, None], torch.from_numpy(truth)[None, None], include_background=True
        )
    return float(distance.item())


def segment(residual, threshold: float, region=None) -> np.ndarray:
    """The anomaly segmentation of a post-processed residual: ``residual > threshold`` without 3D components of
    <= 7 voxels, limited to ``region`` (a boolean volume) when given. Evaluation and inference both use it."""
    pred = remove_small_components(_above(_volume(residual, "residual"), threshold))
    return pred if region is None else pred & (np.asarray(region) > 0)


def threshold_metrics(residual, seg, brain_mask, threshold: float, region: str = "brain", hausdorff: bool = True) -> dict:
    """Metrics of the segmentation ``residual > threshold`` after removing components of <= 7 voxels.

    ``region="brain"`` (default) counts only voxels inside ``brain_mask`` (the un-eroded mask), so
    FPR and specificity are about brain tissue; ``"volume"`` counts every voxel like the reference
    implementation. FPR is FP / (FP + TN). Hausdorff is in voxels. Returns dice, tpr, fpr,
    precision, recall, specificity, the counts tp, fp, fn, tn and, unless ``hausdorff`` is False (it is
    the slow one), hausdorff.
    """
    residual, seg, _, roi = _inputs(residual, seg, brain_mask, region)
    pred = segment(residual, threshold, roi)
    truth = seg & roi
    tp = int(np.count_nonzero(pred & truth))
    n_pred, n_true, n_roi = int(np.count_nonzero(pred)), int(np.count_nonzero(truth)), int(np.count_nonzero(roi))
    fp, fn = n_pred - tp, n_true - tp
    tn = n_roi - tp - fp - fn
    out = {
        "dice": _dice_from_counts(tp, n_pred, n_true),
        "tpr": _ratio(tp, n_true),
        "fpr": _ratio(fp, fp + tn),
        "precision": _ratio(tp, n_pred),
        "recall": _ratio(tp, n_true),
        "specificity": _ratio(tn, tn + fp),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }
    if hausdorff:
        out["hausdorff"] = _hausdorff(pred, truth)
    return out


def volume_metrics(residual, seg, brain_mask, threshold: float, region: str = "brain") -> dict:
    """All per-volume metrics of the protocol for a post-processed residual (see ``postprocess_residual``).

    ``threshold_metrics`` at ``threshold``, plus threshold-free scores on the voxels of ``region``:
    best_dice / best_threshold (the "exact" ``find_best_threshold`` on this volume alone, without component
    removal), pixel auroc / auprc,
    slice_auroc / slice_auprc of the slice scores (``slice_scores``) against "slice holds lesion",
    volume_score (mean residual in the brain) and lesion_voxels. With ``region="brain"`` slices
    without brain are left out of the slice metrics; with ``"volume"`` they score 0 like in the
    reference. Healthy volumes (empty ``seg``) give NaN wherever a lesion is needed.
    """
    residual, seg, mask, roi = _inputs(residual, seg, brain_mask, region)
    row = threshold_metrics(residual, seg, mask, threshold, region)

    values, labels = residual[roi], seg[roi]
    best_dice, best_threshold = find_best_threshold(values, labels, "exact")
    auroc, auprc = auroc_auprc(values, labels)

    scores = slice_scores(residual, mask)
    slice_labels = seg.any(axis=(0, 1))
    if region == "brain":
        keep = ~np.isnan(scores)
        scores, slice_labels = scores[keep], slice_labels[keep]
    else:
        scores = np.nan_to_num(scores, nan=0.0)
    slice_auroc, slice_auprc = auroc_auprc(scores, slice_labels)

    brain_values = residual[mask]
    row.update(
        best_dice=best_dice,
        best_threshold=best_threshold,
        auroc=auroc,
        auprc=auprc,
        slice_auroc=slice_auroc,
        slice_auprc=slice_auprc,
        volume_score=float(brain_values.mean(dtype=np.float64)) if brain_values.size else math.nan,
        lesion_voxels=int(np.count_nonzero(seg)),
    )
    return row


# ----------------------------------------------------------------------------------------------
# healthy-data thresholds and summaries
# ----------------------------------------------------------------------------------------------


def thresholds_at_fpr(values, rates: Iterable[float] = DEFAULT_FPR_RATES) -> dict:
    """Thresholds t with at most ``rate`` of the pooled healthy ``values`` above t: ``{rate: t}``.

    t is the smallest value that keeps ``#(x > t) <= floor(rate * n)``, i.e. the (n - floor(rate n))-th smallest
    value: the same threshold the reference read off sklearn's ROC curve of all-healthy voxels.
    """
    values = np.asarray(values).ravel()
    n = values.size
    if n == 0:
        raise ValueError("thresholds_at_fpr: no healthy value to pool (empty brain masks?).")
    out = {}
    for rate in rates:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"thresholds_at_fpr: rates must lie in [0, 1), got {rate}.")
        allowed = math.floor(rate * n + 1e-9)  # voxels that may lie above the threshold
        kth = n - allowed - 1
        out[rate] = float(np.partition(values, kth)[kth])
    return out


def summarize(rows: Sequence[Mapping]) -> dict:
    """``{metric: {"mean", "std" (population), "n"}}`` of every numeric column of ``rows`` (one dict per volume),
    ignoring NaN and infinite values; non-numeric columns (ids, paths) are left out."""
    import pandas as pd

    table = pd.DataFrame(list(rows)).select_dtypes("number").replace([np.inf, -np.inf], np.nan)
    return {str(key): {"mean": float(column.mean()), "std": float(column.std(ddof=0)), "n": int(column.count())}
            for key, column in table.items()}
