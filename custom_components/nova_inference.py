"""NOVA benchmark, inference: boxes from the reconstruction residual of each image, written as a predictions file.
The reference protocol reconstructs the native image; the project protocol first brings it into the training frame
(``NovaTrainingFramed``) and calibrates the threshold on healthy residuals (``HealthyThreshold``)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from monai.utils import convert_to_numpy
from scipy import ndimage

from custom_components.metrics import erode_brain_mask
from custom_components.utils import as_bool, atomic_path, from_diffusion_range, to_diffusion_range, write_json_atomic

logger = logging.getLogger(__name__)

#: Training slices: 96 x 96 at 2 mm, where an average brain spans about 72 x 90 pixels (left-right x
#: anterior-posterior); a NOVA head's bounding box is resampled to that area under ``training_scale``.
TRAINING_SIZE = 96
TRAINING_BRAIN_AREA = 72.0 * 90.0
HEALTHY_BATCH = 32  # slices per network call when calibrating the threshold


def boxes_from_residual(residual: np.ndarray, threshold: float = 0.5, top_k: int | None = 5,
                        median_size: int | None = 5) -> list[dict]:
    """Boxes ``[{"x_min", "y_min", "x_max", "y_max", "score"}]`` (max exclusive, as regionprops) of a 2D residual map:
    median filter (None or 1 = none), ``> threshold``, 4-connected components, ``score`` = mean unfiltered residual;
    the ``top_k`` largest boxes by area (stable on ties; None = all), largest first."""
    residual = np.asarray(residual, dtype=np.float64)
    smoothed = residual if median_size in (None, 1) else ndimage.median_filter(residual, size=int(median_size))
    labels, n = ndimage.label(smoothed > threshold)  # default structure = 4-connectivity in 2D
    slices = ndimage.find_objects(labels)
    scores = ndimage.mean(residual, labels, index=np.arange(1, n + 1))
    areas = np.array([(r.stop - r.start) * (c.stop - c.start) for r, c in slices])
    order = np.argsort(-areas, kind="stable")[: None if top_k is None else int(top_k)]
    return [{"x_min": slices[i][1].start, "y_min": slices[i][0].start, "x_max": slices[i][1].stop,
             "y_max": slices[i][0].stop, "score": float(scores[i])} for i in order]


def head_mask(image: np.ndarray, erosion: float = 3.0 / 86.0) -> np.ndarray:
    """Boolean brain mask of a 2D slice in [0, 1], skull or not: the large region above half Otsu's level (the dark
    skull cuts it from the scalp) closest to the centre of the head (> a tenth of Otsu's level, largest component),
    holes filled, eroded by ``erosion`` x its extent (the protocol: about 3 of the 86 pixels of a training brain)."""
    from skimage.filters import threshold_otsu

    image = np.asarray(image, dtype=np.float32)
    if not np.any(image > image.min()):
        return np.zeros(image.shape, bool)
    level = threshold_otsu(image)
    head, n = ndimage.label(ndimage.binary_fill_holes(image > 0.1 * level))
    head = head == (1 + int(np.argmax(ndimage.sum(head > 0, head, index=np.arange(1, n + 1)))))
    centre = np.array(ndimage.center_of_mass(head))
    labels, n = ndimage.label(ndimage.binary_opening((image > 0.5 * level) & head))  # opening: cut thin bridges
    index = np.arange(1, n + 1)
    mean_dist = np.asarray(ndimage.mean(np.hypot(*(np.indices(image.shape) - centre[:, None, None])), labels, index))
    large = ndimage.sum(labels > 0, labels, index=index) >= 0.05 * head.sum()
    mask = ndimage.binary_fill_holes(labels == index[large][np.argmin(mean_dist[large])]) if large.any() else head
    rows, cols = np.nonzero(mask)
    iterations = int(round(erosion * max(np.ptp(rows), np.ptp(cols))))
    return ndimage.binary_erosion(mask, iterations=iterations) if iterations > 0 else mask


def _to_training_orientation(image: np.ndarray) -> np.ndarray:  # radiological display -> rows L-R, cols P-A
    return np.ascontiguousarray(np.asarray(image).T[::-1, ::-1])


class NovaTrainingFramed:
    """Project protocol: bring a native NOVA slice ``d[key]`` into the training frame, keeping ``native_image``,
    ``head_mask`` and ``frame`` (zoom, head centre row and column, native height and width, reoriented flag). Under
    ``training_scale`` the head's 1st-99th percentile becomes [0, 1] and it is resampled (antialiased, bilinear) so
    its bounding box has an average training brain's area on a 96 x 96 canvas."""

    def __init__(self, key: str = "image", use_head_mask: bool | str = True, training_scale: bool | str = True,
                 training_orientation: bool | str = True) -> None:
        self.key, self.use_head_mask = key, as_bool(use_head_mask, "head_mask")
        self.training_scale = as_bool(training_scale, "training_scale")
        self.reorient = as_bool(training_orientation, "training_orientation")

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        native = np.asarray(d[self.key], dtype=np.float32).reshape(np.shape(d[self.key])[-2:])
        head = head_mask(native) if self.use_head_mask else np.ones(native.shape, bool)
        orient = _to_training_orientation if self.reorient else np.asarray
        image = orient(native)
        frame = np.array([1.0, 0.0, 0.0, *native.shape, float(self.reorient)], dtype=np.float32)
        if self.training_scale:
            full = orient(head_mask(native, erosion=0.0))
            full = full if full.any() else np.ones(image.shape, bool)
            rows, cols = np.nonzero(full)
            zoom = math.sqrt(TRAINING_BRAIN_AREA / float((np.ptp(rows) + 1) * (np.ptp(cols) + 1)))  # head's box
            frame[:3] = (zoom, (rows.min() + rows.max()) / 2.0, (cols.min() + cols.max()) / 2.0)
            lo, hi = np.percentile(image[full], (1, 99))
            image = np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0) * full
            if zoom < 1.0:  # antialiasing before downsampling
                image = ndimage.gaussian_filter(image, sigma=0.5 * (1.0 / zoom - 1.0))
            centre = (TRAINING_SIZE - 1) / 2.0
            grid = np.meshgrid(*[np.arange(TRAINING_SIZE, dtype=np.float32)] * 2, indexing="ij")
            coords = np.stack([(grid[0] - centre) / zoom + frame[1], (grid[1] - centre) / zoom + frame[2]])
            image = ndimage.map_coordinates(image, coords, order=1, cval=0.0).astype(np.float32)
        d["native_image"], d["head_mask"], d["frame"] = native[None], head, frame
        d[self.key] = np.ascontiguousarray(image, dtype=np.float32)[None]
        return d


