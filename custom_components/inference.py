"""Anomaly maps for a user's own T2 NIfTI volumes (the cond_ddpm bundle's inference config).

The volumes must look like the training data: skull-stripped, 1 mm, registered to the training atlas, one
3D volume per file. ``inference_items`` checks every input up front and raises one ``InputError`` naming
each bad file and its problem. The volumes are preprocessed like training, reconstructed, and the
post-processed residual and its segmentation at a threshold are brought back to the input's own grid with
MONAI's ``Invertd`` (undoing the resampling and the crop/pad), then written atomically:
``<name>_anomaly.nii.gz`` (float32 residual), ``<name>_seg.nii.gz`` (uint8 0/1) and ``<name>_overlay.png``.
Input files are only read.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import CenterSpatialCrop, MapTransform
from monai.utils import convert_to_numpy

from custom_components import metrics as M
from custom_components.evaluation import atomic_save_nifti, checkpoint_path
from custom_components.transforms import CROP_SIZE

logger = logging.getLogger(__name__)

__all__ = [
    "InputError",
    "nifti_name",
    "list_inputs",
    "find_mask",
    "check_volume",
    "inference_items",
    "resolve_threshold",
    "check_ready",
    "PrepareInputd",
    "AnomalyMapd",
    "AnomalySegmentd",
    "SaveAnomalyOutputsd",
]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SPACING_MM = 1.0
SPACING_TOLERANCE = 0.05
SHAPE_RANGE = (96, 512)  # voxels per axis of a 1 mm brain volume
MIN_BRAIN_VOXELS = 10_000  # 10 ml; an adult brain at 1 mm has about 1.2 million voxels
MODALITY_SUFFIXES = ("_t2", "_t1", "_flair", "_T2", "_T1", "_FLAIR", "_image", "_img")


class InputError(ValueError):
    """An input volume (or mask, threshold file) that the model cannot be run on, with the reason."""


def nifti_name(path) -> str:
    """The file name without ``.nii.gz`` / ``.nii``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_nifti(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.name.endswith(NIFTI_SUFFIXES)


def list_inputs(input_path) -> list[Path]:
    """One NIfTI file, or the NIfTI files of a folder (sorted, hidden files skipped)."""
    if input_path is None or str(input_path).strip() == "":
        raise InputError("No input given: pass --input with a NIfTI file or a folder of NIfTI files.")
    path = Path(input_path)
    if path.is_file():
        if not path.name.endswith(NIFTI_SUFFIXES):
            raise InputError(f"{path}: not a NIfTI file (expected .nii or .nii.gz).")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _is_nifti(p))
        if not files:
            raise InputError(f"{path}: the folder holds no .nii / .nii.gz file.")
        return files
    raise InputError(f"{path}: no such file or folder.")


def find_mask(image: Path, input_mask) -> Path | None:
    """The brain mask of ``image``: ``input_mask`` itself when it is a file, else the file in that folder
    named like the image (``X.nii.gz``), ``X_mask.nii.gz``, or with the modality suffix replaced
    (``S_t2.nii.gz`` -> ``S_mask.nii.gz``). None without ``input_mask`` (the mask is then image > 0)."""
    if input_mask is None or str(input_mask).strip() == "":
        return None
    folder = Path(input_mask)
    if folder.is_file():
        return folder
    if not folder.is_dir():
        raise InputError(f"input_mask {folder}: no such file or folder.")
    stem = nifti_name(image)
    stems = [stem, f"{stem}_mask"]
    for suffix in MODALITY_SUFFIXES:
        if stem.endswith(suffix):
            stems.append(f"{stem[: -len(suffix)]}_mask")
    tried = [folder / f"{s}{ext}" for s in stems for ext in NIFTI_SUFFIXES]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise InputError(f"{image}: no brain mask for it in {folder} (looked for {', '.join(p.name for p in tried)}).")


