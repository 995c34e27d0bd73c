"""NOVA benchmark, metrics: localisation AP of a predictions file against the gold boxes of ``metadata.csv``.

Boxes are ``(y_min, x_min, y_max, x_max)`` in float pixels; predictions come as ``{"x_min", "y_min", "x_max",
"y_max", "score"}`` with the max exclusive (regionprops). Two metric families are computed:

* ``reference`` -- the published NOVA protocol: per image, boxes sorted by area (largest first, top 5),
  inclusive IoU (``+1`` on widths, heights and the intersection), greedy matching to the highest-IoU
  ground-truth box, per-image AP = mean of the cumulative precisions at the TP positions, mAP = mean
  over images.
* ``score_ranked`` -- a COCO-style AP: boxes ranked by ``score`` over the whole set, standard IoU,
  101-point interpolated precision. Reported beside the reference numbers, never instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path

import numpy as np

from custom_components.nova_data import read_nova_filenames, read_nova_metadata
from custom_components.utils import write_json_atomic

logger = logging.getLogger(__name__)

__all__ = ["box_iou", "load_predictions", "evaluate_nova", "format_summary", "tracked_metrics", "evaluate_nova_files"]

#: IoU thresholds of mAP@50:95 (0.50, 0.55, ..., 0.95), rounded so that 0.5 and 0.95 are exact.
IOU_THRESHOLDS_50_95 = np.round(np.linspace(0.5, 0.95, 10), 2)
#: Precision denominator offset of the reference implementation: tp / (tp + fp + 1e-6).
REFERENCE_EPS = 1e-6
PRED_KEYS = ("x_min", "y_min", "x_max", "y_max", "score")


def box_iou(a: np.ndarray, b: np.ndarray, inclusive: bool = False) -> np.ndarray:
    """Pairwise IoU ``(n, m)`` of ``(y_min, x_min, y_max, x_max)`` boxes.

    ``inclusive=True`` is the reference's pixel-inclusive IoU: ``+1`` on each side length and on
    the intersection's; ``False`` is the standard continuous IoU. Not ``monai.data.box_utils.box_iou``: it
    computes in float32 with an epsilon in the union, which moves IoUs equal to a threshold (7/10 at 0.70)
    below it, where the reference (float64) counts a match.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    one = 1.0 if inclusive else 0.0
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo + one, 0.0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2] + one, axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2] + one, axis=-1)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def load_predictions(path: str | os.PathLike) -> dict:
    """Read a predictions JSON ``{filename: [{"x_min", "y_min", "x_max", "y_max", "score"}, ...]}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object {{filename: [boxes]}}, got {type(data).__name__}")
    return data


def _prediction_arrays(predictions: Mapping, known: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Validate predictions; return ``{filename: (boxes (n, 4) yxyx, scores (n,))}``."""
    if not isinstance(predictions, Mapping):
        raise ValueError(f"predictions must be a mapping {{filename: [boxes]}}, got {type(predictions).__name__}")
    unknown = sorted(str(k) for k in predictions if k not in known)
    if unknown:
        raise ValueError(f"{len(unknown)} predicted filename(s) are not in the NOVA metadata: "
                         f"{unknown[:20]}{' ...' if len(unknown) > 20 else ''}")
    out = {}
    for name, boxes in predictions.items():
        if not isinstance(boxes, Sequence) or isinstance(boxes, (str, bytes)):
            raise ValueError(f"{name}: predictions must be a list of boxes, got {type(boxes).__name__}")
        arr = np.zeros((len(boxes), 4), dtype=np.float64)
        scores = np.zeros(len(boxes), dtype=np.float64)
        for i, box in enumerate(boxes):
            if not isinstance(box, Mapping):
                raise ValueError(f"{name}: box {i} must be an object with keys {list(PRED_KEYS)}, got {box!r}")
            missing = [k for k in PRED_KEYS if k not in box]
            if missing:
                raise ValueError(f"{name}: box {i} lacks key(s) {missing}: {dict(box)}")
            vals = [box[k] for k in PRED_KEYS]
            if any(isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) for v in vals):
                raise ValueError(f"{name}: box {i} holds a non-numeric or non-finite value: {dict(box)}")
            x0, y0, x1, y1, s = (float(v) for v in vals)
            if x1 <= x0 or y1 <= y0:
                raise ValueError(f"{name}: box {i} is empty or inverted (need x_max > x_min and "
                                 f"y_max > y_min): {dict(box)}")
            arr[i] = (y0, x0, y1, x1)
            scores[i] = s
        out[name] = (arr, scores)
    return out


