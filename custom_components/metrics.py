"""Post-processing and metrics of the BraTS21 / MSLUB / IXI evaluation protocol.

Volumes are numpy arrays (H, W, D) with the axial slices along the last axis. The residual map is
masked with the brain mask eroded per slice, median filtered (3D, size 5), thresholded at a
Dice-optimal threshold found on a validation split, cleaned of tiny 3D components, and scored.
Everything is vectorised; the 3D median filter is a sorting network over whole arrays that gives
exactly ``scipy.ndimage.median_filter`` (mode ``"reflect"``) several times faster.

Conventions shared by all functions:
- a voxel is predicted anomalous when ``residual > threshold``, compared in the residual's own
  precision (a float64 threshold is rounded to float32 for a float32 residual, as numpy 1.x's
  value-based casting did when the published numbers were computed);
- label volumes are binarised with ``> 0`` (BraTS labels 1, 2, 4 are all "lesion");
- undefined metrics (a rate with an empty denominator, AUROC with one class only, Hausdorff with
  an empty side) are NaN; ``summarize`` ignores NaN.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi

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


# ----------------------------------------------------------------------------------------------
# exact 3D median filter as a sorting network over whole arrays
# ----------------------------------------------------------------------------------------------
#
# A k x k x k median is computed by merging sorted lists, each merge an odd-even merging network
# of min/max operations applied to whole arrays at once. Sorted runs along z (k values), then
# along y (k*k values), are built once per position and shared by every window that contains
# them. Along x, two neighbouring outputs share their k-1 middle columns: that sorted core is
# built once per pair of outputs (every second row), and each output then only selects its rank
# from the core and its own extra column. Operations whose results do not reach the selected
# rank are pruned. Min/max return one of their inputs, so the result is exactly the median that
# scipy returns.


class _Network:
    """A program of whole-array ``min`` / ``max`` operations in single-assignment form."""

    def __init__(self) -> None:
        self.ops: list[tuple] = []

    def add(self, *op) -> int:
        self.ops.append(op)
        return len(self.ops) - 1

    def shifted(self, wires: Sequence[int], how: tuple) -> list[int]:
        return [self.add("load", wire, how) for wire in wires]

    def merge(self, a: Sequence[int], b: Sequence[int]) -> list[int]:
        """Batcher's odd-even merge of two sorted wire lists (any lengths)."""
        if not a or not b:
            return list(a) + list(b)
        if len(a) == 1 and len(b) == 1:
            return [self.add("min", a[0], b[0]), self.add("max", a[0], b[0])]
        even = self.merge(a[0::2], b[0::2])
        odd = self.merge(a[1::2], b[1::2])
        out, i = [even[0]], 0
        while i + 1 < len(even) and i < len(odd):
            out += [self.add("min", even[i + 1], odd[i]), self.add("max", even[i + 1], odd[i])]
            i += 1
        return out + even[i + 1 :] + odd[i:]

    def select(self, a: Sequence[int], b: Sequence[int], rank: int) -> int:
        """Element ``rank`` (0-based) of the union of sorted ``a`` and ``b``.

        It is min over i + j = rank + 1 of max(a[i - 1], b[j - 1]), where a[-1] = b[-1] = -inf.
        """
        terms = []
        for j in range(max(0, rank + 1 - len(a)), min(len(b), rank + 1) + 1):
            i = rank + 1 - j
            if i == 0:
                terms.append(b[j - 1])
            elif j == 0:
                terms.append(a[i - 1])
            else:
                terms.append(self.add("max", a[i - 1], b[j - 1]))
        out = terms[0]
        for term in terms[1:]:
            out = self.add("min", out, term)
        return out


def _split(length: int) -> int:
    """Largest power of two below ``length``: runs are built from power-of-two halves."""
    half = 1
    while half * 2 < length:
        half *= 2
    return half