def _spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The 3D shape, allowing trailing singleton axes (X, Y, Z, 1); None for anything else."""
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        return None
    return tuple(int(n) for n in shape[:3])


def check_volume(image_path, mask_path=None) -> dict:
    """Check that one input can be run: readable NIfTI, 3D, spacing 1 mm (+- 0.05), a plausible shape,
    finite values, a non-empty brain (``mask > 0`` or ``image > 0``) with contrast inside, and a mask on
    the image's grid. Returns the facts checked; raises ``InputError`` with the file and the problem."""
    import nibabel as nib

    image_path = Path(image_path)
    try:
        image = nib.load(str(image_path))
    except Exception as e:  # nibabel raises several types for unreadable files
        raise InputError(f"{image_path}: cannot be read as NIfTI ({e}).") from e
    shape = _spatial_shape(image.shape)
    if shape is None:
        raise InputError(
            f"{image_path}: is {len(image.shape)}D with shape {tuple(image.shape)}; the model takes one 3D "
            "volume per file (split 4D series into 3D files)."
        )
    spacing = tuple(float(z) for z in image.header.get_zooms()[:3])
    if any(abs(s - SPACING_MM) > SPACING_TOLERANCE for s in spacing):
        raise InputError(
            f"{image_path}: voxel spacing {tuple(round(s, 3) for s in spacing)} mm; the model expects "
            f"{SPACING_MM:g} mm isotropic volumes registered to the training atlas (tolerance "
            f"{SPACING_TOLERANCE} mm). Resample / register the image first."
        )
    lo, hi = SHAPE_RANGE
    if any(not lo <= n <= hi for n in shape):
        raise InputError(
            f"{image_path}: shape {shape} is not that of a 1 mm brain volume (each axis {lo}-{hi} voxels expected)."
        )
    data = np.asanyarray(image.dataobj).reshape(shape)
    if not np.isfinite(data).all():
        raise InputError(f"{image_path}: contains NaN or Inf values.")
    if mask_path is not None:
        mask_path = Path(mask_path)
        try:
            mask_image = nib.load(str(mask_path))
        except Exception as e:
            raise InputError(f"{mask_path} (mask of {image_path.name}): cannot be read as NIfTI ({e}).") from e
        if _spatial_shape(mask_image.shape) != shape:
            raise InputError(f"{mask_path}: mask shape {tuple(mask_image.shape)} differs from its image "
                             f"{image_path.name} {shape}.")
        if not np.allclose(mask_image.affine, image.affine, atol=1e-3):
            raise InputError(f"{mask_path}: the mask's affine differs from that of its image {image_path.name}.")
        brain = np.asanyarray(mask_image.dataobj).reshape(shape) > 0
        where = f"its brain mask {mask_path.name} is empty" if not brain.any() else None
    else:
        brain = data > 0
        where = "the image has no voxel > 0 (all zero or non-positive)" if not brain.any() else None
    n_brain = int(np.count_nonzero(brain))
    if n_brain < MIN_BRAIN_VOXELS:
        where = where or f"only {n_brain} brain voxels (at least {MIN_BRAIN_VOXELS} expected for a brain)"
        raise InputError(f"{image_path}: contains no brain: {where}.")
    inside = data[brain]
    if float(inside.max()) <= float(inside.min()):
        raise InputError(f"{image_path}: the image is constant inside the brain; nothing to analyse.")
    crop = CenterSpatialCrop(CROP_SIZE).compute_slices(shape)
    kept = int(np.count_nonzero(brain[tuple(crop)]))
    if kept < 0.5 * n_brain:
        logger.warning("%s: %.0f%% of the brain lies outside the central %s crop the model sees; is the image "
                       "registered to the training atlas?", image_path, 100 * (1 - kept / n_brain), CROP_SIZE)
    return {"shape": shape, "spacing": spacing, "brain_voxels": n_brain, "axcodes": nib.aff2axcodes(image.affine)}


