"""The model-free half of the BraTS21 / MSLUB / IXI evaluation: score a maps folder (``SaveMaps``) under a protocol.

1. per volume the residual |image - reconstruction| (reconstruction clipped to [0, 1] when ``clamp``), post-processed
   by ``metrics.postprocess_residual``; 2. the healthy IXI val split gives the thresholds at 1 / 5 / 10 % voxel FPR;
3. per lesion data set the Dice-optimal threshold on its pooled val split (both search methods, the protocol uses
   ``threshold_method``), then the per-volume metrics of its test split (also at the other method's and the FPR
   thresholds, Hausdorff only at the protocol's, as the reference); 4. IXI_test: mean L1 / L2 error, unmasked.
``region``: the voxels that count (``volume``: all, as the reference; ``brain``: the brain mask). Writes
``metrics.json``, ``per_volume.csv`` and one ``<dataset>_grid.png`` per lesion data set.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from custom_components import metrics as M
from custom_components.evaluation import MANIFEST
from custom_components.utils import (as_bool, check_choice, json_safe, mlflow_metric_name, write_json_atomic,
                                     write_text_atomic)

logger = logging.getLogger(__name__)

PROTOCOLS = ("reference", "project")
THRESHOLD_METHODS = ("bisection", "exact")
HEALTHY_DATASET = "IXI"
GRID_COLUMNS = ("input", "reconstruction", "residual", "prediction", "ground truth")


def fpr_label(rate: float) -> str:
    """The key of a false-positive-rate threshold in the outputs: 0.01 -> ``"1%"``."""
    return f"{float(rate) * 100:g}%"


def reconstruction_errors(image, reconstruction, seg=None) -> dict[str, float]:
    """Mean L1 and L2 (squared) error over the whole volume, and inside / outside the lesion when there is one."""
    diff = (np.asarray(image, np.float64) - np.asarray(reconstruction, np.float64)).ravel()
    lesion = np.zeros(diff.size, bool) if seg is None else np.asarray(seg).ravel() > 0
    parts = {"": diff, "_lesion": diff[lesion], "_healthy": diff[~lesion]}
    return {f"l{p}{part}": float((np.abs(d) ** p).mean()) if d.size else math.nan
            for part, d in parts.items() for p in (1, 2)}


def _write_grid(entries: list, path: Path, title: str) -> None:
    """One row of panels per entry (area, rank, name, z, slices), the largest lesion slices of the test volumes."""
    if entries:
        from custom_components.figures import plt, save_figure

        fig, axes = plt.subplots(len(entries), len(GRID_COLUMNS), figsize=(2.0 * len(GRID_COLUMNS), 2.1 * len(entries)),
                                 squeeze=False)
        vmax = max(float(e[4][2].max()) for e in entries) or 1.0
        for r, (_, _, name, z, panels) in enumerate(entries):
            for c, (column, panel) in enumerate(zip(GRID_COLUMNS, panels)):
                cmap, top = ("inferno", vmax) if c == 2 else ("gray", 1.0)
                axes[r, c].axis("off")
                axes[r, c].imshow(np.rot90(panel), cmap=cmap, vmin=0, vmax=top)
                if r == 0:
                    axes[r, c].set_title(column, fontsize=8)
            axes[r, 0].text(-0.04, 0.5, f"{name}\nz={z}", transform=axes[r, 0].transAxes, rotation=90,
                            fontsize=6, ha="right", va="center")
        fig.suptitle(f"{title} (residual scale 0-{vmax:.3g})", fontsize=9)
        save_figure(fig, path)


def score_maps(maps_dir, output_dir, protocol: str = "reference", region: str | None = None, clamp: bool | None = None,
               threshold_method: str = "bisection", fpr_rates: Sequence[float] = M.DEFAULT_FPR_RATES,
               baseline: bool = False, grid_slices: int = 6, median_size: int = 5, bisection_steps: int = 10) -> dict:
    """Score the maps folder ``maps_dir`` into ``output_dir``; returns metrics.json's content. ``region`` and ``clamp``
    default to the ``protocol``'s (reference: every voxel, no clamp; project: brain voxels, clipped to [0, 1]).
    ``baseline``: the intensity baseline, residual = image."""
    import nibabel as nib
    import pandas as pd

    check_choice("protocol", protocol, PROTOCOLS)
    region = region or ("volume" if protocol == "reference" else "brain")
    clamp = (protocol != "reference") if clamp is None else as_bool(clamp, "clamp")
    baseline = as_bool(baseline, "baseline")
    check_choice("region", region, M.REGIONS)
    check_choice("threshold_method", threshold_method, THRESHOLD_METHODS)
    path = Path(maps_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {maps_dir} is not a finished maps folder. Write one with "
                                "cond_ddpm's evaluate.yaml (--output_dir MAPS_DIR), then score it.")
    manifest = json.loads(path.read_text())
    if not isinstance(manifest.get("splits"), dict):
        raise ValueError(f"{path} lists no splits.")
    splits, output_dir = manifest["splits"], Path(output_dir)
    settings = {"maps_dir": str(maps_dir), "protocol": protocol, "region": region, "clamp": clamp,
                "threshold_method": threshold_method, "fpr_rates": [float(r) for r in fpr_rates],
                "baseline": bool(baseline), "median_size": median_size, "bisection_steps": bisection_steps,
                "maps": manifest.get("settings", {})}

    def volumes(split: str) -> Iterator[dict]:
        """Per volume its maps (a missing seg is None: healthy), residual and the voxels that count (roi)."""
        for name in splits[split]["volumes"]:
            item = {"name": name}
            for kind in ("image", "mask", "seg") if baseline else ("image", "reconstruction", "mask", "seg"):
                path = Path(maps_dir) / split / f"{name}_{kind}.nii.gz"
                if not path.is_file() and kind != "seg":
                    raise FileNotFoundError(f"{path} is missing from the maps folder {maps_dir}.")
                item[kind] = np.asanyarray(nib.load(str(path)).dataobj) if path.is_file() else None
            if baseline:  # the reconstruction is not read: zero by definition
                item["reconstruction"] = np.zeros_like(item["image"])
            elif clamp:
                item["reconstruction"] = np.clip(item["reconstruction"], 0, 1)
            item["residual"] = M.residual_map(item["image"], item["reconstruction"], item["mask"], median_size)
            item["roi"] = item["mask"] > 0 if region == "brain" else np.ones(item["mask"].shape, bool)
            yield item

    by_role: dict[tuple[str, str], str] = {}
    for split, entry in splits.items():
        role = next((role for role in ("val", "test") if f"_{role}" in split), None)
        if role is None:
            raise ValueError(f"Split {split} is neither a val nor a test split.")
        key = (entry["dataset"], role)
        if key in by_role:
            raise ValueError(f"{maps_dir}: two {key[1]} splits of {key[0]} ({by_role[key]}, {split}).")
        by_role[key] = split

    results, rows = {"settings": settings}, []
    fpr: dict[str, float] = {}
    healthy = by_role.get((HEALTHY_DATASET, "val"))
    if healthy:
        pooled = [item["residual"][item["roi"]] for item in volumes(healthy)]
        fpr = {fpr_label(rate): t for rate, t in M.thresholds_at_fpr(np.concatenate(pooled), fpr_rates).items()}
        results[HEALTHY_DATASET] = {"split": healthy, "n_volumes": len(pooled),
                                    "n_voxels": int(sum(map(len, pooled))), "fpr_thresholds": fpr}
    for (dataset, role), val_split in by_role.items():
        if dataset == HEALTHY_DATASET or role != "val":
            continue
        values, labels = [], []
        for item in volumes(val_split):
            if item["seg"] is None:
                raise ValueError(f"{val_split} volume {item['name']} has no segmentation: val needs lesion labels.")
            values.append(item["residual"][item["roi"]])
            labels.append(item["seg"][item["roi"]] > 0)
        values, labels = np.concatenate(values), np.concatenate(labels)
        found = {m: M.find_best_threshold(values, labels, method=m, steps=bisection_steps) for m in THRESHOLD_METHODS}
        methods = {m: {"threshold": float(t), "val_dice": float(d)} for m, (d, t) in found.items()}
        chosen = methods[threshold_method]
        entry = {"threshold": chosen["threshold"], "threshold_method": threshold_method, "val_dice": chosen["val_dice"],
                 "thresholds": {**methods, "found_on": val_split, "n_val_volumes": len(splits[val_split]["volumes"]),
                                "n_val_voxels": int(values.size), "val_lesion_voxels": int(labels.sum())}}
        del values, labels
        other_thresholds = {**{f"{m}_": found["threshold"] for m, found in methods.items() if m != threshold_method},
                            **{f"fpr{label}_": t for label, t in fpr.items()}}
        test_split = by_role.get((dataset, "test"))
        grid, test_rows = [], []
        for item in volumes(test_split) if test_split else ():
            seg = item["seg"] if item["seg"] is not None else np.zeros(item["image"].shape, bool)
            try:
                row = M.volume_metrics(item["residual"], seg, item["mask"], chosen["threshold"], region=region)
            except ValueError as e:
                raise ValueError(f"{test_split} volume {item['name']}: {e}") from e
            row = {"dataset": dataset, "split": test_split, "name": item["name"], "threshold": chosen["threshold"],
                   **row, **reconstruction_errors(item["image"], item["reconstruction"], seg)}
            for prefix, t in other_thresholds.items():  # no Hausdorff: the slow one, as in the reference
                at = M.threshold_metrics(item["residual"], seg, item["mask"], t, region, hausdorff=False)
                row.update({f"{prefix}{k}": v for k, v in at.items()})
            test_rows.append(row)
            prediction = M.segment(item["residual"], chosen["threshold"], item["roi"])
            if item["seg"] is not None and grid_slices > 0:  # keep the grid_slices largest lesion slices
                area = item["seg"].sum(axis=(0, 1))
                z = int(np.argmax(area))
                panels = [a[:, :, z].astype(np.float32)
                          for a in (item["image"], item["reconstruction"], item["residual"], prediction, seg)]
                grid = sorted([*grid, (float(area[z]), len(grid), item["name"], z, panels)], reverse=True)[:grid_slices]
        summary, others = M.summarize(test_rows), tuple(other_thresholds)
        entry.update(test_split=test_split, n_test_volumes=len(test_rows),
                     metrics={k: v for k, v in summary.items() if k != "threshold" and not k.startswith(others)})
        entry.update({f"metrics_at_{m}": _prefixed(summary, f"{m}_") for m in methods if m != threshold_method})
        entry["fpr"] = {label: {"threshold": t, "metrics": _prefixed(summary, f"fpr{label}_")}
                        for label, t in fpr.items()}
        results[dataset] = entry
        rows += test_rows
        _write_grid(grid, output_dir / f"{dataset}_grid.png",
                    f"{dataset}: largest lesions, threshold {chosen['threshold']:.4g}, {protocol} protocol")
    ixi_test = by_role.get((HEALTHY_DATASET, "test"))
    if ixi_test:
        test_rows = []
        for item in volumes(ixi_test):
            errors = reconstruction_errors(item["image"], item["reconstruction"])
            test_rows.append({"dataset": HEALTHY_DATASET, "split": ixi_test, "name": item["name"], "l1": errors["l1"],
                              "l2": errors["l2"],
                              "volume_score": float(item["residual"][item["mask"] > 0].mean(dtype=np.float64))})
        results.setdefault(HEALTHY_DATASET, {}).update(test_split=ixi_test, n_test_volumes=len(test_rows),
                                                       metrics=M.summarize(test_rows))
        rows += test_rows
    results = json_safe(results)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(output_dir / "metrics.json", results)
    write_text_atomic(output_dir / "per_volume.csv", pd.DataFrame(rows).to_csv(index=False))
    logger.info("Scores of %s (%s protocol) written to %s", maps_dir, protocol, output_dir)
    return results


def _prefixed(summary: Mapping, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in summary.items() if k.startswith(prefix)}


def flat_metrics(results: Mapping) -> dict[str, float]:
    """The numbers worth tracking, flattened to MLflow-safe names (``Brats21/dice``, ``Brats21/fpr5pct/dice``)."""
    flat: dict[str, float] = {}

    def put(key: str, value) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
            flat[mlflow_metric_name(key)] = float(value)

    def put_means(prefix: str, summary: Mapping) -> None:
        for metric, stats in summary.items():
            put(f"{prefix}{metric}", stats["mean"])

    healthy = results.get(HEALTHY_DATASET, {})
    for label, t in healthy.get("fpr_thresholds", {}).items():
        put(f"{HEALTHY_DATASET}/fpr{label}_threshold", t)
    put_means(f"{HEALTHY_DATASET}/", healthy.get("metrics", {}))
    for dataset, entry in results.items():
        if dataset in (HEALTHY_DATASET, "settings"):
            continue
        put(f"{dataset}/threshold", entry["threshold"])
        put(f"{dataset}/val_dice", entry["val_dice"])
        for method in THRESHOLD_METHODS:
            put(f"{dataset}/{method}_threshold", entry["thresholds"][method]["threshold"])
        put_means(f"{dataset}/", entry["metrics"])
        for method in THRESHOLD_METHODS:
            put_means(f"{dataset}/{method}/", entry.get(f"metrics_at_{method}", {}))
        for label, fpr in entry["fpr"].items():
            put_means(f"{dataset}/fpr{label}/", fpr["metrics"])
    return flat