def residual_to_native(residual: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """A residual map of the training frame back on the native pixels (bilinear; zero outside the canvas)."""
    residual = np.asarray(residual, dtype=np.float32)
    zoom, cr, cc, height, width, reoriented = (float(v) for v in np.asarray(frame, dtype=np.float64).reshape(-1))
    shape = (int(width), int(height)) if reoriented else (int(height), int(width))
    if zoom != 1.0 or residual.shape != shape:
        rows, cols = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
        centre = (residual.shape[0] - 1) / 2.0
        coords = np.stack([(rows - cr) * zoom + centre, (cols - cc) * zoom + centre])
        residual = ndimage.map_coordinates(residual, coords, order=1, cval=0.0).astype(np.float32)
    return np.ascontiguousarray(residual.T[::-1, ::-1]) if reoriented else residual  # back to the display orientation


def healthy_threshold(network, inferer, volumes, fpr: float = 0.05, device="cpu") -> float:
    """The residual level exceeded by a fraction ``fpr`` of the healthy brain pixels (eroded mask, as the protocol),
    pooled over every second slice with brain of ``volumes`` (``image``, ``mask`` (1, H, W, D), e.g. IXI val)."""
    if not 0.0 < float(fpr) < 1.0:
        raise ValueError(f"healthy_fpr must lie in (0, 1), got {fpr!r}")
    slices, masks = [], []
    for item in volumes:
        mask = erode_brain_mask(np.asarray(item["mask"])[0] > 0)
        keep = np.flatnonzero(mask.any(axis=(0, 1)))[::2]
        slices += [np.asarray(item["image"], dtype=np.float32)[0, ..., z] for z in keep]
        masks += [mask[..., z] for z in keep]
    if not slices:
        raise ValueError("healthy_threshold: no healthy slice with brain to calibrate on")
    values = []
    network.eval()
    with torch.no_grad():
        for s in range(0, len(slices), HEALTHY_BATCH):
            x = to_diffusion_range(np.stack(slices[s:s + HEALTHY_BATCH])[:, None])
            recon = inferer(torch.as_tensor(x, device=device), network).float().cpu().numpy()
            values += [residual_01(x[i, 0], recon[i, 0])[m] for i, m in enumerate(masks[s:s + HEALTHY_BATCH])]
    return float(np.quantile(np.concatenate(values), 1.0 - float(fpr)))


class HealthyThreshold:
    """Engine handler: when the run starts (weights loaded), set ``writer.threshold`` to :func:`healthy_threshold` on
    what ``volumes()`` returns; ``enabled=False`` keeps it as configured."""

    def __init__(self, writer, network, inferer, volumes, fpr: float = 0.05, enabled: bool | str = True,
                 device="cpu") -> None:
        self.writer, self.network, self.inferer, self.volumes = writer, network, inferer, volumes
        self.fpr, self.enabled, self.device = fpr, as_bool(enabled, "calibrate_threshold"), device

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine=None) -> None:
        if self.enabled:
            self.writer.threshold = healthy_threshold(self.network, self.inferer, self.volumes(), self.fpr, self.device)
            logger.info(f"NOVA healthy-residual threshold: {self.writer.threshold:.4f} (pixel FPR {float(self.fpr):g})")