def inference_items(input, input_mask=None, output_dir=None) -> list[dict]:
    """The checked inputs as MONAI data items ``{image, mask, name, source, source_mask, checked}``.

    Without a mask file (``source_mask`` ""), ``mask`` is the image path itself: the preprocessing
    binarises it with ``> 0``, i.e. the brain is where the image is positive. Every input is checked
    before anything runs; one ``InputError`` lists all problems. No ``input`` gives an empty list.
    """
    if input is None or str(input).strip() == "":
        return []  # nothing configured yet (e.g. a property check); ``check_ready`` stops a run without inputs
    images = list_inputs(input)
    input_path = Path(input)
    same_folder = input_mask is not None and input_path.is_dir() and Path(input_mask).resolve() == input_path.resolve()
    if same_folder:  # masks beside the images: they are not inputs
        images = [p for p in images if not nifti_name(p).endswith("_mask")]
    if output_dir is not None and input_path.is_dir() and Path(output_dir).resolve() == input_path.resolve():
        raise InputError(f"output_dir {output_dir} is the input folder: choose another folder for the outputs, "
                         "so that the inputs stay untouched and outputs are never read back as inputs.")
    names = [nifti_name(p) for p in images]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"{input}: several files share the name(s) {duplicates} (.nii and .nii.gz); keep one.")
    problems, items = [], []
    for image, name in zip(images, names):
        try:
            mask = find_mask(image, input_mask)
            check_volume(image, mask)
        except InputError as e:
            problems.append(str(e))
            continue
        items.append({"image": str(image), "mask": str(mask or image), "name": name, "source": str(image),
                      "source_mask": "" if mask is None else str(mask), "checked": True})
    if problems:
        raise InputError(f"{len(problems)} of {len(images)} input(s) cannot be used:\n  " + "\n  ".join(problems))
    if output_dir is not None:
        inputs = {Path(p).resolve() for item in items for p in (item["source"], item["source_mask"]) if p}
        for item in items:
            for suffix in ("_anomaly.nii.gz", "_seg.nii.gz", "_overlay.png"):
                out = (Path(output_dir) / f"{item['name']}{suffix}").resolve()
                if out in inputs:
                    raise InputError(f"The output {out} would overwrite an input; choose another output_dir.")
    return items


def _lookup(tree, key: str):
    """``tree`` at a dotted ``key``; a key with dots in it (``"0.05"``) is matched whole, longest first."""
    if key == "":
        return tree
    if not isinstance(tree, Mapping):
        raise KeyError(key)
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        head = ".".join(parts[:n])
        if head in tree:
            try:
                return _lookup(tree[head], ".".join(parts[n:]))
            except KeyError:
                continue
    raise KeyError(key)


def resolve_threshold(threshold, threshold_key: str = "Brats21.threshold") -> float:
    """A number, or the number at ``threshold_key`` (dotted, e.g. ``Brats21.threshold`` or
    ``IXI.fpr_thresholds.5%``) in the ``metrics.json`` that the evaluate config wrote."""
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        value = float(threshold)
    else:
        text = str(threshold).strip()
        try:
            value = float(text)
        except ValueError:
            path = Path(text)
            if not path.is_file():
                raise InputError(
                    f"threshold {text!r} is neither a number nor an existing metrics.json: run the evaluate config "
                    "first or pass --threshold VALUE."
                ) from None
            try:
                tree = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise InputError(f"threshold file {path} is not valid JSON ({e}).") from e
            try:
                value = _lookup(tree, str(threshold_key))
            except KeyError:
                raise InputError(f"threshold file {path} has no entry {threshold_key!r} "
                                 f"(top-level keys: {sorted(tree)}).") from None
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise InputError(f"{path}: {threshold_key!r} is not a number ({value!r}).")
            value = float(value)
    if not math.isfinite(value) or value < 0:
        raise InputError(f"threshold must be a finite number >= 0, got {value}.")
    return value


