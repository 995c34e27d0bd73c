"""Evaluation metrics and post-processing on small hand-made volumes with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from sklearn.metrics import average_precision_score, roc_auc_score

from custom_components import metrics as M
from custom_components.median import median_filter_3d, median_of_padded


def _brute_force_best_dice(x: np.ndarray, y: np.ndarray) -> float:
    """Dice of ``x > t`` for t below every value and at every distinct value; the best of them."""
    best = -1.0
    for t in np.concatenate([[-np.inf], np.unique(x)]):
        pred = x > t
        best = max(best, 2.0 * np.sum(pred & y) / (np.sum(pred) + np.sum(y)))
    return best


def _full_sort_best_dice(x: np.ndarray, y: np.ndarray) -> float:
    """Best Dice by sorting every voxel in descending order and cutting between distinct values."""
    order = np.argsort(-x.astype(np.float64), kind="stable")
    xs, ys = x[order], y[order]
    tp = np.cumsum(ys)
    ends = np.flatnonzero(np.append(xs[1:] != xs[:-1], True))  # last index of each run of ties
    return float(np.max(2.0 * tp[ends] / (ends + 1 + y.sum())))


# ------------------------------------------------------------------------------------------------
# erosion, median filter, post-processing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, side_after", [(96, 11 - 2 * 3), (50, 11 - 2 * 2)])
def test_erosion_shrinks_a_square_per_slice(height, side_after):
    # an 11x11 square in one axial slice only: each 4-connected erosion peels one ring off
    mask = np.zeros((height, height, 7), dtype=np.uint8)
    mask[20:31, 20:31, 3] = 1
    eroded = M.erode_brain_mask(mask)
    assert eroded.dtype == bool
    assert eroded[..., 3].sum() == side_after**2  # not wiped out: no erosion along the slice axis
    assert eroded[..., [0, 1, 2, 4, 5, 6]].sum() == 0


def test_erosion_uses_the_4_connected_cross_and_erodes_at_the_border():
    mask = np.zeros((30, 30, 2), dtype=bool)  # H=30: one iteration
    mask[10, 9:12, 0] = mask[9:12, 10, 0] = True  # a plus: its centre has all 4 neighbours
    mask[:, :, 1] = True  # a full slice loses its outermost ring
    eroded = M.erode_brain_mask(mask)
    assert np.argwhere(eroded[..., 0]).tolist() == [[10, 10]]
    assert eroded[..., 1].sum() == 28 * 28


@pytest.mark.parametrize("size", [3, 5])
@pytest.mark.parametrize("shape", [(20, 17, 13), (9, 6, 5), (3, 1, 2)])
def test_median_filter_equals_scipy(size, shape):
    rng = np.random.default_rng(sum(shape) + size)
    continuous = rng.random(shape).astype(np.float32)
    ties = rng.integers(0, 4, shape).astype(np.float64)  # many equal values
    sparse = np.where(rng.random(shape) < 0.6, 0.0, rng.random(shape)).astype(np.float32)
    for volume in (continuous, ties, sparse):
        ours = median_filter_3d(volume, size)
        assert ours.dtype == volume.dtype
        np.testing.assert_array_equal(ours, ndi.median_filter(volume, size=size))


@pytest.mark.parametrize("chunk_elements", [1, 1000, 2000])
def test_median_filter_in_chunks_of_rows_equals_scipy(chunk_elements):
    # padded rows hold 16 x 14 = 224 values: chunks of 2, 4 and 8 output rows over 11 rows, so
    # every split has chunk borders and ends with an odd chunk
    volume = np.random.default_rng(7).random((11, 12, 10)).astype(np.float32)
    padded = np.pad(volume, 2, mode="symmetric")
    ours = median_of_padded(padded, 5, chunk_elements=chunk_elements)
    np.testing.assert_array_equal(ours, ndi.median_filter(volume, size=5))


def test_median_filter_rejects_even_sizes():
    with pytest.raises(ValueError, match="odd"):
        median_filter_3d(np.zeros((5, 5, 5)), 4)


def test_postprocess_equals_mask_then_scipy_median():
    rng = np.random.default_rng(0)
    h, w, d = 48, 40, 20  # 1 erosion step
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in (h, w, d)), indexing="ij"))
    brain = ((grid[0] - 24) / 17) ** 2 + ((grid[1] - 20) / 15) ** 2 + ((grid[2] - 12) / 12) ** 2 <= 1
    residual = np.abs(rng.normal(0, 0.1, (h, w, d))).astype(np.float32)
    residual[20:26, 15:20, 8:12] += 0.5  # a lesion
    eroded = np.stack(
        [ndi.binary_erosion(brain[..., k], ndi.generate_binary_structure(2, 1)) for k in range(d)], axis=-1
    )
    expected = ndi.median_filter(residual * eroded, size=5)
    out = M.postprocess_residual(residual, brain)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)
    assert not M.postprocess_residual(residual, np.zeros_like(brain)).any()


def test_postprocess_reports_bad_inputs():
    with pytest.raises(ValueError, match="shapes differ"):
        M.postprocess_residual(np.zeros((8, 8, 4)), np.ones((8, 8, 5)))
    with pytest.raises(ValueError, match="3D volume"):
        M.postprocess_residual(np.zeros((1, 8, 8, 4)), np.ones((1, 8, 8, 4)))
    with pytest.raises(ValueError, match="NaN"):
        M.postprocess_residual(np.full((8, 8, 4), np.nan), np.ones((8, 8, 4)))


# ------------------------------------------------------------------------------------------------
# connected components
# ------------------------------------------------------------------------------------------------


def test_components_of_7_voxels_go_and_of_8_stay_with_26_connectivity():
    binary = np.zeros((20, 20, 20), dtype=bool)
    for i in range(7):  # 7 voxels touching only at corners: one 26-connected component
        binary[i, i, i] = True
    for i in range(8):  # 8 voxels along another diagonal
        binary[12 + i % 8, 19 - i, i] = True
    kept = M.remove_small_components(binary)
    assert kept[:7, :7, :7].sum() == 0
    assert kept.sum() == 8


# ------------------------------------------------------------------------------------------------
# threshold search
# ------------------------------------------------------------------------------------------------

TRACE_X = np.array([0.05, 0.15, 0.30, 0.45, 0.55, 0.70, 0.85, 1.00])
TRACE_Y = np.array([0, 0, 0, 1, 1, 1, 0, 0])


def test_bisection_follows_the_reference_rule_on_a_traced_case():
    # G = 3 lesion voxels (0.45, 0.55, 0.70). Dice(t) = 2 TP / (#(x > t) + 3).
    # step 0: range (0, 1):        t=0.25   -> 6 pred, 3 TP: 6/9  ; t=0.75 -> 2 pred, 0 TP: 0
    #         lower wins: best (6/9, 0.25), range (0, 0.5)
    # step 1: t=0.125 -> 7 pred: 6/10 ; t=0.375 -> 5 pred: 6/8
    #         upper wins: 0.75 >= 6/9, best (0.75, 0.375), range (0.25, 0.5)
    # step 2: t=0.3125 -> 5 pred: 0.75 ; t=0.4375 -> 5 pred: 0.75
    #         tie -> lower half; 0.75 >= 0.75 so the later point replaces: best (0.75, 0.3125),
    #         range (0.25, 0.375)
    # step 3: t=0.28125 -> 6 pred: 6/9 ; t=0.34375 -> 5 pred: 0.75
    #         upper wins, 0.75 >= 0.75: best (0.75, 0.34375), range (0.3125, 0.375)
    dice, threshold = M.find_best_threshold(TRACE_X, TRACE_Y, method="bisection", steps=4)
    assert dice == pytest.approx(0.75)
    assert threshold == 0.34375
    dice, threshold = M.find_best_threshold(TRACE_X, TRACE_Y, method="bisection", steps=3)
    assert (dice, threshold) == (pytest.approx(0.75), 0.3125)


def test_bisection_widens_a_collapsed_range():
    # all residuals 0: the range (0, 0) becomes (0, 1); every Dice is 0 and the lower half is kept:
    # points 0.25, 0.125, 0.0625 each replace the best (0 >= 0)
    dice, threshold = M.find_best_threshold(np.zeros(10), np.arange(10) < 3, method="bisection", steps=3)
    assert (dice, threshold) == (0.0, 0.0625)


def test_exact_on_the_traced_case():
    # cuts at the lesion values: x >= 0.45 -> 5 pred, 3 TP: 0.75; x >= 0.55: 4/7; x >= 0.70: 2/6.
    # x >= 0.45 is written x > 0.30, the largest value below 0.45
    dice, threshold = M.find_best_threshold(TRACE_X, TRACE_Y, method="exact")
    assert dice == pytest.approx(0.75)
    assert threshold == 0.30


def test_exact_predicts_everything_when_that_is_best():
    x = np.array([0.2, 0.1, 0.3], dtype=np.float32)
    dice, threshold = M.find_best_threshold(x, [1, 1, 1], method="exact")
    assert dice == 1.0
    assert threshold < 0.1 and np.all(x > np.float32(threshold))


def test_exact_equals_brute_force_and_beats_bisection_on_small_arrays():
    rng = np.random.default_rng(1)
    for trial in range(200):
        n = int(rng.integers(1, 120))
        if trial % 2:
            x = (rng.integers(0, 12, n) / 11).astype(np.float32)  # ties
        else:
            x = (rng.random(n) * rng.uniform(0.1, 3.0)).astype(np.float32)
        y = rng.random(n) < rng.uniform(0.05, 0.9)
        if not y.any():
            continue
        dice, threshold = M.find_best_threshold(x, y, method="exact")
        assert dice == pytest.approx(_brute_force_best_dice(x, y), abs=1e-12)
        pred = x > np.float32(threshold)
        assert 2 * np.sum(pred & y) / (np.sum(pred) + np.sum(y)) == pytest.approx(dice, abs=1e-12)
        assert dice >= M.find_best_threshold(x, y, method="bisection")[0] - 1e-12


def test_exact_on_large_pooled_arrays_matches_a_full_sort():
    # large enough for the search to drop most voxels before sorting
    rng = np.random.default_rng(2)
    n = 200_000
    y = rng.random(n) < 0.03
    x = np.abs(rng.normal(0, 0.1, n)) + y * rng.uniform(0.0, 0.4, n)
    x[rng.random(n) < 0.4] = 0.0  # background
    x = x.astype(np.float32)
    dice, threshold = M.find_best_threshold(x, y, method="exact")
    assert dice == pytest.approx(_full_sort_best_dice(x, y), abs=1e-12)
    pred = x > np.float32(threshold)
    assert 2 * np.sum(pred & y) / (np.sum(pred) + np.sum(y)) == pytest.approx(dice, abs=1e-12)
    assert dice >= M.find_best_threshold(x, y, method="bisection")[0]


def test_threshold_search_errors_and_healthy_input():
    with pytest.raises(ValueError, match="method"):
        M.find_best_threshold([0.1, 0.2], [0, 1], method="grid")
    with pytest.raises(ValueError, match="labels"):
        M.find_best_threshold([0.1, 0.2], [0, 1, 1])
    dice, threshold = M.find_best_threshold([0.1, 0.4], [0, 0], method="exact")
    assert math.isnan(dice) and threshold == pytest.approx(0.4)


# ------------------------------------------------------------------------------------------------
# per-volume metrics
# ------------------------------------------------------------------------------------------------


def test_threshold_metrics_on_two_overlapping_cubes():
    residual = np.zeros((10, 10, 10), dtype=np.float32)
    residual[2:5, 2:5, 2:5] = 1.0  # prediction: 27 voxels
    seg = np.zeros((10, 10, 10), dtype=np.uint8)
    seg[3:6, 2:5, 2:5] = 2  # truth: 27 voxels, 18 shared
    row = M.threshold_metrics(residual, seg, np.ones_like(seg), threshold=0.5)
    assert (row["tp"], row["fp"], row["fn"], row["tn"]) == (18, 9, 9, 1000 - 36)
    assert row["dice"] == pytest.approx(36 / 54)
    assert row["tpr"] == row["recall"] == pytest.approx(18 / 27)
    assert row["precision"] == pytest.approx(18 / 27)
    assert row["fpr"] == pytest.approx(9 / 973)
    assert row["specificity"] == pytest.approx(964 / 973)
    # every surface voxel of one cube is 1 voxel away from the other cube's surface
    assert row["hausdorff"] == pytest.approx(1.0)


def test_threshold_metrics_remove_specks_before_scoring():
    residual = np.zeros((10, 10, 10), dtype=np.float32)
    residual[1, 1, 1] = residual[8, 8, 8] = 1.0  # two single-voxel specks
    seg = np.zeros_like(residual)
    seg[8, 8, 8] = 1
    row = M.threshold_metrics(residual, seg, np.ones_like(seg), threshold=0.5)
    assert (row["tp"], row["fp"], row["dice"]) == (0, 0, 0.0)
    assert math.isnan(row["precision"]) and math.isnan(row["hausdorff"])


def _region_case():
    # 4x4x4 volume, brain = 8 voxels: 4 lesion voxels at 0.625, healthy brain at 0.25, 0.5, 0.75,
    # 1.0 (binary fractions: sums are exact), 56 background voxels at 0
    residual = np.zeros((4, 4, 4), dtype=np.float32)
    brain = np.zeros((4, 4, 4), dtype=bool)
    seg = np.zeros((4, 4, 4), dtype=bool)
    brain[1:3, 1:3, 1:3] = True
    seg[1:3, 1:3, 1] = True
    residual[1:3, 1:3, 1] = 0.625
    residual[1:3, 1:3, 2] = np.array([[0.25, 0.5], [0.75, 1.0]])
    return residual, seg, brain


def test_volume_metrics_pixel_ranking_in_brain_and_in_volume():
    residual, seg, brain = _region_case()
    in_brain = M.volume_metrics(residual, seg, brain, threshold=0.5)
    # each lesion voxel beats 2 of 4 healthy brain voxels; AP: precision 4/6 when recall reaches 1
    assert in_brain["auroc"] == pytest.approx(0.5)
    assert in_brain["auprc"] == pytest.approx(4 / 6)
    # the 56 zero-residual background voxels are beaten by every lesion voxel
    whole = M.volume_metrics(residual, seg, brain, threshold=0.5, region="volume")
    assert whole["auroc"] == pytest.approx((2 + 56) / (4 + 56))
    assert whole["auprc"] == pytest.approx(4 / 6)
    # best Dice: x >= 0.625 predicts 6 voxels, 4 of them lesion -> 8/10 (x > 0.5)
    assert in_brain["best_dice"] == pytest.approx(0.8)
    assert in_brain["best_threshold"] == 0.5
    assert in_brain["volume_score"] == pytest.approx((4 * 0.625 + 0.25 + 0.5 + 0.75 + 1.0) / 8)
    assert in_brain["lesion_voxels"] == 4


def test_volume_metrics_slice_scores():
    residual, seg, brain = _region_case()
    # slice 1: lesion, mean 0.625; slice 2: healthy, mean 0.625; slices 0 and 3: no brain
    row = M.volume_metrics(residual, seg, brain, threshold=0.5)
    assert row["slice_auroc"] == pytest.approx(0.5)  # one tie between the two brain slices
    whole = M.volume_metrics(residual, seg, brain, threshold=0.5, region="volume")
    # empty slices score 0: the lesion slice (0.625) beats both of them and ties with slice 2
    assert whole["slice_auroc"] == pytest.approx((2 + 0.5) / 3)


def test_volume_metrics_on_a_healthy_volume():
    residual = np.zeros((12, 12, 6), dtype=np.float32)
    brain = np.zeros((12, 12, 6), dtype=bool)
    brain[2:10, 2:10] = True
    residual[brain] = 0.25
    residual[4:7, 4:7, 2:5] = 0.9  # a 27-voxel false positive
    row = M.volume_metrics(residual, np.zeros_like(brain), brain, threshold=0.5)
    n_brain = 8 * 8 * 6
    assert row["dice"] == 0.0 and row["fp"] == 27 and row["tn"] == n_brain - 27
    assert row["fpr"] == pytest.approx(27 / n_brain)
    assert row["specificity"] == pytest.approx(1 - 27 / n_brain)
    for key in ("tpr", "recall", "hausdorff", "best_dice", "auroc", "auprc", "slice_auroc", "slice_auprc"):
        assert math.isnan(row[key]), key
    assert row["volume_score"] == pytest.approx((27 * 0.9 + (n_brain - 27) * 0.25) / n_brain)
    quiet = M.volume_metrics(np.zeros_like(residual), np.zeros_like(brain), brain, threshold=0.5)
    assert math.isnan(quiet["dice"]) and quiet["fpr"] == 0.0


def test_volume_metrics_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="residual / seg"):
        M.volume_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 3)), np.ones((4, 4, 4)), 0.5)
    with pytest.raises(ValueError, match="region"):
        M.volume_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), np.ones((4, 4, 4)), 0.5, region="head")
    with pytest.raises(ValueError, match="empty"):
        M.volume_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), 0.5)


def test_auroc_auprc_equal_sklearn_with_ties():
    rng = np.random.default_rng(3)
    for trial in range(30):
        n = int(rng.integers(5, 400))
        scores = rng.integers(0, 6, n) / 5 if trial % 2 else rng.random(n)
        labels = rng.random(n) < 0.3
        if labels.all() or not labels.any():
            continue
        auroc, auprc = M.auroc_auprc(scores, labels)
        assert auroc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert auprc == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert all(math.isnan(v) for v in M.auroc_auprc([0.1, 0.2], [0, 0]))
    assert math.isnan(M.auroc_auprc([0.1, 0.2], [1, 1])[0])


# ------------------------------------------------------------------------------------------------
# healthy thresholds and summaries
# ------------------------------------------------------------------------------------------------


def test_fpr_thresholds_on_a_known_distribution():
    # 100 in-brain voxels with values 1..100 split over two volumes; outside the brain: 1000s
    first, second = np.full((5, 5, 4), 1000.0), np.full((5, 5, 4), 1000.0)
    mask_first, mask_second = np.zeros((5, 5, 4), bool), np.zeros((5, 5, 4), bool)
    mask_first[..., :2] = True  # 50 voxels
    mask_second[..., 2:] = True  # 50 voxels
    values = np.random.default_rng(4).permutation(np.arange(1, 101)).astype(np.float32)
    first[mask_first], second[mask_second] = values[:50], values[50:]
    thresholds = M.thresholds_at_fpr(np.concatenate([first[mask_first], second[mask_second]]))
    # 1% of 100 voxels: only 100 may lie above -> 99; 5%: 96..100 above -> 95; 10% -> 90
    assert thresholds == {0.01: 99.0, 0.05: 95.0, 0.10: 90.0}


def test_fpr_thresholds_with_ties_never_exceed_the_rate():
    residual = np.zeros((10, 10, 1), dtype=np.float32)
    residual[:5] = 0.5  # 50 voxels at 0.5, 50 at 0
    thresholds = M.thresholds_at_fpr(residual, rates=(0.1, 0.5))
    assert thresholds == {0.1: 0.5, 0.5: 0.0}  # 0.5 would give 0 above; 0.0 gives exactly 50 %


def test_summarize_is_nan_aware():
    rows = [{"id": "a", "dice": 1.0, "tp": 3}, {"id": "b", "dice": math.nan, "tp": 5}, {"id": "c", "dice": 0.0}]
    summary = M.summarize(rows)
    assert set(summary) == {"dice", "tp"}
    assert summary["dice"] == {"mean": 0.5, "std": 0.5, "n": 2}
    assert summary["tp"] == {"mean": 4.0, "std": 1.0, "n": 2}
    assert math.isnan(M.summarize([{"hausdorff": math.nan}])["hausdorff"]["mean"])