def residual_01(image: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """``|x - x_hat|`` on the [0, 1] scale of an image and its reconstruction in the diffusion range (clipped first)."""
    x, x_hat = (from_diffusion_range(np.clip(np.asarray(a, dtype=np.float32), -1.0, 1.0)) for a in (image, recon))
    return np.abs(x - x_hat)


def save_overlay(path: str | os.PathLike, image: np.ndarray, gt_boxes: np.ndarray, pred_boxes: list[dict]) -> None:
    """Write ``image`` ((H, W) in [0, 1]) as an RGB PNG, gold ``(y, x, y + h, x + w)`` boxes green, predicted red."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray((np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
    canvas = canvas.convert("RGB")
    draw, width = ImageDraw.Draw(canvas), max(1, round(min(canvas.size) / 256))
    for y0, x0, y1, x1 in np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4):
        draw.rectangle([round(x0), round(y0), round(x1), round(y1)], outline=(0, 255, 0), width=width)
    for b in pred_boxes:  # PIL rectangles include both corners: the last pixel is max - 1
        draw.rectangle([b["x_min"], b["y_min"], b["x_max"] - 1, b["y_max"] - 1], outline=(255, 0, 0), width=width)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")


class NovaBoxWriter:
    """Evaluator handler (``decollate=False``): :func:`boxes_from_residual` of each image's :func:`residual_01` (for
    :class:`NovaTrainingFramed` batches on the native pixels, inside the head mask), written to ``predictions_file``
    as ``{filename: [{x_min, y_min, x_max, y_max, score}, ...]}`` when the run completes; overlays in overlay_dir."""

    def __init__(self, predictions_file: str | os.PathLike, threshold: float = 0.5, top_k: int | None = 5,
                 median_size: int | None = 5, overlay_dir=None, save_overlays: bool | str = True) -> None:
        try:  # a number, or its text as a command line may pass it
            value = math.nan if isinstance(threshold, bool) else float(threshold)
        except (TypeError, ValueError):
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        self.predictions_file = Path(predictions_file)
        self.threshold, self.top_k, self.median_size = value, top_k, median_size
        self.overlay_dir = Path(overlay_dir) if overlay_dir and as_bool(save_overlays, "save_overlays") else None
        self.predictions: dict[str, list[dict]] = {}

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.predictions.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def __call__(self, engine) -> None:
        batch = engine.state.batch
        images, recons = (convert_to_numpy(engine.state.output[k], dtype=np.float32) for k in ("image", "pred"))
        names = [batch["filename"]] if isinstance(batch["filename"], str) else list(batch["filename"])
        frames, heads, natives = (convert_to_numpy(batch[k]) if k in batch else None
                                  for k in ("frame", "head_mask", "native_image"))
        for i, name in enumerate(names):
            residual = residual_01(images[i, 0], recons[i, 0])
            if frames is not None:  # project protocol: back to the native pixels, inside the head
                residual = residual_to_native(residual, frames[i])
            if heads is not None:
                residual = residual * (heads[i] > 0)
            boxes = boxes_from_residual(residual, self.threshold, self.top_k, self.median_size)
            self.predictions[str(name)] = boxes
            if self.overlay_dir is not None:
                gt = convert_to_numpy(batch["gt_boxes"][i]) if "gt_boxes" in batch else np.zeros((0, 4))
                shown = natives[i, 0] if natives is not None else from_diffusion_range(images[i, 0])
                save_overlay(self.overlay_dir / Path(str(name)).with_suffix(".png"), shown, gt, boxes)

    def write(self, engine=None) -> None:
        write_json_atomic(self.predictions_file, self.predictions)
        overlays = f"; overlays in {self.overlay_dir}" if self.overlay_dir else ""
        logger.info(f"NOVA predictions: {sum(map(len, self.predictions.values()))} box(es) on {len(self.predictions)} "
                    f"image(s) -> {self.predictions_file}{overlays}")