def check_ready(items, ckpt_path=None, reconstruction: str = "ddpm", threshold=None,
                threshold_key: str = "Brats21.threshold") -> float:
    """Everything a run needs, checked before the first volume is processed: inputs, checkpoint and
    threshold. Returns the threshold."""
    if not items:
        raise InputError("No input given: pass --input with a NIfTI file or a folder of NIfTI files.")
    checkpoint_path(ckpt_path, reconstruction)
    return resolve_threshold(threshold, threshold_key)


class PrepareInputd(MapTransform):
    """Complete a data item that holds only ``image`` (as MONAI Label sends it): brain ``mask`` = the image
    (> 0), ``name``, ``source`` and ``source_mask``; items that ``inference_items`` did not check are checked
    here (``check_volume``), so a bad file fails with its name before any processing."""

    def __init__(self, image_key: str = "image", mask_key: str = "mask") -> None:
        super().__init__([image_key])
        self.image_key, self.mask_key = image_key, mask_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = d[self.image_key]
        if not isinstance(image, (str, Path)):
            raise InputError(f"Inference items need the image as a file path, got {type(image).__name__}.")
        d.setdefault("source", str(image))
        d.setdefault("name", nifti_name(image))
        if not d.get(self.mask_key):
            d[self.mask_key] = str(image)
        d.setdefault("source_mask", "" if d[self.mask_key] == str(image) else str(d[self.mask_key]))
        if not d.get("checked"):
            check_volume(d["source"], d["source_mask"] or None)
            d["checked"] = True
        return d


# ----------------------------------------------------------------------------------------------
# post-processing transforms (on one decollated item)
# ----------------------------------------------------------------------------------------------


class AnomalyMapd(MapTransform):
    """``output_key`` = post-processed residual |image - pred| (eroded brain mask, 3D median filter), (1, H, W, D)
    float32 on the CPU, carrying the image's metadata."""

    def __init__(self, keys: KeysCollection = "pred", image_key: str = "image", mask_key: str = "mask",
                 output_key: str = "anomaly", median_size: int = 5) -> None:
        super().__init__(keys)
        self.image_key, self.mask_key, self.output_key, self.median_size = image_key, mask_key, output_key, median_size

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        image = d[self.image_key]
        x = convert_to_numpy(image, dtype=np.float32)[0]
        mask = convert_to_numpy(d[self.mask_key])[0]
        for key in self.key_iterator(d):
            residual = M.residual_map(x, convert_to_numpy(d[key], dtype=np.float32)[0], mask, self.median_size)
            meta = image.meta if isinstance(image, MetaTensor) else {}
            d[self.output_key] = MetaTensor(torch.from_numpy(residual)[None], meta=dict(meta))
        return d


class AnomalySegmentd(MapTransform):
    """``output_key`` = (anomaly > threshold) without 3D components of <= 7 voxels, inside the brain mask:
    the segmentation the evaluation protocol scores, as a (1, H, W, D) float 0/1 tensor."""

    def __init__(self, keys: KeysCollection = "anomaly", threshold=0.5, threshold_key: str = "Brats21.threshold",
                 mask_key: str = "mask", output_key: str = "seg") -> None:
        super().__init__(keys)
        self.threshold, self.threshold_key = threshold, threshold_key
        self.mask_key, self.output_key = mask_key, output_key
        self._value: float | None = None

    @property
    def value(self) -> float:
        """The threshold: ``threshold`` itself or read from a metrics.json (``resolve_threshold``), once."""
        if self._value is None:
            self._value = resolve_threshold(self.threshold, self.threshold_key)
        return self._value

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        mask = convert_to_numpy(d[self.mask_key])[0] > 0
        d["threshold"] = self.value
        for key in self.key_iterator(d):
            anomaly = convert_to_numpy(d[key])[0]
            seg = M.segment(anomaly, self.value, mask)
            d[self.output_key] = MetaTensor(torch.from_numpy(seg.astype(np.float32))[None], meta=dict(d[key].meta))
        return d


