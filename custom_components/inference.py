"""Anomaly maps for a user's own T2 NIfTI volumes (the cond_ddpm bundle's inference config). The volumes must be
skull-stripped, 1 mm, registered to the training atlas, one 3D volume per file (``inference_items`` checks them all
up front); the maps go back to the input's grid (``Invertd``) and are written beside an overlay, inputs only read."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from contextlib import suppress
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import CenterSpatialCrop, MapTransform
from monai.utils import convert_to_numpy

from custom_components import metrics as M
from custom_components.evaluation import atomic_save_nifti, checkpoint_path
from custom_components.transforms import CROP_SIZE

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
OUTPUT_SUFFIXES = ("_anomaly.nii.gz", "_seg.nii.gz", "_overlay.png")
SPACING_MM, SPACING_TOLERANCE = 1.0, 0.05
SHAPE_MIN, SHAPE_MAX = 96, 512  # voxels per axis of a 1 mm brain volume
MIN_BRAIN_VOXELS = 10_000  # 10 ml; an adult brain at 1 mm has about 1.2 million voxels
MODALITY_SUFFIXES = ("_t2", "_t1", "_flair", "_T2", "_T1", "_FLAIR", "_image", "_img")


class InputError(ValueError):
    """An input volume (or mask, threshold file) that the model cannot be run on, with the reason."""


def nifti_name(path) -> str:  # the file name without .nii.gz / .nii
    return re.sub(r"\.nii(\.gz)?$", "", Path(path).name)


def find_mask(image: Path, input_mask) -> Path | None:
    """The brain mask of ``image``: ``input_mask`` if a file, else in that folder ``X.nii.gz``, ``X_mask.nii.gz`` or X
    with its modality suffix replaced (``S_t2`` -> ``S_mask``). None without ``input_mask`` (mask = image > 0)."""
    if input_mask is None or str(input_mask).strip() == "":
        return None
    folder = Path(input_mask)
    if folder.is_file():
        return folder
    if not folder.is_dir():
        raise InputError(f"input_mask {folder}: no such file or folder.")
    stem = nifti_name(image)
    stems = [stem, f"{stem}_mask", *(f"{stem[: -len(s)]}_mask" for s in MODALITY_SUFFIXES if stem.endswith(s))]
    tried = [folder / f"{s}{ext}" for s in stems for ext in NIFTI_SUFFIXES]
    with suppress(StopIteration):
        return next(p for p in tried if p.is_file())
    raise InputError(f"{image}: no brain mask for it in {folder} (looked for {', '.join(p.name for p in tried)}).")


def _spatial_shape(shape) -> tuple[int, ...] | None:  # 3D, allowing trailing singleton axes; else None
    return tuple(int(n) for n in shape[:3]) if len(shape) >= 3 and all(n == 1 for n in shape[3:]) else None


def _read(path, label):
    try:
        return nib.load(str(path))
    except Exception as e:  # nibabel raises several types for unreadable files
        raise InputError(f"{label}: cannot be read as NIfTI ({e}).") from e


def check_volume(image_path, mask_path=None) -> dict:
    """Check that one input can be run: readable 3D NIfTI, 1 mm, plausible shape, finite, a brain (``mask > 0`` or
    ``image > 0``) with contrast, a mask on the image's grid. Returns the facts; raises ``InputError``."""
    image_path = Path(image_path)
    image = _read(image_path, image_path)
    shape = _spatial_shape(image.shape)
    if shape is None:
        raise InputError(f"{image_path}: is {len(image.shape)}D with shape {tuple(image.shape)}; the model takes one "
                         "3D volume per file (split 4D series into 3D files).")
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    if any(abs(s - SPACING_MM) > SPACING_TOLERANCE for s in spacing):
        raise InputError(f"{image_path}: voxel spacing {tuple(round(s, 3) for s in spacing)} mm; the model expects "
                         f"{SPACING_MM:g} mm isotropic volumes registered to the training atlas (tolerance "
                         f"{SPACING_TOLERANCE} mm). Resample / register the image first.")
    if any(not SHAPE_MIN <= n <= SHAPE_MAX for n in shape):
        raise InputError(f"{image_path}: shape {shape} is not that of a 1 mm brain volume "
                         f"(each axis {SHAPE_MIN}-{SHAPE_MAX} voxels expected).")
    data = np.asanyarray(image.dataobj).reshape(shape)
    if not np.isfinite(data).all():
        raise InputError(f"{image_path}: contains NaN or Inf values.")
    if mask_path is None:
        brain, empty = data > 0, "the image has no voxel > 0 (all zero or non-positive)"
    else:
        mask_path = Path(mask_path)
        mask = _read(mask_path, f"{mask_path} (mask of {image_path.name})")
        if _spatial_shape(mask.shape) != shape:
            raise InputError(f"{mask_path}: mask shape {tuple(mask.shape)} differs from its image "
                             f"{image_path.name} {shape}.")
        if not np.allclose(mask.affine, image.affine, atol=1e-3):
            raise InputError(f"{mask_path}: the mask's affine differs from that of its image {image_path.name}.")
        brain, empty = np.asanyarray(mask.dataobj).reshape(shape) > 0, f"its brain mask {mask_path.name} is empty"
    n_brain = int(np.count_nonzero(brain))
    if n_brain < MIN_BRAIN_VOXELS:
        why = f"only {n_brain} brain voxels (at least {MIN_BRAIN_VOXELS} expected for a brain)" if n_brain else empty
        raise InputError(f"{image_path}: contains no brain: {why}.")
    if float(data[brain].max()) <= float(data[brain].min()):
        raise InputError(f"{image_path}: the image is constant inside the brain; nothing to analyse.")
    kept = int(np.count_nonzero(brain[CenterSpatialCrop(CROP_SIZE).compute_slices(shape)]))
    if kept < 0.5 * n_brain:
        logger.warning("%s: %.0f%% of the brain lies outside the central %s crop the model sees; is the image "
                       "registered to the training atlas?", image_path, 100 * (1 - kept / n_brain), CROP_SIZE)
    return {"shape": shape, "spacing": spacing, "brain_voxels": n_brain, "axcodes": nib.aff2axcodes(image.affine)}


