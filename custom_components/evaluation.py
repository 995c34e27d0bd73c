"""The BraTS21 / MSLUB / IXI evaluation protocol as pieces a MONAI evaluator drives.

* ``VolumeReconstructionInferer``: all axial slices of a [0, 1] volume as one batch through a [-1, 1]
  slice inferer (``ReconstructionInferer``), back to a [0, 1] volume; ``reconstruction="none"`` gives
  an all-zero reconstruction, i.e. residual = intensity (the intensity baseline).
* ``evaluation_dataset``: the splits in protocol order (healthy IXI val, then each data set's val and
  test split), tagged with their role, from the cached preprocessed volumes.
* ``AnomalyProtocol``: per volume residual -> post-processing; pools healthy and val residuals, finds
  the thresholds, scores the test volumes one at a time (only pooled in-brain values stay in memory).
* ``AnomalyEvaluation``: the engine handler that feeds the protocol and writes ``metrics.json``,
  ``per_volume.csv``, optional NIfTI maps and a PNG grid per data set, and puts the summary into
  ``engine.state.metrics`` (what MONAI's ``--tracking mlflow`` handler logs).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch.utils.data import ConcatDataset

from custom_components import metrics as M
from custom_components.utils import (as_bool, atomic_path, check_choice, json_safe, mlflow_metric_name,
                                     write_json_atomic, write_text_atomic)

logger = logging.getLogger(__name__)

__all__ = [
    "RECONSTRUCTIONS",
    "THRESHOLD_METHODS",
    "VolumeReconstructionInferer",
    "checkpoint_path",
    "TagSplit",
    "evaluation_dataset",
    "AnomalyProtocol",
    "AnomalyEvaluation",
    "fpr_label",
    "flat_metrics",
    "atomic_save_nifti",
]

RECONSTRUCTIONS = ("ddpm", "none")
THRESHOLD_METHODS = ("bisection", "exact")
HEALTHY_DATASET = "IXI"
GRID_COLUMNS = ("input", "reconstruction", "residual", "prediction", "ground truth")


# ----------------------------------------------------------------------------------------------
# small shared helpers
# ----------------------------------------------------------------------------------------------


def fpr_label(rate: float) -> str:
    """The key of a false-positive-rate threshold in the outputs: 0.01 -> ``"1%"``."""
    return f"{float(rate) * 100:g}%"


def atomic_save_nifti(array: np.ndarray, affine: np.ndarray, path, header=None) -> Path:
    """Save ``array`` as NIfTI at ``path`` atomically; ``header`` (e.g. the input's) keeps its codes and units."""
    import nibabel as nib

    path = Path(path)
    header = header.copy() if header is not None else None
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64), header=header)
    image.set_data_dtype(np.asarray(array).dtype)
    if header is not None:  # nibabel would otherwise keep the input's scaling and intent
        image.header.set_slope_inter(None, None)
    with atomic_path(path, ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix) as tmp:
        nib.save(image, tmp)
    return path


def checkpoint_path(path, reconstruction: str = "ddpm") -> str | None:
    """``path`` when it is needed and exists; None for the intensity baseline; a clear error otherwise."""
    if check_choice("reconstruction", reconstruction, RECONSTRUCTIONS, lower=True) == "none":
        return None
    if path is None or not Path(path).is_file():
        raise FileNotFoundError(
            f"cond_ddpm checkpoint {path} does not exist: train the model first (train.yaml writes "
            "models/model.pt), pass --ckpt_path PATH, or run the intensity baseline with --reconstruction none."
        )
    return str(path)


# ----------------------------------------------------------------------------------------------
# reconstruction of whole volumes
# ----------------------------------------------------------------------------------------------