class SaveAnomalyOutputsd(MapTransform):
    """Write ``<name>_anomaly.nii.gz``, ``<name>_seg.nii.gz`` and ``<name>_overlay.png`` for one item whose
    ``anomaly`` / ``seg`` are already back on the input's grid (``Invertd``). The NIfTI files take the input
    file's header and affine; both are limited to the input's brain (mask file or image > 0)."""

    def __init__(self, output_dir, keys: KeysCollection = ("anomaly", "seg"), source_key: str = "source",
                 source_mask_key: str = "source_mask", name_key: str = "name") -> None:
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.anomaly_key, self.seg_key = self.keys
        self.source_key, self.source_mask_key, self.name_key = source_key, source_mask_key, name_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        import nibabel as nib

        d = dict(data)
        source, name = Path(d[self.source_key]), str(d[self.name_key])
        image = nib.load(str(source))
        shape = _spatial_shape(image.shape)
        anomaly = np.clip(convert_to_numpy(d[self.anomaly_key])[0], 0, 1).astype(np.float32)  # B-spline overshoot
        seg = convert_to_numpy(d[self.seg_key])[0] > 0.5
        if anomaly.shape != shape or seg.shape != shape:
            raise RuntimeError(f"{source}: the maps came back with shape {anomaly.shape}, not the input's {shape}.")
        volume = np.asanyarray(image.dataobj).reshape(shape)
        mask_source = d.get(self.source_mask_key)
        brain = (np.asanyarray(nib.load(str(mask_source)).dataobj).reshape(shape) > 0) if mask_source else volume > 0
        seg &= brain
        anomaly *= brain  # interpolation spreads the map slightly beyond the brain
        header = image.header.copy()
        header.set_data_shape(shape)
        atomic_save_nifti(anomaly, image.affine, self.output_dir / f"{name}_anomaly.nii.gz", header=header)
        atomic_save_nifti(seg.astype(np.uint8), image.affine, self.output_dir / f"{name}_seg.nii.gz", header=header)
        self._overlay(volume, anomaly, seg, brain, name, d.get("threshold"))
        logger.info("%s: %d anomalous voxels written to %s", source.name, int(seg.sum()), self.output_dir)
        d["anomaly_path"] = str(self.output_dir / f"{name}_anomaly.nii.gz")
        d["seg_path"] = str(self.output_dir / f"{name}_seg.nii.gz")
        return d

    def _overlay(self, volume, anomaly, seg, brain, name: str, threshold=None) -> None:
        from custom_components.figures import plt, save_figure

        area = seg.sum(axis=(0, 1))
        z = int(np.argmax(area)) if area.max() > 0 else int(np.argmax((anomaly * brain).sum(axis=(0, 1))))
        image_slice, anomaly_slice, seg_slice = (np.rot90(a[:, :, z]) for a in (volume, anomaly, seg))
        inside = volume[brain]
        vmax = float(np.percentile(inside, 99.5)) if inside.size else float(volume.max())
        fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
        for ax in axes:
            ax.imshow(image_slice, cmap="gray", vmin=0, vmax=vmax or 1)
            ax.axis("off")
        if seg_slice.any():
            axes[0].contour(seg_slice, levels=[0.5], colors="red", linewidths=0.8)
        top = float(anomaly.max()) or 1.0
        shown = np.ma.masked_where(anomaly_slice <= 0, anomaly_slice)
        im = axes[1].imshow(shown, cmap="inferno", vmin=0, vmax=top, alpha=0.8)
        fig.colorbar(im, ax=axes[1], fraction=0.046, pad=0.02)
        t = "" if threshold is None else f" at threshold {float(threshold):.4g}"
        axes[0].set_title(f"segmentation{t}", fontsize=9)
        axes[1].set_title("anomaly map (residual)", fontsize=9)
        fig.suptitle(f"{name}, axial slice {z}", fontsize=10)
        save_figure(fig, self.output_dir / f"{name}_overlay.png")
