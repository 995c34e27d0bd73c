"""NOVA benchmark, metrics: localisation AP of a predictions file against the gold boxes of ``metadata.csv``.

Boxes are ``(y_min, x_min, y_max, x_max)`` in float pixels. ``reference`` is the published protocol: per image, the
5 largest boxes in area order, inclusive IoU (``+1`` on side lengths), each greedily matched to its highest-IoU gold
box, AP = mean cumulative precision at the TPs, mAP = mean over images. ``score_ranked`` (COCO-style: score order
over the set, standard IoU, 101 recall points) is reported beside it, never instead.
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

from custom_components.nova_data import read_metadata_rows, read_nova_metadata
from custom_components.utils import write_json_atomic

logger = logging.getLogger(__name__)

#: IoU thresholds: 0.30, then those of mAP@50:95 (0.50, 0.55, ..., 0.95, rounded so that 0.5 and 0.95 are exact).
THRESHOLDS = np.concatenate([[0.3], np.round(np.linspace(0.5, 0.95, 10), 2)])
PRED_KEYS = ("x_min", "y_min", "x_max", "y_max", "score")


def box_iou(a: np.ndarray, b: np.ndarray, inclusive: bool = False) -> np.ndarray:
    """Pairwise IoU ``(n, m)`` of ``(y_min, x_min, y_max, x_max)`` boxes; ``inclusive``: the reference's ``+1``.

    Not MONAI's box_iou: its float32 and union epsilon turn an IoU equal to a threshold (7/10 at 0.70) into a miss.
    """
    a, b = (np.asarray(x, dtype=np.float64).reshape(-1, 4) for x in (a, b))
    one = 1.0 if inclusive else 0.0
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo + one, 0.0, None), axis=-1)
    area_a, area_b = (np.prod(x[:, 2:] - x[:, :2] + one, axis=-1) for x in (a, b))
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _prediction_arrays(predictions: Mapping, known: set[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Validate predictions; return ``{filename: (boxes (n, 4) yxyx, scores (n,))}``."""
    unknown = sorted(str(k) for k in predictions if k not in known)
    if unknown:
        raise ValueError(f"{len(unknown)} predicted filename(s) are not in the NOVA metadata: "
                         f"{unknown[:20]}{' ...' if len(unknown) > 20 else ''}")
    out = {}
    for name, boxes in predictions.items():
        if not isinstance(boxes, Sequence) or isinstance(boxes, (str, bytes)):
            raise ValueError(f"{name}: predictions must be a list of boxes, got {type(boxes).__name__}")
        arr = np.zeros((len(boxes), 5), dtype=np.float64)
        for i, box in enumerate(boxes):
            missing = [k for k in PRED_KEYS if not isinstance(box, Mapping) or k not in box]
            if missing:
                raise ValueError(f"{name}: box {i} lacks key(s) {missing}: {box!r}")
            vals = [box[k] for k in PRED_KEYS]
            if any(isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) for v in vals):
                raise ValueError(f"{name}: box {i} holds a non-numeric or non-finite value: {box}")
            x0, y0, x1, y1, s = (float(v) for v in vals)
            if x1 <= x0 or y1 <= y0:
                raise ValueError(f"{name}: box {i} is empty or inverted (need x_max > x_min and y_max > y_min): {box}")
            arr[i] = (y0, x0, y1, x1, s)
        out[name] = (arr[:, :4], arr[:, 4])
    return out