class VolumeReconstructionInferer(Inferer):
    """Reconstruct (N, 1, H, W, D) volumes in [0, 1]: the N*D axial slices form the batch of a slice inferer.

    The slice inferer (``ReconstructionInferer``) works in the diffusion range [-1, 1]: slices are scaled
    ``2x - 1`` on the way in and ``(y + 1) / 2`` clipped to [0, 1] on the way out, returned as float32.
    ``reconstruction="none"`` returns zeros without calling the network: the residual is then the
    intensity itself (the intensity baseline).
    """

    def __init__(self, slice_inferer: Inferer | None = None, reconstruction: str = "ddpm") -> None:
        super().__init__()
        self.reconstruction = check_choice("reconstruction", reconstruction, RECONSTRUCTIONS, lower=True)
        if self.reconstruction != "none" and slice_inferer is None:
            raise ValueError("VolumeReconstructionInferer needs a slice_inferer unless reconstruction is 'none'.")
        self.slice_inferer = slice_inferer

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        if inputs.ndim != 5:
            raise ValueError(
                f"VolumeReconstructionInferer expects (N, C, H, W, D) volumes, got shape {tuple(inputs.shape)}."
            )
        volumes = inputs.as_tensor() if isinstance(inputs, MetaTensor) else torch.as_tensor(inputs)
        volumes = volumes.float()  # a plain tensor: slice batches carry no volume metadata
        if self.reconstruction == "none":
            return torch.zeros_like(volumes)
        n, c, h, w, d = volumes.shape
        slices = volumes.permute(0, 4, 1, 2, 3).reshape(n * d, c, h, w)
        recon = self.slice_inferer(slices * 2 - 1, network, *args, **kwargs)
        recon = ((recon.float() + 1) / 2).clamp(0, 1)
        return recon.reshape(n, d, c, h, w).permute(0, 2, 3, 4, 1).contiguous()


# ----------------------------------------------------------------------------------------------
# the evaluation splits
# ----------------------------------------------------------------------------------------------


class TagSplit:
    """Add the split's name, data set and role to every sample (after the cache, so cache entries are shared)."""

    def __init__(self, split: str, dataset: str, role: str) -> None:
        self.tags = {"split": split, "dataset": dataset, "role": role}

    def __call__(self, data: Mapping) -> dict:
        return {**data, **self.tags}


def _check_eval_sets(eval_sets) -> list[str]:
    if isinstance(eval_sets, str):
        eval_sets = [eval_sets]
    eval_sets = [str(s) for s in (eval_sets or [])]
    if HEALTHY_DATASET in eval_sets:
        raise ValueError(f"eval_sets: {HEALTHY_DATASET} is the healthy reference (healthy_split), not a test set.")
    if len(set(eval_sets)) != len(eval_sets):
        raise ValueError(f"eval_sets lists a data set twice: {eval_sets}.")
    return eval_sets


def evaluation_dataset(
    dataset_dir,
    cache_dir,
    fold: int = 0,
    eval_sets: Sequence[str] = ("Brats21", "MSLUB"),
    mode: str = "t2",
    healthy_split: str | None = None,
    transform=None,
) -> ConcatDataset:
    """Preprocessed volumes in protocol order: ``IXI_val_fold{fold}`` (role ``healthy``), then for each data
    set ``{set}_val`` (role ``val``) and ``{set}_test`` (role ``test``).

    Each sample holds ``image``, ``mask``, ``seg`` (lesion sets), ``name``, ``split``, ``dataset`` and
    ``role``; the volumes come from (and go to) the same cache as training (``volume_dataset``).
    """
    from monai.transforms import Compose

    from custom_components.data import load_split, volume_dataset

    healthy_split = healthy_split or f"IXI_val_fold{int(fold)}"
    phases = [(healthy_split, HEALTHY_DATASET, "healthy")]
    for name in _check_eval_sets(eval_sets):
        phases += [(f"{name}_val", name, "val"), (f"{name}_test", name, "test")]
    parts = []
    for split, dataset, role in phases:
        items = load_split(dataset_dir, split, mode)
        if not items:
            raise ValueError(f"Split {split} of {dataset_dir} lists no volumes; the protocol needs it ({role}).")
        steps = [TagSplit(split, dataset, role)] + ([transform] if transform is not None else [])
        parts.append(volume_dataset(items, cache_dir, transform=Compose(steps)))
    return ConcatDataset(parts)


# ----------------------------------------------------------------------------------------------
# the protocol itself (numpy, no engine)
# ----------------------------------------------------------------------------------------------


def _mask_volume(array) -> np.ndarray:
    return np.asarray(array) > 0


