"""Seconds of the evaluation protocol's post-processing and metrics per 96x96x50 volume.

Compares, on a synthetic brain (ellipsoid mask, smooth residual noise, one bright lesion):
- post-processing: per-slice erosion + ``scipy.ndimage.median_filter`` vs ``postprocess_residual``,
  and the median filter alone on the whole volume (scipy vs ``median_filter_3d``);
- metrics: a straightforward version of the protocol (sklearn AUROC/AP on all voxels, skimage
  regionprops for the small components, per-volume bisection, MONAI Hausdorff, slices in a loop)
  vs ``volume_metrics``;
- the threshold search on pooled voxels: ``"exact"`` vs ``"bisection"``.

    python benchmarks/evaluation.py                         # 5 repeats, 10^7 pooled voxels
    python benchmarks/evaluation.py --repeats 20 --pooled 3000000 --torch-threads 0

Torch (used by MONAI's Hausdorff distance) runs with ``--torch-threads`` threads (default 1; 0 keeps
torch's default): on a busy machine torch's thread pool makes each small call far slower.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from custom_components import metrics as M  # noqa: E402
from custom_components.median import median_filter_3d  # noqa: E402

SHAPE = (96, 96, 50)


def synthetic_case(seed: int = 0):
    """(residual, brain mask, lesion segmentation) that look like a reconstruction residual."""
    rng = np.random.default_rng(seed)
    h, w, d = SHAPE
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) for n in SHAPE), indexing="ij"))
    wobble = ndi.gaussian_filter(rng.normal(0, 1, SHAPE), 6) * 8  # irregular outline
    radius = ((grid[0] - h / 2) / 38) ** 2 + ((grid[1] - w / 2) / 44) ** 2 + ((grid[2] - 28) / 30) ** 2
    brain = radius * (1 + 0.05 * wobble) <= 1
    lesion_radius = ((grid[0] - 40) / 9) ** 2 + ((grid[1] - 55) / 11) ** 2 + ((grid[2] - 26) / 7) ** 2
    seg = (lesion_radius * (1 + 0.1 * wobble) <= 1) & brain
    residual = np.abs(ndi.gaussian_filter(rng.normal(0, 0.5, SHAPE), 1.0)) + 0.02 * rng.random(SHAPE)
    residual += seg * rng.uniform(0.0, 0.12, SHAPE)  # a faint lesion: Dice about 0.7
    residual += (radius > 0.85) * 0.1 * rng.random(SHAPE)  # brighter residual along the brain edge
    return (residual * brain).astype(np.float32), brain, seg


def baseline_postprocess(residual, brain):
    """Per-slice erosion loop and scipy's 3D median filter."""
    cross = ndi.generate_binary_structure(2, 1)
    eroded = np.stack(
        [ndi.binary_erosion(brain[..., k], cross, iterations=SHAPE[0] // 25) for k in range(SHAPE[2])], axis=-1
    )
    return ndi.median_filter(residual * eroded, size=5)


def baseline_metrics(residual, seg, brain, threshold):
    """The protocol written plainly with the usual library calls (whole-volume voxels)."""
    import torch
    from monai.metrics import compute_hausdorff_distance
    from skimage.measure import label, regionprops
    from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score

    flat, truth = residual.ravel(), seg.ravel()
    auroc, auprc = roc_auc_score(truth, flat), average_precision_score(truth, flat)
    best = M.find_best_threshold(flat, truth, method="bisection")
    pred = residual > threshold
    labels = label(pred, connectivity=3)
    for prop in regionprops(labels):
        if prop.area_filled <= 7:
            pred[labels == prop.label] = False
    tn, fp, fn, tp = confusion_matrix(truth, pred.ravel(), labels=[0, 1]).ravel()
    dice = 2 * tp / (2 * tp + fp + fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(torch.from_numpy(pred)[None, None], torch.from_numpy(seg)[None, None])
    scores, slice_labels = [], []
    for k in range(SHAPE[2]):
        inside = brain[..., k]
        scores.append(residual[..., k][inside].mean() if inside.any() else 0.0)
        slice_labels.append(seg[..., k].any())
    slice_auroc = roc_auc_score(slice_labels, scores)
    return dice, best, auroc, auprc, hd, slice_auroc


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds over ``repeats`` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def pooled_case(n: int, seed: int = 1):
    """``n`` pooled validation voxels: 45 % background zeros, brain noise, 3 % lesion voxels."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.03
    x = np.abs(rng.normal(0, 0.08, n)) + y * rng.uniform(0.0, 0.5, n)
    x[rng.random(n) < 0.45] = 0.0
    return x.astype(np.float32), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median is shown)")
    parser.add_argument("--pooled", type=int, default=10_000_000, help="pooled voxels for the threshold search")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    residual, brain, seg = synthetic_case()
    print(f"volume {SHAPE}, brain {brain.mean():.0%} of voxels, lesion {seg.sum()} voxels, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} repeats (median)")

    t_scipy_median, _ = timed(lambda: ndi.median_filter(residual, size=5), args.repeats)
    t_our_median, ours = timed(lambda: median_filter_3d(residual, 5), args.repeats)
    assert np.array_equal(ours, ndi.median_filter(residual, size=5))
    print(f"3D median filter, whole volume: scipy {t_scipy_median:.3f} s | median_filter_3d {t_our_median:.3f} s "
          f"(x{t_scipy_median / t_our_median:.1f}, identical output)")

    t_base_post, base_post = timed(lambda: baseline_postprocess(residual, brain), args.repeats)
    t_post, post = timed(lambda: M.postprocess_residual(residual, brain), args.repeats)
    assert np.array_equal(post, base_post)
    print(f"post-processing (erosion + median): plain {t_base_post:.3f} s | postprocess_residual {t_post:.3f} s "
          f"(x{t_base_post / t_post:.1f}, identical output)")

    threshold = M.find_best_threshold(post[brain], seg[brain], method="exact")[1]
    t_base_metrics, _ = timed(lambda: baseline_metrics(post, seg, brain, threshold), args.repeats)
    t_metrics, row = timed(lambda: M.volume_metrics(post, seg, brain, threshold), args.repeats)
    t_threshold, _ = timed(lambda: M.threshold_metrics(post, seg, brain, threshold), args.repeats)
    pred = M.remove_small_components(post > threshold)
    t_hd, _ = timed(lambda: M._hausdorff(pred & brain, seg & brain), args.repeats)
    print(f"metrics: plain {t_base_metrics:.3f} s | volume_metrics {t_metrics:.3f} s "
          f"(of which threshold_metrics {t_threshold:.3f} s, MONAI Hausdorff {t_hd:.3f} s)")
    total_base, total = t_base_post + t_base_metrics, t_post + t_metrics
    print(f"per volume, post-processing + metrics: plain {total_base:.3f} s | ours {total:.3f} s "
          f"(x{total_base / total:.1f}); dice {row['dice']:.3f}, best dice {row['best_dice']:.3f}, "
          f"auroc {row['auroc']:.3f}")

    x, y = pooled_case(args.pooled)
    t_bisect, (d_bisect, th_bisect) = timed(lambda: M.find_best_threshold(x, y, "bisection"), max(1, args.repeats // 2))
    t_exact, (d_exact, th_exact) = timed(lambda: M.find_best_threshold(x, y, "exact"), max(1, args.repeats // 2))
    t_sort, _ = timed(lambda: np.sort(x), 1)
    print(f"threshold search on {args.pooled:.0e} pooled voxels: bisection {t_bisect:.3f} s "
          f"(dice {d_bisect:.4f} at {th_bisect:.4f}) | exact {t_exact:.3f} s (dice {d_exact:.4f} at {th_exact:.4f}); "
          f"for scale, np.sort of all voxels {t_sort:.3f} s")


if __name__ == "__main__":
    main()