def inference_items(input, input_mask=None, output_dir=None) -> list[dict]:
    """The inputs (one NIfTI file, or a folder's, sorted, hidden files skipped), all checked, as data items ``{image,
    mask, name, source, source_mask, checked}``; one ``InputError`` lists all problems. Without a mask file ``mask`` is
    the image (binarised ``> 0``); no ``input`` gives [] (nothing configured yet; ``check_ready`` stops a run)."""
    if input is None or str(input).strip() == "":
        return []
    path = Path(input)
    if path.is_file():
        if not path.name.endswith(NIFTI_SUFFIXES):
            raise InputError(f"{path}: not a NIfTI file (expected .nii or .nii.gz).")
        images = [path]
    elif path.is_dir():
        images = sorted(p for p in path.iterdir()
                        if p.is_file() and not p.name.startswith(".") and p.name.endswith(NIFTI_SUFFIXES))
        if not images:
            raise InputError(f"{path}: the folder holds no .nii / .nii.gz file.")
        if input_mask is not None and Path(input_mask).resolve() == path.resolve():  # masks beside the images
            images = [p for p in images if not nifti_name(p).endswith("_mask")]
        if output_dir is not None and Path(output_dir).resolve() == path.resolve():
            raise InputError(f"output_dir {output_dir} is the input folder: choose another folder for the outputs, "
                             "so that the inputs stay untouched and outputs are never read back as inputs.")
    else:
        raise InputError(f"{path}: no such file or folder.")
    names = [nifti_name(p) for p in images]
    if duplicates := sorted({n for n in names if names.count(n) > 1}):
        raise InputError(f"{input}: several files share the name(s) {duplicates} (.nii and .nii.gz); keep one.")
    problems, items = [], []
    for image, name in zip(images, names):
        try:
            mask = find_mask(image, input_mask)
            check_volume(image, mask)
            items.append({"image": str(image), "mask": str(mask or image), "name": name, "source": str(image),
                          "source_mask": "" if mask is None else str(mask), "checked": True})
        except InputError as e:
            problems.append(str(e))
    if problems:
        raise InputError(f"{len(problems)} of {len(images)} input(s) cannot be used:\n  " + "\n  ".join(problems))
    if output_dir is not None:
        inputs = {Path(p).resolve() for item in items for p in (item["source"], item["source_mask"]) if p}
        for out in (Path(output_dir, item["name"] + s).resolve() for item in items for s in OUTPUT_SUFFIXES):
            if out in inputs:
                raise InputError(f"The output {out} would overwrite an input; choose another output_dir.")
    return items