class AnomalyProtocol:
    """Residuals in, protocol numbers out. Feed volumes with ``add`` in protocol order, then call ``finish``.

    * role ``healthy``: the in-brain residuals are pooled; at the first val/test volume they give the
      thresholds at ``fpr_rates`` voxel false-positive rate (``fpr_thresholds``), and the pool is freed;
    * role ``val``: in-brain residuals and labels are pooled per data set; at that set's first test volume
      the Dice-optimal threshold is searched with every method of ``THRESHOLD_METHODS`` (the protocol
      uses ``threshold_method``) and the pool is freed;
    * role ``test``: ``volume_metrics`` at the protocol threshold, ``threshold_metrics`` at the other
      method's threshold and at each FPR threshold; one row per volume.

    Volumes are (H, W, D) arrays in [0, 1] at model resolution; ``add`` returns
    ``{"residual", "prediction", "row"}`` for test volumes, None otherwise.
    """

    def __init__(
        self,
        threshold_method: str = "bisection",
        fpr_rates: Sequence[float] = M.DEFAULT_FPR_RATES,
        region: str = "brain",
        median_size: int = 5,
        bisection_steps: int = 10,
    ) -> None:
        check_choice("threshold_method", threshold_method, THRESHOLD_METHODS)
        check_choice("region", region, M.REGIONS)
        self.threshold_method, self.region, self.median_size = threshold_method, region, int(median_size)
        self.fpr_rates = tuple(float(r) for r in fpr_rates)
        self.bisection_steps = int(bisection_steps)
        self.healthy_split: str | None = None
        self._healthy: list[np.ndarray] | None = []
        self.fpr: dict[str, float] = {}
        self.n_healthy = 0
        self.n_healthy_voxels = 0
        self._val: dict[str, dict] = {}  # data set -> {"split", "values": [...], "labels": [...], "n"}
        self.thresholds: dict[str, dict] = {}  # data set -> threshold report
        self.rows: dict[str, list[dict]] = {}  # data set -> per-volume rows of its test split
        self.test_splits: dict[str, str] = {}

    # -- per volume ---------------------------------------------------------------------------

    def residual(self, image, reconstruction, brain_mask) -> np.ndarray:
        """The post-processed residual |x - x_hat| x eroded brain mask, 3D median filtered (float32)."""
        image = np.asarray(image, dtype=np.float32)
        reconstruction = np.asarray(reconstruction, dtype=np.float32)
        if image.shape != reconstruction.shape:
            raise ValueError(f"image / reconstruction: shapes differ, {image.shape} vs {reconstruction.shape}.")
        return M.postprocess_residual(np.abs(image - reconstruction), brain_mask, self.median_size)

    def add(self, role: str, dataset: str, split: str, name: str, image, reconstruction, brain_mask, seg=None):
        """Process one volume; for ``test`` volumes return ``{"residual", "prediction", "row"}``."""
        try:
            residual = self.residual(image, reconstruction, brain_mask)
        except ValueError as e:
            raise ValueError(f"{split} volume {name}: {e}") from e
        mask = _mask_volume(brain_mask)
        if role == "healthy":
            self._add_healthy(split, residual, mask)
            return None
        self._finish_healthy()
        if role == "val":
            self._add_val(dataset, split, name, residual, mask, seg)
            return None
        if role == "test":
            return self._score(dataset, split, name, residual, mask, seg)
        raise ValueError(f"{split} volume {name}: role must be healthy, val or test, got {role!r}.")

    def _add_healthy(self, split: str, residual: np.ndarray, mask: np.ndarray) -> None:
        if self._healthy is None:
            raise ValueError(f"Healthy volumes of {split} arrived after the FPR thresholds were fixed: "
                             "the healthy split must come first.")
        self.healthy_split = self.healthy_split or split
        self._healthy.append(residual[mask])
        self.n_healthy += 1

    def _finish_healthy(self) -> None:
        if self._healthy is None:
            return
        if not self._healthy:
            raise ValueError("No healthy volume came before the lesion data sets: the FPR thresholds need the "
                             "healthy IXI validation split first.")
        values = np.concatenate(self._healthy)
        self._healthy = None
        self.n_healthy_voxels = int(values.size)
        if values.size == 0:
            raise ValueError(
                f"The brain masks of {self.healthy_split} are empty: no healthy voxel to set FPR thresholds."
            )
        found = M.fpr_thresholds(values.reshape(-1, 1, 1), np.ones((values.size, 1, 1), bool), self.fpr_rates)
        self.fpr = {fpr_label(rate): t for rate, t in found.items()}

    def _add_val(self, dataset: str, split: str, name: str, residual, mask, seg) -> None:
        if dataset in self.thresholds:
            raise ValueError(f"{split} volume {name} arrived after the {dataset} threshold was fixed: "
                             "a data set's val split must come before its test split.")
        if seg is None:
            raise ValueError(f"{split} volume {name} has no segmentation: a val split needs lesion labels.")
        pool = self._val.setdefault(dataset, {"split": split, "values": [], "labels": [], "n": 0})
        pool["values"].append(residual[mask])
        pool["labels"].append(_mask_volume(seg)[mask])
        pool["n"] += 1

    def _finish_threshold(self, dataset: str) -> dict:
        if dataset in self.thresholds:
            return self.thresholds[dataset]
        pool = self._val.pop(dataset, None)
        if pool is None or pool["n"] == 0:
            raise ValueError(f"No {dataset} validation volume came before its test split: the threshold is "
                             f"searched on {dataset}_val first.")
        values, labels = np.concatenate(pool["values"]), np.concatenate(pool["labels"])
        report = {"split": pool["split"], "n_volumes": pool["n"], "n_voxels": int(values.size),
                  "lesion_voxels": int(np.count_nonzero(labels)), "methods": {}}
        for method in THRESHOLD_METHODS:
            dice, threshold = M.find_best_threshold(values, labels, method=method, steps=self.bisection_steps)
            report["methods"][method] = {"threshold": float(threshold), "val_dice": float(dice)}
        if report["lesion_voxels"] == 0:
            logger.warning("%s: the validation split has no lesion voxel in the brain; its threshold is the "
                           "largest residual.", dataset)
        self.thresholds[dataset] = report
        return report

    def _score(self, dataset: str, split: str, name: str, residual, mask, seg) -> dict:
        report = self._finish_threshold(dataset)
        self.test_splits.setdefault(dataset, split)
        if seg is None:
            seg = np.zeros(residual.shape, bool)
        threshold = report["methods"][self.threshold_method]["threshold"]
        try:
            row = M.volume_metrics(residual, seg, mask, threshold, region=self.region)
        except ValueError as e:
            raise ValueError(f"{split} volume {name}: {e}") from e
        row = {"dataset": dataset, "split": split, "name": name, "threshold": threshold, **row}
        for method in THRESHOLD_METHODS:
            if method != self.threshold_method:
                other = M.threshold_metrics(residual, seg, mask, report["methods"][method]["threshold"], self.region)
                row.update({f"{method}_{k}": v for k, v in other.items()})
        for label, t in self.fpr.items():
            at = M.threshold_metrics(residual, seg, mask, t, self.region)
            row.update({f"fpr{label}_{k}": v for k, v in at.items()})
        self.rows.setdefault(dataset, []).append(row)
        prediction = M.remove_small_components(residual > np.float32(threshold))
        if self.region == "brain":
            prediction &= mask
        return {"residual": residual, "prediction": prediction, "row": row}

    # -- summary ------------------------------------------------------------------------------

    def finish(self) -> dict:
        """The metrics.json content (without settings): healthy FPR thresholds and, per data set, the
        thresholds and how they were found, mean/std/n of every metric, and the metrics at the other
        method's and at the FPR thresholds."""
        self._finish_healthy()
        for dataset in list(self._val):  # val split without test split: report its threshold anyway
            self._finish_threshold(dataset)
        out: dict[str, Any] = {
            HEALTHY_DATASET: {
                "split": self.healthy_split,
                "n_volumes": self.n_healthy,
                "n_voxels": self.n_healthy_voxels,
                "fpr_thresholds": dict(self.fpr),
            }
        }
        for dataset, report in self.thresholds.items():
            rows = self.rows.get(dataset, [])
            summary = M.summarize(rows)
            prefixes = tuple(f"{m}_" for m in THRESHOLD_METHODS) + tuple(f"fpr{label}_" for label in self.fpr)
            main = {k: v for k, v in summary.items() if k != "threshold" and not k.startswith(prefixes)}
            chosen = report["methods"][self.threshold_method]
            entry = {
                "threshold": chosen["threshold"],
                "threshold_method": self.threshold_method,
                "val_dice": chosen["val_dice"],
                "thresholds": {
                    **report["methods"],
                    "found_on": report["split"],
                    "n_val_volumes": report["n_volumes"],
                    "n_val_voxels": report["n_voxels"],
                    "val_lesion_voxels": report["lesion_voxels"],
                    "search": f"Dice-optimal threshold on the pooled in-brain residuals of {report['split']}; "
                              f"bisection: the reference's {self.bisection_steps}-step interval halving; "
                              "exact: optimum over all distinct residual values",
                },
                "test_split": self.test_splits.get(dataset),
                "n_test_volumes": len(rows),
                "metrics": main,
            }
            for method in THRESHOLD_METHODS:
                if method != self.threshold_method:
                    entry[f"metrics_at_{method}"] = {
                        k[len(method) + 1 :]: v for k, v in summary.items() if k.startswith(f"{method}_")
                    }
            entry["fpr"] = {
                label: {
                    "threshold": t,
                    "metrics": {k[len(f"fpr{label}_"):]: v for k, v in summary.items() if k.startswith(f"fpr{label}_")},
                }
                for label, t in self.fpr.items()
            }
            out[dataset] = entry
        return out

    def all_rows(self) -> list[dict]:
        return [row for rows in self.rows.values() for row in rows]