def _reference_image(pred: np.ndarray, gt: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference protocol on one image; ``pred`` already area-sorted and truncated.

    Returns per-threshold AP ``(T,)`` and the TP flags ``(T, n_pred)``.
    """
    n, t = len(pred), len(thresholds)
    if n == 0:
        return np.zeros(t), np.zeros((t, 0), dtype=bool)
    if len(gt) == 0:
        return np.zeros(t), np.zeros((t, n), dtype=bool)
    iou = box_iou(pred, gt, inclusive=True)
    best_gt = np.argmax(iou, axis=1)  # first index on ties
    best_iou = iou[np.arange(n), best_gt]
    passes = best_iou[None, :] >= thresholds[:, None]  # (T, n)
    # a passing box is a TP unless an earlier passing box (a TP by induction) took the same GT box
    same_earlier = (best_gt[:, None] == best_gt[None, :]) & np.tri(n, n, -1, dtype=bool).T  # [j, i]: j < i
    taken = (passes[:, :, None] & same_earlier[None]).any(axis=1)
    tp = passes & ~taken
    tp_cum = np.cumsum(tp, axis=1)
    fp_cum = np.cumsum(~tp, axis=1)
    precision = tp_cum / (tp_cum + fp_cum + REFERENCE_EPS)
    n_tp = tp.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ap = np.where(n_tp > 0, (precision * tp).sum(axis=1) / np.maximum(n_tp, 1), 0.0)
    return ap, tp


def _score_ranked_ap(per_image: list[tuple[np.ndarray, np.ndarray, np.ndarray]], thresholds: np.ndarray,
                     n_gt: int) -> np.ndarray:
    """COCO-style AP per threshold: greedy match per image in score order (best unmatched GT with
    IoU >= t, standard IoU), detections ranked by score over the set, 101-point interpolation."""
    recall_points = np.linspace(0.0, 1.0, 101)
    all_scores, all_tp = [], []
    for pred, scores, gt in per_image:
        tp = np.zeros((len(thresholds), len(pred)), dtype=bool)
        if len(pred) and len(gt):
            iou = box_iou(pred, gt, inclusive=False)
            for ti, thr in enumerate(thresholds):
                free = np.ones(len(gt), dtype=bool)
                for d in range(len(pred)):  # at most top_k boxes per image
                    cand = np.where(free & (iou[d] >= thr), iou[d], -1.0)
                    g = int(np.argmax(cand))
                    if cand[g] >= 0:
                        tp[ti, d] = True
                        free[g] = False
        all_scores.append(scores)
        all_tp.append(tp)
    scores = np.concatenate(all_scores) if all_scores else np.zeros(0)
    tp = np.concatenate(all_tp, axis=1) if all_tp else np.zeros((len(thresholds), 0), dtype=bool)
    order = np.argsort(-scores, kind="stable")
    tp = tp[:, order]
    tp_cum = np.cumsum(tp, axis=1)
    fp_cum = np.cumsum(~tp, axis=1)
    ap = np.zeros(len(thresholds))
    for ti in range(len(thresholds)):
        if tp.shape[1] == 0:
            continue
        recall = tp_cum[ti] / n_gt
        precision = tp_cum[ti] / (tp_cum[ti] + fp_cum[ti])
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        idx = np.searchsorted(recall, recall_points, side="left")
        ap[ti] = np.where(idx < len(envelope), envelope[np.minimum(idx, len(envelope) - 1)], 0.0).mean()
    return ap


def evaluate_nova(predictions: Mapping[str, list[dict]], records: list[dict], top_k: int | None = 5,
                  known_filenames: Sequence[str] | None = None) -> dict:
    """NOVA localisation metrics of ``predictions`` on the images of ``records``.

    ``records``: the evaluated images (from :func:`read_nova_metadata`, caption filter applied);
    each one counts, with AP 0 when it has no prediction. ``known_filenames``: every filename of the
    metadata file (defaults to those of ``records``); predictions for known images outside
    ``records`` are ignored, unknown names raise a ValueError. ``top_k``: boxes kept per image
    (largest area for the reference protocol, highest score for the score-ranked AP; None = all).

    Returns ``{"reference": {mAP@30, mAP@50, mAP@50:95, ACC@50, TP@30, FP@30, GT@30},
    "score_ranked": {AP@30, AP@50, AP@50:95}, "n_images": int, "per_image": {filename: {...}}}``.
    """
    if not records:
        raise ValueError("no NOVA images to evaluate (empty metadata, or the caption filter removed every row)")
    known = set(known_filenames) if known_filenames is not None else {r["filename"] for r in records}
    known |= {r["filename"] for r in records}
    preds = _prediction_arrays(predictions, known)
    n_gt = int(sum(len(r["boxes"]) for r in records))
    if n_gt == 0:
        raise ValueError("the evaluated NOVA images have no ground-truth boxes; the metrics are undefined")

    thresholds = np.concatenate([[0.3], IOU_THRESHOLDS_50_95])  # index 0: 0.30, 1: 0.50, ..., 10: 0.95
    i30, i50 = 0, 1
    aps, tps, fps, per_image, ranked_inputs = [], [], [], {}, []
    for rec in records:
        name, gt = rec["filename"], np.asarray(rec["boxes"], dtype=np.float64).reshape(-1, 4)
        boxes, scores = preds.get(name, (np.zeros((0, 4)), np.zeros(0)))
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        by_area = np.argsort(-area, kind="stable")[:top_k]
        ap, tp = _reference_image(boxes[by_area], gt, thresholds)
        n_tp = tp.sum(axis=1)
        aps.append(ap)
        tps.append(n_tp)
        fps.append(tp.shape[1] - n_tp)
        per_image[name] = {"AP@30": float(ap[i30]), "AP@50": float(ap[i50]), "TP@30": int(n_tp[i30]),
                           "FP@30": int(tp.shape[1] - n_tp[i30]), "GT": int(len(gt))}
        by_score = np.argsort(-scores, kind="stable")[:top_k]
        ranked_inputs.append((boxes[by_score], scores[by_score], gt))

    aps, tps, fps = np.array(aps), np.array(tps), np.array(fps)  # (n_images, T)
    mean_ap = aps.mean(axis=0)
    ranked = _score_ranked_ap(ranked_inputs, thresholds, n_gt)
    reference = {
        "mAP@30": float(mean_ap[i30]),
        "mAP@50": float(mean_ap[i50]),
        "mAP@50:95": float(mean_ap[1:].mean()),
        "ACC@50": float(tps[:, i50].sum() / n_gt),
        "TP@30": int(tps[:, i30].sum()),
        "FP@30": int(fps[:, i30].sum()),
        "GT@30": n_gt,
    }
    score_ranked = {"AP@30": float(ranked[i30]), "AP@50": float(ranked[i50]), "AP@50:95": float(ranked[1:].mean())}
    return {"reference": reference, "score_ranked": score_ranked, "n_images": len(records), "per_image": per_image}


def format_summary(metrics: Mapping) -> str:
    """One line per number, for the log."""
    lines = [f"NOVA evaluation on {metrics['n_images']} image(s)"]
    for group in ("reference", "score_ranked"):
        for key, value in metrics[group].items():
            lines.append(f"  {group:<12} {key:<10} {value:.4f}" if isinstance(value, float)
                         else f"  {group:<12} {key:<10} {value}")
    return "\n".join(lines)


def tracked_metrics(metrics: Mapping) -> dict[str, float]:
    """The numbers of :func:`evaluate_nova` worth tracking: reference and score-ranked metrics, image count."""
    numbers = {**metrics["reference"], **{f"score_ranked/{k}": v for k, v in metrics["score_ranked"].items()},
               "n_images": metrics["n_images"]}
    return {k: float(v) for k, v in numbers.items()}


def evaluate_nova_files(predictions_file: str | os.PathLike, metadata_file: str | os.PathLike,
                        output_file: str | os.PathLike | None = None, caption_filter: str | None = "T2",
                        top_k: int | None = 5) -> dict:
    """File-level :func:`evaluate_nova`: read both files, evaluate, write ``output_file`` atomically."""
    metrics = evaluate_nova(load_predictions(predictions_file),
                            read_nova_metadata(metadata_file, caption_filter=caption_filter),
                            top_k=top_k, known_filenames=read_nova_filenames(metadata_file))
    if output_file is not None:
        write_json_atomic(output_file, metrics)
    logger.info(format_summary(metrics))
    return metrics