@functools.lru_cache(maxsize=None)
def _median_program(size: int) -> tuple[list, int, int]:
    """The pruned network for an odd ``size``: (ops with the wires they free, even output, odd output)."""
    net = _Network()
    source = net.add("input")
    runs: dict = {}

    def flat_run(length: int, axis: str, base: list[int]) -> list[int]:
        # sorted values of ``length`` consecutive positions along z or y
        if (axis, length) not in runs:
            if length == 1:
                runs[axis, length] = base
            else:
                half = _split(length)
                lower = flat_run(half, axis, base)
                upper = net.shifted(flat_run(length - half, axis, base), ("flat", axis, half))
                runs[axis, length] = net.merge(lower, upper)
        return runs[axis, length]

    columns = flat_run(size, "y", flat_run(size, "z", [source]))  # size**2 sorted wires
    by_parity = {parity: net.shifted(columns, ("rows0", parity)) for parity in (0, 1)}

    def row_run(length: int, parity: int) -> list[int]:
        # sorted values of ``length`` consecutive x-rows starting at rows of the given parity
        if ("x", length, parity) not in runs:
            if length == 1:
                runs["x", length, parity] = by_parity[parity]
            else:
                half = _split(length)
                lower = row_run(half, parity)
                upper = row_run(length - half, (parity + half) % 2)
                upper = net.shifted(upper, ("rows", (parity + half) // 2))
                runs["x", length, parity] = net.merge(lower, upper)
        return runs["x", length, parity]

    rank = size**3 // 2
    core = row_run(size - 1, 1)  # rows 2t+1 .. 2t+size-1, shared by outputs 2t and 2t+1
    even = net.select(core, by_parity[0], rank)  # extra row 2t
    odd = net.select(core, net.shifted(by_parity[1], ("rows", (size - 1) // 2)), rank)  # extra row 2t+size

    needed = {even, odd}
    for index in range(len(net.ops) - 1, -1, -1):
        if index in needed:
            needed.update(arg for arg in net.ops[index][1:3] if isinstance(arg, int))
    kept = sorted(needed)
    last_use = {}
    for index in kept:
        for arg in net.ops[index][1:3]:
            if isinstance(arg, int):
                last_use[arg] = index
    program = []
    for index in kept:
        op = net.ops[index]
        freed = [arg for arg in set(op[1:3]) if isinstance(arg, int) and last_use[arg] == index]
        program.append((index, op, freed))
    return program, even, odd


def _median_block(block: np.ndarray, size: int) -> np.ndarray:
    """Median of every ``size``-cube of ``block`` (R, Yp, Zp), R = 2T + size - 1 -> (2T, Yp-size+1, Zp-size+1)."""
    program, even, odd = _median_program(size)
    rows, yp, zp = block.shape
    pairs = (rows - size + 1) // 2
    row_len, y_step = yp * zp, zp
    flat = np.zeros(rows * row_len + (size - 1) * (y_step + 1), dtype=block.dtype)
    flat[: rows * row_len] = block.reshape(-1)
    values: dict[int, np.ndarray] = {}
    for index, op, freed in program:
        kind = op[0]
        if kind == "input":
            value = flat
        elif kind == "load":
            source, how = values[op[1]], op[2]
            if how[0] == "flat":
                value = source[how[2] * (1 if how[1] == "z" else y_step) :]
            elif how[0] == "rows0":
                value = source[: rows * row_len].reshape(rows, row_len)[how[1] :: 2]
            else:
                value = source[how[1] :]
        else:
            x, y = values[op[1]], values[op[2]]
            n = min(len(x), len(y))
            value = np.minimum(x[:n], y[:n]) if kind == "min" else np.maximum(x[:n], y[:n])
        values[index] = value
        for wire in freed:
            del values[wire]
    out = np.empty((pairs, 2, row_len), dtype=block.dtype)
    out[:, 0] = values[even][:pairs]
    out[:, 1] = values[odd][:pairs]
    return out.reshape(2 * pairs, yp, zp)[:, : yp - size + 1, : zp - size + 1]


def _median_of_padded(padded: np.ndarray, size: int, chunk_elements: int = 160_000) -> np.ndarray:
    """Median filter of an array already padded by ``size // 2`` on every side (valid part only)."""
    out_shape = tuple(n - size + 1 for n in padded.shape)
    if size == 1:
        return padded.copy()
    out = np.empty(out_shape, dtype=padded.dtype)
    row_len = padded.shape[1] * padded.shape[2]
    chunk = max(2, 2 * ((chunk_elements // row_len) // 2))
    for x0 in range(0, out_shape[0], chunk):
        n = min(chunk, out_shape[0] - x0)
        rows = 2 * ((n + 1) // 2) + size - 1
        block = padded[x0 : x0 + rows]
        if block.shape[0] < rows:  # odd tail: one extra row, its output is dropped
            filler = np.zeros((rows - block.shape[0],) + block.shape[1:], dtype=block.dtype)
            block = np.concatenate([block, filler])
        out[x0 : x0 + n] = _median_block(np.ascontiguousarray(block), size)[:n]
    return out


def median_filter_3d(volume, size: int = 5) -> np.ndarray:
    """Median over ``size``-cubes, equal to ``scipy.ndimage.median_filter(volume, size=size)``.

    Same boundary handling as scipy's default (mode ``"reflect"``: d c b a | a b c d), same dtype.
    ``size`` must be odd; values must be finite (NaN has no defined rank).
    """
    volume = _volume(volume, "median_filter_3d")
    if size < 1 or size % 2 == 0:
        raise ValueError(f"median_filter_3d: size must be a positive odd number, got {size}.")
    half = size // 2
    return _median_of_padded(np.pad(volume, half, mode="symmetric"), size)


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
    out[tuple(box)] = _median_of_padded(padded[window], median_size)
    return out


# ----------------------------------------------------------------------------------------------
# threshold search
# ----------------------------------------------------------------------------------------------


def _pooled(residuals, labels) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(residuals).ravel()
    y = np.asarray(labels).ravel() > 0
    if x.size != y.size:
        raise ValueError(f"find_best_threshold: {x.size} residual values but {y.size} labels.")
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
    """Distinct positive values u (ascending) with #positives >= u, #negatives >= u and #positives == u."""
    levels, first, counts = np.unique(pos_sorted, return_index=True, return_counts=True)
    tp = pos_sorted.size - first
    fp = neg_sorted.size - np.searchsorted(neg_sorted, levels, side="left")
    return levels, tp, fp, counts


def _best_cut(pos_sorted: np.ndarray, neg_sorted: np.ndarray, n_true: int) -> tuple[float, np.generic]:
    """Dice-optimal prediction ``x >= u`` over the distinct positive values u: (dice, u).

    Lowering the cut below a positive value only adds false positives, so these cuts are all the
    candidates. Ties go to the highest cut (fewest predicted voxels).
    """
    levels, tp, fp, _ = _positive_levels(pos_sorted, neg_sorted)
    dice = 2.0 * tp / (tp + fp + n_true)
    best = levels.size - 1 - int(np.argmax(dice[::-1]))
    return float(dice[best]), levels[best]


def _threshold_below(level: np.generic, pos_sorted: np.ndarray, neg_sorted: np.ndarray, rest=None) -> float:
    """Threshold t with ``x > t`` <=> ``x >= level``: the largest value below ``level``.

    Looked up in the sorted arrays, then in ``rest`` (values left out of them) if given; just
    below ``level`` when nothing is smaller (every voxel is predicted).
    """
    found = None
    for array in (pos_sorted, neg_sorted):
        i = int(np.searchsorted(array, level, side="left"))
        if i > 0 and (found is None or array[i - 1] > found):
            found = array[i - 1]
    if found is None and rest is not None:
        smaller = rest[rest < level]
        found = smaller.max() if smaller.size else None
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
    every voxel is best. A histogram pass bounds where the optimum can lie, and only the voxels
    there are sorted: O(n) plus a small sort. With no positive voxel the Dice is NaN (threshold =
    max residual).
    """
    x, y = _pooled(residuals, labels)
    if method == "bisection":
        if steps < 1:
            raise ValueError(f"find_best_threshold: steps must be >= 1, got {steps}.")
        return _bisection(x, y, steps)
    if method == "exact":
        return _exact(x, y)
    raise ValueError(f"find_best_threshold: method must be 'bisection' or 'exact', got {method!r}.")


_SEARCH_BINS = 1 << 14


def _exact(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Dice-optimal threshold over all distinct residual values (prediction = x > threshold).

    Branch and bound on a histogram, then an exact sort-based search where it can matter:
    1. counts of all and of positive voxels in ``_SEARCH_BINS`` value bins (bin index monotone in x);
    2. every "bins >= i" prediction is a threshold prediction, so its Dice is a lower bound L;
    3. a cut at a positive value u in bin i has TP <= #pos in bins >= i and at least the voxels of
       bins > i plus u itself predicted: bins whose bound is below L cannot hold the optimum;
    4. the voxels of the remaining bins are sorted and every distinct positive value there is
       scored exactly, adding the counts of the bins above it.
    """
    n_true = int(np.count_nonzero(y))
    low, high = x.min(), x.max()
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError("find_best_threshold: residuals contain NaN or Inf values.")
    if n_true == 0:
        return math.nan, float(high)
    # bin index: monotone in the value (rounding is monotone) and <= _SEARCH_BINS - 1 by construction
    scale = (_SEARCH_BINS - 1) / (float(high) - float(low)) if high > low else 0.0

    def bin_of(values: np.ndarray) -> np.ndarray:
        return ((values - low) * scale).astype(np.intp)

    bins = bin_of(x)
    count_all = np.bincount(bins, minlength=_SEARCH_BINS)
    count_pos = np.bincount(bin_of(x[y]), minlength=_SEARCH_BINS)
    all_above = _suffix_sum(count_all) - count_all  # voxels in bins > i
    pos_above = _suffix_sum(count_pos) - count_pos
    lower_bound = np.max(2.0 * (pos_above + count_pos) / (all_above + count_all + n_true))
    upper_bound = 2.0 * (pos_above + count_pos) / (all_above + 1 + n_true)
    chosen = (count_pos > 0) & (upper_bound >= lower_bound * (1 - 1e-9))
    # with each bin, the closest non-empty bin below it: it holds the threshold that writes "x >= u"
    nonempty_index = np.where(count_all > 0, np.arange(_SEARCH_BINS), -1)
    closest_below = np.concatenate([[-1], np.maximum.accumulate(nonempty_index)[:-1]])
    helpers = closest_below[chosen]
    chosen[helpers[helpers >= 0]] = True

    take = chosen[bins]
    values, labels = x[take], y[take]
    pos_sorted, neg_sorted = np.sort(values[labels]), np.sort(values[~labels])
    levels, tp_taken, fp_taken, _ = _positive_levels(pos_sorted, neg_sorted)
    level_bins = bin_of(levels)
    # voxels at >= u: all voxels in bins above u's bin, plus the taken ones of u's own bin
    taken_all_above = _suffix_sum(count_all * chosen) - count_all * chosen
    taken_pos_above = _suffix_sum(count_pos * chosen) - count_pos * chosen
    tp = pos_above[level_bins] + tp_taken - taken_pos_above[level_bins]
    predicted = all_above[level_bins] + tp_taken + fp_taken - taken_all_above[level_bins]
    dice = 2.0 * tp / (predicted + n_true)
    best = levels.size - 1 - int(np.argmax(dice[::-1]))  # ties: the highest cut
    return float(dice[best]), _threshold_below(levels[best], pos_sorted, neg_sorted)


def _suffix_sum(counts: np.ndarray) -> np.ndarray:
    """``out[i] = counts[i:].sum()``."""
    return np.cumsum(counts[::-1])[::-1]


# ----------------------------------------------------------------------------------------------
# connected components
# ----------------------------------------------------------------------------------------------


def _filled_sizes_by_regionprops(labels: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Filled sizes of the candidate components, one bounding box at a time (any component size)."""
    from skimage.measure import regionprops

    wanted = set(candidates.tolist())
    sizes = {prop.label: prop.area_filled for prop in regionprops(labels) if prop.label in wanted}
    return np.array([sizes[c] for c in candidates.tolist()], dtype=np.int64)


def remove_small_components(binary, max_size: int = SMALL_COMPONENT_SIZE) -> np.ndarray:
    """Drop 3D 26-connected components whose filled size is <= ``max_size`` voxels.

    The filled size is skimage's ``area_filled`` (holes filled with 26-connected background), as in
    the reference. Such a hole needs all 26 neighbours of a voxel inside the component, so below
    26 voxels the filled size is the size and one ``bincount`` decides; larger ``max_size`` values
    fall back to one bounding box per small component.
    """
    binary = _volume(binary, "binary") > 0
    labels, count = ndi.label(binary, structure=_FULL_3D)
    if count == 0:
        return binary
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    small = np.flatnonzero(sizes[1:] <= max_size) + 1
    if small.size == 0:
        return binary
    if max_size >= 26:
        small = small[_filled_sizes_by_regionprops(labels, small) <= max_size]
    remove = np.zeros(count + 1, dtype=bool)
    remove[small] = True
    return binary & ~remove[labels]


# ----------------------------------------------------------------------------------------------
# ranking metrics
# ----------------------------------------------------------------------------------------------


def _rank_metrics(pos_sorted: np.ndarray, neg_sorted: np.ndarray) -> tuple[float, float]:
    """(AUROC, average precision) from the sorted scores of positives and negatives.

    AUROC is the Mann-Whitney statistic with ties counted 1/2, the same number as the trapezoidal
    area under sklearn's ROC curve; AP is sklearn's step-wise ``average_precision_score``:
    the sum over distinct positive scores u of (#positives == u / P) x precision at ``score >= u``.
    """
    n_pos, n_neg = pos_sorted.size, neg_sorted.size
    if n_pos == 0:
        return math.nan, math.nan
    levels, tp, fp, counts = _positive_levels(pos_sorted, neg_sorted)
    ap = float(np.sum(counts / n_pos * (tp / (tp + fp))))
    if n_neg == 0:
        return math.nan, ap
    below = np.searchsorted(neg_sorted, levels, side="left")
    ties = np.searchsorted(neg_sorted, levels, side="right") - below
    auroc = float(np.sum(counts * (below + 0.5 * ties)) / (n_pos * n_neg))
    return auroc, ap


def auroc_auprc(scores, labels) -> tuple[float, float]:
    """Area under the ROC curve and average precision of ``scores`` against ``labels > 0``.

    Equal to sklearn's ``roc_auc_score`` / ``average_precision_score``; NaN where they are
    undefined (AUROC without both classes, AP without positives).
    """
    scores = np.asarray(scores).ravel()
    labels = np.asarray(labels).ravel() > 0
    if scores.size != labels.size:
        raise ValueError(f"auroc_auprc: {scores.size} scores but {labels.size} labels.")
    return _rank_metrics(np.sort(scores[labels]), np.sort(scores[~labels]))


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


def volume_metrics(
    residual, seg, brain_mask, threshold: float, region: str = "brain", best_dice_method: str = "exact"
) -> dict:
    """All per-volume metrics of the protocol for a post-processed residual (see ``postprocess_residual``).

    ``threshold_metrics`` at ``threshold``, plus threshold-free scores on the voxels of ``region``:
    best_dice / best_threshold (``find_best_threshold`` on this volume alone, without component
    removal, ``best_dice_method`` "exact" or the reference's "bisection"), pixel auroc / auprc,
    slice_auroc / slice_auprc of the slice scores (``slice_scores``) against "slice holds lesion",
    volume_score (mean residual in the brain) and lesion_voxels. With ``region="brain"`` slices
    without brain are left out of the slice metrics; with ``"volume"`` they score 0 like in the
    reference. Healthy volumes (empty ``seg``) give NaN wherever a lesion is needed.
    """
    residual, seg, mask, roi = _inputs(residual, seg, brain_mask, region)
    row = threshold_metrics(residual, seg, mask, threshold, region)

    values, labels = residual[roi], seg[roi]
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    pos_sorted, neg_sorted = np.sort(values[labels]), np.sort(values[~labels])
    if best_dice_method == "exact" and pos_sorted.size:
        best_dice, level = _best_cut(pos_sorted, neg_sorted, pos_sorted.size)
        best_threshold = _threshold_below(level, pos_sorted, neg_sorted)
    else:
        best_dice, best_threshold = find_best_threshold(values, labels, best_dice_method)
    auroc, auprc = _rank_metrics(pos_sorted, neg_sorted)

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


def fpr_thresholds(healthy_residuals, brain_masks, rates: Iterable[float] = DEFAULT_FPR_RATES) -> dict:
    """Thresholds t with at most ``rate`` of the healthy in-brain voxels above t: ``{rate: t}``.

    t is the smallest residual value that keeps ``#(x > t) <= floor(rate * n)``, i.e. the
    (n - floor(rate n))-th smallest value: the same threshold the reference read off sklearn's ROC
    curve of all-healthy voxels. ``healthy_residuals`` / ``brain_masks``: one volume or a list.
    """
    if isinstance(healthy_residuals, np.ndarray) and healthy_residuals.ndim == 3:
        healthy_residuals, brain_masks = [healthy_residuals], [brain_masks]
    healthy_residuals, brain_masks = list(healthy_residuals), list(brain_masks)
    if len(healthy_residuals) != len(brain_masks) or not healthy_residuals:
        raise ValueError(
            f"fpr_thresholds: need as many brain masks as residual volumes (got {len(healthy_residuals)} "
            f"and {len(brain_masks)}), and at least one."
        )
    pooled = []
    for i, (residual, mask) in enumerate(zip(healthy_residuals, brain_masks)):
        residual, mask = _volume(residual, f"healthy_residuals[{i}]"), _volume(mask, f"brain_masks[{i}]") > 0
        _same_shape(residual, mask, f"healthy_residuals[{i}] / brain_masks[{i}]")
        pooled.append(residual[mask])
    return thresholds_at_fpr(np.concatenate(pooled), rates)


def thresholds_at_fpr(values, rates: Iterable[float] = DEFAULT_FPR_RATES) -> dict:
    """``fpr_thresholds`` of already pooled healthy values (any region): ``{rate: t}``."""
    values = np.asarray(values).ravel()
    n = values.size
    if n == 0:
        raise ValueError("fpr_thresholds: no healthy value to pool (empty brain masks?).")
    out = {}
    for rate in rates:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"fpr_thresholds: rates must lie in [0, 1), got {rate}.")
        allowed = math.floor(rate * n + 1e-9)  # voxels that may lie above the threshold
        kth = n - allowed - 1
        out[rate] = float(np.partition(values, kth)[kth])
    return out


def summarize(rows: Sequence[Mapping]) -> dict:
    """Mean and (population) std of every numeric metric over volumes, ignoring NaN.

    Returns ``{metric: {"mean": m, "std": s, "n": number of finite values}}`` in first-seen key
    order; non-numeric entries (ids, paths) are skipped. Infinite values count as missing.
    """
    keys: list[str] = []
    for row in rows:
        for key, value in row.items():
            if key not in keys and isinstance(value, numbers.Real) and not isinstance(value, bool):
                keys.append(key)
    out = {}
    for key in keys:
        values = np.array(
            [float(row[key]) for row in rows if isinstance(row.get(key), numbers.Real)], dtype=np.float64
        )
        values = values[np.isfinite(values)]
        if values.size:
            out[key] = {"mean": float(values.mean()), "std": float(values.std()), "n": int(values.size)}
        else:
            out[key] = {"mean": math.nan, "std": math.nan, "n": 0}
    return out