def flat_metrics(results: Mapping) -> dict[str, float]:
    """The numbers worth tracking, flattened to MLflow-safe names (``Brats21/dice``, ``Brats21/fpr5pct/dice``)."""
    flat: dict[str, float] = {}

    def put(key: str, value) -> None:
        if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and math.isfinite(float(value)):
            flat[mlflow_metric_name(key)] = float(value)

    for label, t in results.get(HEALTHY_DATASET, {}).get("fpr_thresholds", {}).items():
        put(f"{HEALTHY_DATASET}/fpr{label}_threshold", t)
    for dataset, entry in results.items():
        if dataset in (HEALTHY_DATASET, "settings"):
            continue
        put(f"{dataset}/threshold", entry["threshold"])
        put(f"{dataset}/val_dice", entry["val_dice"])
        for method in THRESHOLD_METHODS:
            put(f"{dataset}/{method}_threshold", entry["thresholds"][method]["threshold"])
        for metric, stats in entry["metrics"].items():
            put(f"{dataset}/{metric}", stats["mean"])
        for method in THRESHOLD_METHODS:
            for metric, stats in entry.get(f"metrics_at_{method}", {}).items():
                put(f"{dataset}/{method}/{metric}", stats["mean"])
        for label, fpr in entry["fpr"].items():
            for metric, stats in fpr["metrics"].items():
                put(f"{dataset}/fpr{label}/{metric}", stats["mean"])
    return flat