def _lookup(tree, parts: list[str]):
    """``tree`` at a dotted key (split at its dots); a key with dots in it (``"0.05"``) matches whole, longest first."""
    for n in range(len(parts), 0, -1) if isinstance(tree, Mapping) else ():
        if (head := ".".join(parts[:n])) in tree:
            with suppress(KeyError):
                return _lookup(tree[head], parts[n:]) if n < len(parts) else tree[head]
    raise KeyError(".".join(parts))


def resolve_threshold(threshold, threshold_key: str = "Brats21.threshold") -> float:
    """A number, or the number at ``threshold_key`` (dotted, e.g. ``Brats21.threshold`` or
    ``IXI.fpr_thresholds.5%``) in the ``metrics.json`` that the evaluate config wrote."""
    text = str(threshold).strip()
    try:
        value = float(text)
    except ValueError:
        path = Path(text)
        if not path.is_file():
            raise InputError(f"threshold {text!r} is neither a number nor an existing metrics.json: run the evaluate "
                             "config first or pass --threshold VALUE.") from None
        try:
            tree = json.loads(path.read_text())
            value = _lookup(tree, str(threshold_key).split("."))
        except json.JSONDecodeError as e:
            raise InputError(f"threshold file {path} is not valid JSON ({e}).") from e
        except KeyError:
            raise InputError(f"threshold file {path} has no entry {threshold_key!r} "
                             f"(top-level keys: {sorted(tree)}).") from None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InputError(f"{path}: {threshold_key!r} is not a number ({value!r}).")
        value = float(value)
    if not math.isfinite(value) or value < 0:
        raise InputError(f"threshold must be a finite number >= 0, got {value}.")
    return value


def check_ready(items, ckpt_path=None, reconstruction="ddpm", threshold=None, threshold_key="Brats21.threshold"):
    """Inputs, checkpoint and threshold, checked before the first volume is processed. Returns the threshold."""
    if not items:
        raise InputError("No input given: pass --input with a NIfTI file or a folder of NIfTI files.")
    checkpoint_path(ckpt_path, reconstruction)
    return resolve_threshold(threshold, threshold_key)


class PrepareInputd(MapTransform):
    """Complete an item that holds only ``image`` (as MONAI Label sends it: ``mask`` = the image (> 0), ``name``,
    ``source``, ``source_mask``) and check it (``check_volume``) unless ``inference_items`` did."""

    def __init__(self) -> None:
        super().__init__("image")

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        image = str(d["image"])
        d.setdefault("source", image)
        d.setdefault("name", nifti_name(image))
        d["mask"] = d.get("mask") or image
        d.setdefault("source_mask", "" if d["mask"] == image else str(d["mask"]))
        if not d.get("checked"):
            check_volume(d["source"], d["source_mask"] or None)
            d["checked"] = True
        return d