def _reference_image(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference protocol on one image (``pred`` area-sorted and truncated): AP ``(T,)``, TP flags ``(T, n_pred)``."""
    n, t = len(pred), len(THRESHOLDS)
    if n == 0 or len(gt) == 0:
        return np.zeros(t), np.zeros((t, n), dtype=bool)
    iou = box_iou(pred, gt, inclusive=True)
    best_gt = np.argmax(iou, axis=1)  # first index on ties
    passes = iou[np.arange(n), best_gt][None, :] >= THRESHOLDS[:, None]  # (T, n)
    # a passing box is a TP unless an earlier passing box (a TP by induction) took the same GT box
    same_earlier = (best_gt[:, None] == best_gt[None, :]) & np.tri(n, n, -1, dtype=bool).T  # [j, i]: j < i
    tp = passes & ~(passes[:, :, None] & same_earlier[None]).any(axis=1)
    tp_cum = np.cumsum(tp, axis=1)
    precision = tp_cum / (tp_cum + np.cumsum(~tp, axis=1) + 1e-6)  # the reference's denominator offset
    return (precision * tp).sum(axis=1) / np.maximum(tp.sum(axis=1), 1), tp


def _score_ranked_ap(per_image: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n_gt: int) -> np.ndarray:
    """COCO-style AP per threshold: per image, greedy match in score order to the best free GT box with standard IoU
    >= t; detections ranked by score over the set; 101-point interpolated precision."""
    all_tp = []
    for pred, _, gt in per_image:
        tp = np.zeros((len(THRESHOLDS), len(pred)), dtype=bool)
        if len(pred) and len(gt):
            iou = box_iou(pred, gt, inclusive=False)
            for ti, thr in enumerate(THRESHOLDS):
                free = np.ones(len(gt), dtype=bool)
                for d in range(len(pred)):  # at most top_k boxes per image
                    if (cand := np.where(free & (iou[d] >= thr), iou[d], -1.0)).max() >= 0:
                        tp[ti, d], free[np.argmax(cand)] = True, False
        all_tp.append(tp)
    scores = np.concatenate([scores for _, scores, _ in per_image])
    tp = np.concatenate(all_tp, axis=1)[:, np.argsort(-scores, kind="stable")]
    if tp.shape[1] == 0:
        return np.zeros(len(THRESHOLDS))
    tp_cum = np.cumsum(tp, axis=1)
    recall = tp_cum / n_gt
    envelope = np.maximum.accumulate((tp_cum / (tp_cum + np.cumsum(~tp, axis=1)))[:, ::-1], axis=1)[:, ::-1]
    idx = (recall[:, :, None] < np.linspace(0.0, 1.0, 101)).sum(axis=1)  # searchsorted(side="left") per row
    precision = np.take_along_axis(envelope, np.minimum(idx, tp.shape[1] - 1), axis=1)
    return np.where(idx < tp.shape[1], precision, 0.0).mean(axis=1)


def evaluate_nova(predictions: Mapping[str, list[dict]], records: list[dict], top_k: int | None = 5,
                  known_filenames: Sequence[str] | None = None) -> dict:
    """NOVA localisation metrics of ``predictions`` on the images of ``records`` (:func:`read_nova_metadata`).

    Every record counts (AP 0 without a prediction); predictions for ``known_filenames`` outside ``records`` are
    ignored, other unknown names raise a ValueError. ``top_k``: boxes kept per image (largest area for the
    reference protocol, highest score for the score-ranked AP; None = all). Returns ``{"reference": {mAP@30, mAP@50,
    mAP@50:95, ACC@50, TP@30, FP@30, GT@30}, "score_ranked": {AP@30, AP@50, AP@50:95}, "n_images", "per_image"}``.
    """
    if not records:
        raise ValueError("no NOVA images to evaluate (empty metadata, or the caption filter removed every row)")
    preds = _prediction_arrays(predictions, set(known_filenames or ()) | {r["filename"] for r in records})
    n_gt = int(sum(len(r["boxes"]) for r in records))
    if n_gt == 0:
        raise ValueError("the evaluated NOVA images have no ground-truth boxes; the metrics are undefined")
    aps, tps, fps, per_image, ranked_inputs = [], [], [], {}, []
    for rec in records:
        name, gt = rec["filename"], np.asarray(rec["boxes"], dtype=np.float64).reshape(-1, 4)
        boxes, scores = preds.get(name, (np.zeros((0, 4)), np.zeros(0)))
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        ap, tp = _reference_image(boxes[np.argsort(-area, kind="stable")[:top_k]], gt)
        aps.append(ap)
        tps.append(tp.sum(axis=1))
        fps.append(tp.shape[1] - tps[-1])
        per_image[name] = {"AP@30": float(ap[0]), "AP@50": float(ap[1]), "TP@30": int(tps[-1][0]),
                           "FP@30": int(fps[-1][0]), "GT": int(len(gt))}
        by_score = np.argsort(-scores, kind="stable")[:top_k]
        ranked_inputs.append((boxes[by_score], scores[by_score], gt))
    mean_ap, tps, fps = np.mean(aps, axis=0), np.array(tps), np.array(fps)  # THRESHOLDS index 0: 0.30, 1: 0.50
    ranked = _score_ranked_ap(ranked_inputs, n_gt)
    reference = {"mAP@30": float(mean_ap[0]), "mAP@50": float(mean_ap[1]), "mAP@50:95": float(mean_ap[1:].mean()),
                 "ACC@50": float(tps[:, 1].sum() / n_gt), "TP@30": int(tps[:, 0].sum()), "FP@30": int(fps[:, 0].sum()),
                 "GT@30": n_gt}
    score_ranked = {"AP@30": float(ranked[0]), "AP@50": float(ranked[1]), "AP@50:95": float(ranked[1:].mean())}
    return {"reference": reference, "score_ranked": score_ranked, "n_images": len(records), "per_image": per_image}


def tracked_metrics(metrics: Mapping) -> dict[str, float]:
    """The numbers of :func:`evaluate_nova` worth tracking: reference and score-ranked metrics, image count."""
    numbers = {**metrics["reference"], **{f"score_ranked/{k}": v for k, v in metrics["score_ranked"].items()},
               "n_images": metrics["n_images"]}
    return {k: float(v) for k, v in numbers.items()}


def evaluate_nova_files(predictions_file: str | os.PathLike, metadata_file: str | os.PathLike,
                        output_file: str | os.PathLike | None = None, caption_filter: str | None = "T2",
                        top_k: int | None = 5) -> dict:
    """:func:`evaluate_nova` of a predictions JSON ``{filename: [{x_min, y_min, x_max, y_max, score}, ...]}`` (max
    exclusive) against the metadata file; ``output_file`` is written atomically."""
    try:
        predictions = json.loads(Path(predictions_file).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{predictions_file}: not valid JSON ({e})") from e
    if not isinstance(predictions, dict):
        raise ValueError(f"{predictions_file}: expected a JSON object {{filename: [boxes]}}, "
                         f"got {type(predictions).__name__}")
    metrics = evaluate_nova(predictions, read_nova_metadata(metadata_file, caption_filter=caption_filter), top_k=top_k,
                            known_filenames=[row["filename"] for row in read_metadata_rows(metadata_file)])
    if output_file is not None:
        write_json_atomic(output_file, metrics)
    logger.info(f"NOVA evaluation on {metrics['n_images']} image(s): reference {metrics['reference']}, "
                f"score_ranked {metrics['score_ranked']}")
    return metrics