# ----------------------------------------------------------------------------------------------
# the engine handler and its outputs
# ----------------------------------------------------------------------------------------------


def _numpy_volume(tensor) -> np.ndarray:
    """(1, H, W, D) tensor -> (H, W, D) float32 numpy array."""
    array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    if array.ndim == 4:
        array = array[0]
    return array.astype(np.float32, copy=False)


def _affine(tensor, index: int) -> np.ndarray:
    affine = getattr(tensor, "affine", None)
    if affine is None:
        return np.eye(4)
    affine = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
    return affine[index] if affine.ndim == 3 else affine


class AnomalyEvaluation:
    """Evaluator handler: feeds ``AnomalyProtocol`` with every volume and writes the results to ``output_dir``.

    Per iteration (a batch of preprocessed volumes from ``evaluation_dataset``, the engine output
    ``pred`` = reconstruction in [0, 1]) each volume is processed; at the end of the run it writes
    ``metrics.json``, ``per_volume.csv`` and ``<dataset>_grid.png`` (the ``grid_slices`` test volumes with
    the largest lesions, their largest-lesion slice: input / reconstruction / residual / prediction /
    ground truth), with ``save_maps`` also ``maps/<dataset>/<name>_{residual,mask,pred,seg}.nii.gz`` per
    test volume (model grid, affine of the preprocessed volume), and sets ``engine.state.metrics``.
    """

    def __init__(
        self,
        output_dir,
        threshold_method: str = "bisection",
        fpr_rates: Sequence[float] = M.DEFAULT_FPR_RATES,
        save_maps: bool = False,
        grid_slices: int = 6,
        region: str = "brain",
        settings: Mapping | None = None,
        pred_key: str = "pred",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.protocol = AnomalyProtocol(threshold_method=threshold_method, fpr_rates=fpr_rates, region=region)
        self.save_maps, self.grid_slices, self.pred_key = as_bool(save_maps), int(grid_slices), pred_key
        self.settings = dict(settings or {})
        self._grid: dict[str, list] = {}
        self.results: dict | None = None

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def iteration_completed(self, engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(batch, list) or isinstance(output, list):
            raise ValueError("AnomalyEvaluation needs the evaluator to run with decollate=False.")
        images, recons = batch["image"], output[self.pred_key]
        for i in range(images.shape[0]):
            seg = batch["seg"][i] if "seg" in batch else None
            image = _numpy_volume(images[i])
            recon = _numpy_volume(recons[i])
            mask = _numpy_volume(batch["mask"][i]) > 0
            seg_volume = None if seg is None else _numpy_volume(seg) > 0
            dataset, name = batch["dataset"][i], batch["name"][i]
            result = self.protocol.add(batch["role"][i], dataset, batch["split"][i], name,
                                       image, recon, mask, seg_volume)
            if result is None:
                continue
            if self.save_maps:
                self._save_maps(dataset, name, result, mask, seg_volume, _affine(images, i))
            self._grid_candidate(dataset, name, image, recon, result, seg_volume)

    def _save_maps(self, dataset: str, name: str, result: dict, mask, seg, affine) -> None:
        folder = self.output_dir / "maps" / dataset
        atomic_save_nifti(result["residual"].astype(np.float32), affine, folder / f"{name}_residual.nii.gz")
        atomic_save_nifti(mask.astype(np.uint8), affine, folder / f"{name}_mask.nii.gz")
        atomic_save_nifti(result["prediction"].astype(np.uint8), affine, folder / f"{name}_pred.nii.gz")
        if seg is not None:
            atomic_save_nifti(seg.astype(np.uint8), affine, folder / f"{name}_seg.nii.gz")

    def _grid_candidate(self, dataset: str, name: str, image, recon, result: dict, seg) -> None:
        """Keep the ``grid_slices`` volumes with the largest lesion slice (their slices only, 2D)."""
        if self.grid_slices <= 0:
            return
        area = seg.sum(axis=(0, 1)) if seg is not None else np.zeros(image.shape[2])
        z = int(np.argmax(area)) if area.max() > 0 else image.shape[2] // 2
        seg_slice = seg[:, :, z] if seg is not None else np.zeros(image.shape[:2], bool)
        entry = (float(area[z]), len(self.protocol.rows.get(dataset, [])), name, z,
                 [image[:, :, z], recon[:, :, z], result["residual"][:, :, z], result["prediction"][:, :, z],
                  seg_slice])
        heap = self._grid.setdefault(dataset, [])
        if len(heap) < self.grid_slices:
            heapq.heappush(heap, entry)
        else:
            heapq.heappushpop(heap, entry)

    def epoch_completed(self, engine) -> None:
        results = self.protocol.finish()
        results["settings"] = json_safe({
            **self.settings,
            "threshold_method": self.protocol.threshold_method,
            "fpr_rates": list(self.protocol.fpr_rates),
            "region": self.protocol.region,
            "median_size": self.protocol.median_size,
        })
        self.results = results
        self.write(results)
        engine.state.metrics.update(flat_metrics(results))

    def write(self, results: dict) -> None:
        import pandas as pd

        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.output_dir / "metrics.json", results)
        write_text_atomic(self.output_dir / "per_volume.csv", pd.DataFrame(self.protocol.all_rows()).to_csv(index=False))
        for dataset, entries in self._grid.items():
            threshold = results.get(dataset, {}).get("threshold")
            self._write_grid(dataset, sorted(entries, reverse=True), threshold)
        logger.info("Evaluation written to %s", self.output_dir)

    def _write_grid(self, dataset: str, entries: list, threshold) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from custom_components.preview import save_figure

        rows = len(entries)
        fig, axes = plt.subplots(rows, len(GRID_COLUMNS), figsize=(2.0 * len(GRID_COLUMNS), 2.1 * rows),
                                 squeeze=False)
        vmax = max(float(e[4][2].max()) for e in entries) or 1.0
        for r, (area, _, name, z, panels) in enumerate(entries):
            for c, (title, panel) in enumerate(zip(GRID_COLUMNS, panels)):
                ax = axes[r, c]
                ax.axis("off")
                if c == 2:
                    ax.imshow(np.rot90(panel), cmap="inferno", vmin=0, vmax=vmax)
                else:
                    ax.imshow(np.rot90(panel.astype(np.float32)), cmap="gray", vmin=0, vmax=1)
                if r == 0:
                    ax.set_title(title, fontsize=8)
            axes[r, 0].text(-0.04, 0.5, f"{name}\nz={z}", transform=axes[r, 0].transAxes, rotation=90,
                            fontsize=6, ha="right", va="center")
        t = "n/a" if threshold is None else f"{threshold:.4g}"
        fig.suptitle(f"{dataset}: largest lesions (threshold {t}, residual scale 0-{vmax:.3g})", fontsize=9)
        save_figure(fig, self.output_dir / f"{dataset}_grid.png")