class AnomalyMapd(MapTransform):
    """``anomaly`` = post-processed residual |image - pred| and ``seg`` = the segmentation the evaluation scores, (1, H,
    W, D) float32 with the image's metadata; ``threshold``: a number or a metrics.json, read on first use."""

    def __init__(self, threshold=0.5, threshold_key: str = "Brats21.threshold", median_size: int = 5) -> None:
        super().__init__("pred")
        self.threshold, self.threshold_key, self.median_size = threshold, threshold_key, median_size

    @cached_property
    def value(self) -> float:
        return resolve_threshold(self.threshold, self.threshold_key)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        mask = convert_to_numpy(d["mask"])[0]
        x, pred = (convert_to_numpy(d[k], dtype=np.float32)[0] for k in ("image", "pred"))
        anomaly = M.residual_map(x, pred, mask, self.median_size)
        seg = M.segment(anomaly, self.value, mask > 0).astype(np.float32)
        meta = d["image"].meta
        d["anomaly"], d["seg"] = (MetaTensor(torch.from_numpy(a)[None], meta=dict(meta)) for a in (anomaly, seg))
        d["threshold"] = self.value
        return d


class SaveAnomalyOutputsd(MapTransform):
    """Write ``<name>_anomaly.nii.gz``, ``<name>_seg.nii.gz`` (the input's header and affine, limited to its brain)
    and ``<name>_overlay.png`` for an item whose ``anomaly`` / ``seg`` are back on the input's grid (``Invertd``)."""

    def __init__(self, output_dir) -> None:
        super().__init__(("anomaly", "seg"))
        self.output_dir = Path(output_dir)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        source, name = Path(d["source"]), str(d["name"])
        image = nib.load(str(source))
        shape = _spatial_shape(image.shape)
        volume = np.asanyarray(image.dataobj).reshape(shape)
        mask_source = d.get("source_mask")
        brain = (np.asanyarray(nib.load(str(mask_source)).dataobj).reshape(shape) > 0) if mask_source else volume > 0
        # clipped: B-spline overshoot; times the brain: interpolation spreads the map slightly beyond it
        anomaly = np.clip(convert_to_numpy(d["anomaly"])[0], 0, 1).astype(np.float32) * brain
        seg = (convert_to_numpy(d["seg"])[0] > 0.5) & brain
        header = image.header.copy()
        header.set_data_shape(shape)
        anomaly_path, seg_path, overlay_path = (self.output_dir / f"{name}{s}" for s in OUTPUT_SUFFIXES)
        atomic_save_nifti(anomaly, image.affine, anomaly_path, header=header)
        atomic_save_nifti(seg.astype(np.uint8), image.affine, seg_path, header=header)
        logger.info("%s: %d anomalous voxels written to %s", source.name, int(seg.sum()), self.output_dir)
        d["anomaly_path"], d["seg_path"] = str(anomaly_path), str(seg_path)
        from custom_components.figures import plt, save_figure  # the overlay: matplotlib only here

        # the axial slice with the most segmented voxels (else the most anomaly): outline and map
        area = seg.sum(axis=(0, 1))
        z = int(np.argmax(area if area.max() > 0 else anomaly.sum(axis=(0, 1))))  # anomaly is 0 outside the brain
        image_slice, anomaly_slice, seg_slice = (np.rot90(a[:, :, z]) for a in (volume, anomaly, seg))
        vmax = float(np.percentile(volume[brain], 99.5))  # the brain is not empty (check_volume)
        fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
        titles = (f"segmentation at threshold {float(d['threshold']):.4g}", "anomaly map (residual)")
        for ax, title in zip(axes, titles):
            ax.imshow(image_slice, cmap="gray", vmin=0, vmax=vmax or 1)
            ax.axis("off")
            ax.set_title(title, fontsize=9)
        if seg_slice.any():
            axes[0].contour(seg_slice, levels=[0.5], colors="red", linewidths=0.8)
        shown = np.ma.masked_where(anomaly_slice <= 0, anomaly_slice)
        im = axes[1].imshow(shown, cmap="inferno", vmin=0, vmax=float(anomaly.max()) or 1.0, alpha=0.8)
        fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02)
        fig.suptitle(f"{name}, axial slice {z}", fontsize=10)
        save_figure(fig, overlay_path)
        return d
