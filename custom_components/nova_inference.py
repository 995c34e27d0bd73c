"""NOVA benchmark, inference: boxes from the reconstruction residual of each image, written as a predictions file.

The reference protocol reconstructs the native image; the project protocol first brings it into the training frame
(``NovaTrainingFramed``: head mask, orientation, scale) and calibrates the threshold on healthy residuals
(``HealthyThreshold``). Boxes are ``{"x_min", "y_min", "x_max", "y_max", "score"}``, max exclusive (regionprops).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from monai.utils import convert_to_numpy
from scipy import ndimage

from custom_components.metrics import erode_brain_mask
from custom_components.utils import as_bool, atomic_path, from_diffusion_range, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = ["boxes_from_residual", "head_mask", "NovaTrainingFramed", "residual_to_native", "healthy_threshold",
           "HealthyThreshold", "residual_01", "save_overlay", "NovaBoxWriter"]

#: Training slices: 96 x 96 at 2 mm, where an average brain spans about 72 x 90 pixels (left-right x
#: anterior-posterior); a NOVA head's bounding box is resampled to that area under ``training_scale``.
TRAINING_SIZE = 96
TRAINING_BRAIN_AREA = 72.0 * 90.0
#: ``frame`` vector stored per image: zoom, head centre (row, column, training orientation), native
#: height and width, reoriented flag.
FRAME_FIELDS = ("zoom", "centre_row", "centre_col", "height", "width", "reoriented")


def boxes_from_residual(residual: np.ndarray, threshold: float = 0.5, top_k: int | None = 5,
                        median_size: int | None = 5) -> list[dict]:
    """Boxes of the anomalous regions of a 2D residual map (the prediction side of the NOVA protocol).

    Median filter (``median_size``; None or 1 = none), binarise ``> threshold``, 4-connected
    components; one box per component as regionprops gives it (min inclusive, max exclusive) with
    ``score`` = mean of the unfiltered residual inside the component. Returns the ``top_k`` largest
    boxes by box area (descending, stable on ties; None = all) as
    ``[{"x_min", "y_min", "x_max", "y_max", "score"}]``.
    """
    residual = np.asarray(residual, dtype=np.float64)
    if residual.ndim != 2:
        raise ValueError(f"boxes_from_residual expects a 2D residual map, got shape {residual.shape}")
    smoothed = residual if median_size in (None, 1) else ndimage.median_filter(residual, size=int(median_size))
    labels, n = ndimage.label(smoothed > threshold)  # default structure = 4-connectivity in 2D
    if n == 0:
        return []
    slices = ndimage.find_objects(labels)
    bounds = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in slices], dtype=np.int64)
    scores = np.asarray(ndimage.mean(residual, labels, index=np.arange(1, n + 1)), dtype=np.float64)
    areas = (bounds[:, 2] - bounds[:, 0]) * (bounds[:, 3] - bounds[:, 1])
    order = np.argsort(-areas, kind="stable")
    if top_k is not None:
        order = order[: int(top_k)]
    return [{"x_min": int(bounds[i, 1]), "y_min": int(bounds[i, 0]), "x_max": int(bounds[i, 3]),
             "y_max": int(bounds[i, 2]), "score": float(scores[i])} for i in order]



def head_mask(image: np.ndarray, erosion: float = 3.0 / 86.0) -> np.ndarray:
    """Boolean mask of the brain region of a 2D slice in [0, 1], skull or not.

    The head is what lies above a tenth of Otsu's level (holes filled, largest component); inside it the
    brain is the large bright region (above half Otsu's level) closest to the head's centre, which the
    dark skull separates from the scalp; its holes (ventricles) are filled. Eroded by ``erosion`` x its
    extent (the protocol erodes the brain mask by about 3 of the 86 pixels a brain spans in training).
    """
    from skimage.filters import threshold_otsu

    image = np.asarray(image, dtype=np.float32)
    if not np.any(image > image.min()):
        return np.zeros(image.shape, bool)
    level = threshold_otsu(image)
    head, n = ndimage.label(ndimage.binary_fill_holes(image > 0.1 * level))
    if n == 0:
        return np.zeros(image.shape, bool)
    head = head == (1 + int(np.argmax(ndimage.sum(head > 0, head, index=np.arange(1, n + 1)))))
    centre = np.array(ndimage.center_of_mass(head))
    labels, n = ndimage.label(ndimage.binary_opening((image > 0.5 * level) & head))  # opening: cut thin bridges
    mask = head
    if n:
        index = np.arange(1, n + 1)
        areas = ndimage.sum(labels > 0, labels, index=index)
        rows, cols = np.indices(image.shape)
        dist = np.hypot(rows - centre[0], cols - centre[1])
        mean_dist = np.asarray(ndimage.mean(dist, labels, index=index))
        large = areas >= 0.05 * head.sum()
        if large.any():
            best = index[large][np.argmin(mean_dist[large])]
            mask = ndimage.binary_fill_holes(labels == best)
    rows, cols = np.nonzero(mask)
    iterations = int(round(erosion * max(np.ptp(rows), np.ptp(cols))))
    return ndimage.binary_erosion(mask, iterations=iterations) if iterations > 0 else mask


def _to_training_orientation(image: np.ndarray) -> np.ndarray:
    """Radiological display (anterior up, patient's right on the left) -> the voxel order of the training
    slices (rows left to right, columns posterior to anterior): a transpose with both axes reversed."""
    return np.ascontiguousarray(np.asarray(image).T[::-1, ::-1])


def _canvas_coordinates(frame: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
    """Canvas coordinates ``(2, *shape)`` of every pixel of the (reoriented) native image."""
    zoom, cr, cc = float(frame[0]), float(frame[1]), float(frame[2])
    rows, cols = np.meshgrid(np.arange(shape[0], dtype=np.float32), np.arange(shape[1], dtype=np.float32),
                             indexing="ij")
    centre = (size - 1) / 2.0
    return np.stack([(rows - cr) * zoom + centre, (cols - cc) * zoom + centre])


class NovaTrainingFramed:
    """Dictionary transform for the project protocol: bring a native NOVA slice into the training frame.

    Reads ``d[key]`` ((1, H, W) in [0, 1], native) and writes ``d["native_image"]`` (that image),
    ``d["head_mask"]`` ((H, W) bool: :func:`head_mask`, or all True without ``use_head_mask``) and
    ``d["frame"]`` (:data:`FRAME_FIELDS`), then replaces ``d[key]`` by the model input:
    ``training_orientation``: radiological display -> training voxel order; ``training_scale``: the head resampled
    (antialiased, bilinear) so its bounding box has the area of an average training brain's, centred on a
    96 x 96 canvas, and
    intensities mapped from the 1st-99th percentile inside the head to [0, 1] as the training volumes are.
    With every option off the model input is the native image and the frame the identity.
    """

    def __init__(self, key: str = "image", use_head_mask: bool | str = True, training_scale: bool | str = True,
                 training_orientation: bool | str = True, size: int = TRAINING_SIZE) -> None:
        self.key, self.size = key, int(size)
        self.use_head_mask = as_bool(use_head_mask, "head_mask")
        self.training_scale = as_bool(training_scale, "training_scale")
        self.reorient = as_bool(training_orientation, "training_orientation")

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        native = np.asarray(d[self.key], dtype=np.float32).reshape(np.shape(d[self.key])[-2:])
        head = head_mask(native) if self.use_head_mask else np.ones(native.shape, bool)
        image = _to_training_orientation(native) if self.reorient else native
        frame = np.array([1.0, 0.0, 0.0, *native.shape, float(self.reorient)], dtype=np.float32)
        if self.training_scale:
            full = head_mask(native, erosion=0.0)
            full = _to_training_orientation(full) if self.reorient else full
            if not full.any():
                full = np.ones(image.shape, bool)
            rows, cols = np.nonzero(full)
            extent = float((np.ptp(rows) + 1) * (np.ptp(cols) + 1))  # the head's bounding box
            zoom = math.sqrt(TRAINING_BRAIN_AREA / extent)
            frame[:3] = (zoom, (rows.min() + rows.max()) / 2.0, (cols.min() + cols.max()) / 2.0)
            inside = image[full]
            lo, hi = np.percentile(inside, (1, 99)) if inside.size else (0.0, 1.0)
            image = np.clip((image - lo) / max(hi - lo, 1e-6), 0.0, 1.0) * full
            if zoom < 1.0:  # antialiasing before downsampling
                image = ndimage.gaussian_filter(image, sigma=0.5 * (1.0 / zoom - 1.0))
            centre = (self.size - 1) / 2.0
            grid = np.meshgrid(*[np.arange(self.size, dtype=np.float32)] * 2, indexing="ij")
            coords = np.stack([(grid[0] - centre) / zoom + frame[1], (grid[1] - centre) / zoom + frame[2]])
            image = ndimage.map_coordinates(image, coords, order=1, cval=0.0).astype(np.float32)
        d["native_image"] = native[None]
        d["head_mask"] = head
        d["frame"] = frame
        d[self.key] = np.ascontiguousarray(image, dtype=np.float32)[None]
        return d


def residual_to_native(residual: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Map a residual computed in the training frame (:class:`NovaTrainingFramed`) back onto the native
    pixels of the image (bilinear; zero outside the canvas)."""
    residual = np.asarray(residual, dtype=np.float32)
    frame = np.asarray(frame, dtype=np.float64).reshape(-1)
    height, width, reoriented = int(frame[3]), int(frame[4]), bool(frame[5])
    shape = (width, height) if reoriented else (height, width)
    if frame[0] == 1.0 and residual.shape == shape:  # no resampling
        out = residual
    else:
        out = ndimage.map_coordinates(residual, _canvas_coordinates(frame, shape, residual.shape[0]), order=1,
                                      cval=0.0).astype(np.float32)
    return np.ascontiguousarray(out.T[::-1, ::-1]) if reoriented else out  # back to the display orientation


def healthy_threshold(network, inferer, volumes, fpr: float = 0.05, device="cpu", slice_step: int = 2,
                      batch_size: int = 32) -> float:
    """The residual level exceeded by a fraction ``fpr`` of the healthy brain pixels.

    ``volumes``: preprocessed healthy volumes (dicts with ``image`` and ``mask`` (1, H, W, D) in [0, 1],
    e.g. cond_ddpm's IXI val split); every ``slice_step``-th slice with brain is reconstructed by ``inferer``,
    and the residual (:func:`residual_01`) is pooled inside the brain mask eroded as the protocol does.
    """
    if not 0.0 < float(fpr) < 1.0:
        raise ValueError(f"healthy_fpr must lie in (0, 1), got {fpr!r}")
    slices, masks = [], []
    for item in volumes:
        image = np.asarray(item["image"], dtype=np.float32)[0]
        mask = erode_brain_mask(np.asarray(item["mask"])[0] > 0)
        keep = np.flatnonzero(mask.any(axis=(0, 1)))[::max(int(slice_step), 1)]
        slices += [image[..., z] for z in keep]
        masks += [mask[..., z] for z in keep]
    if not slices:
        raise ValueError("healthy_threshold: no healthy slice with brain to calibrate on")
    values = []
    network.eval()
    with torch.no_grad():
        for start in range(0, len(slices), batch_size):
            x = torch.as_tensor(np.stack(slices[start:start + batch_size])[:, None] * 2.0 - 1.0, device=device)
            recon = inferer(x, network).float().cpu().numpy()
            for i, m in enumerate(masks[start:start + batch_size]):
                values.append(residual_01(x[i, 0].cpu().numpy(), recon[i, 0])[m])
    return float(np.quantile(np.concatenate(values), 1.0 - float(fpr)))


class HealthyThreshold:
    """Engine handler: when the run starts (after the weights are loaded), set ``writer.threshold`` to
    :func:`healthy_threshold` on ``volumes``; ``enabled=False`` leaves the configured threshold."""

    def __init__(self, writer, network, inferer, volumes, fpr: float = 0.05, enabled: bool | str = True,
                 device="cpu") -> None:
        self.writer, self.network, self.inferer, self.volumes = writer, network, inferer, volumes
        self.fpr, self.enabled, self.device = fpr, as_bool(enabled, "calibrate_threshold"), device
        self.threshold: float | None = None

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine=None) -> None:
        if not self.enabled:
            return
        volumes = self.volumes() if callable(self.volumes) else self.volumes
        self.threshold = healthy_threshold(self.network, self.inferer, volumes, self.fpr, self.device)
        self.writer.threshold = self.threshold
        logger.info(f"NOVA threshold calibrated on healthy residuals: {self.threshold:.4f} "
                    f"(pixel FPR {float(self.fpr):g})")


def residual_01(image: np.ndarray, recon: np.ndarray) -> np.ndarray:
    """Residual ``|x - x_hat|`` on the [0, 1] intensity scale of an image and its reconstruction given in the
    diffusion range (both clipped to it first, so the residual lies in [0, 1])."""
    x, x_hat = (from_diffusion_range(np.clip(np.asarray(a, dtype=np.float32), -1.0, 1.0)) for a in (image, recon))
    return np.abs(x - x_hat)


def save_overlay(path: str | os.PathLike, image: np.ndarray, gt_boxes: np.ndarray,
                 pred_boxes: Sequence[Mapping]) -> str:
    """Write ``image`` ((H, W) in [0, 1]) as an RGB PNG with the gold boxes in green and the predicted boxes
    in red. Gold boxes are ``(y, x, y + height, x + width)``; predicted ones ``{"x_min", ..}``, max exclusive."""
    from PIL import Image, ImageDraw

    gray = (np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    canvas = Image.fromarray(np.repeat(gray[..., None], 3, axis=-1), mode="RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(min(gray.shape) / 256))
    for y0, x0, y1, x1 in np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4):
        draw.rectangle([round(x0), round(y0), round(x1), round(y1)], outline=(0, 255, 0), width=width)
    for b in pred_boxes:  # PIL rectangles include both corners: the last pixel is max - 1
        draw.rectangle([b["x_min"], b["y_min"], b["x_max"] - 1, b["y_max"] - 1], outline=(255, 0, 0), width=width)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return str(path)


class NovaBoxWriter:
    """Evaluator handler: boxes from each image's reconstruction residual, written as a predictions file.

    After every iteration it reads the input image and the reconstruction from the engine's output
    (``image_key`` / ``pred_key``, (B, 1, H, W) in [-1, 1], ``decollate=False``) and the image names and
    gold boxes from the batch; the residual (:func:`residual_01`) goes through :func:`boxes_from_residual`
    (median ``median_size``, ``> threshold``, 4-connected components, ``top_k`` largest). When the run
    completes, ``predictions_file`` is written atomically as ``{filename: [{x_min, y_min, x_max, y_max,
    score}, ...]}`` (every image present, ``[]`` when no box). With ``overlay_dir``, a PNG per image with
    the gold boxes in green and the predicted ones in red. Batches from :class:`NovaTrainingFramed` (keys
    ``frame_key``, ``mask_key``, ``native_key``) have their residual mapped back to the native pixels and
    kept inside the head mask, and the overlay drawn on the native image.
    """

    def __init__(self, predictions_file: str | os.PathLike, threshold: float = 0.5, top_k: int | None = 5,
                 median_size: int | None = 5, overlay_dir: str | os.PathLike | None = None,
                 save_overlays: bool | str = True, image_key: str = "image", pred_key: str = "pred",
                 name_key: str = "filename", boxes_key: str = "gt_boxes", frame_key: str = "frame",
                 mask_key: str = "head_mask", native_key: str = "native_image") -> None:
        value = threshold
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        self.predictions_file = Path(predictions_file)
        self.threshold, self.top_k, self.median_size = float(value), top_k, median_size
        self.overlay_dir = Path(overlay_dir) if overlay_dir and as_bool(save_overlays, "save_overlays") else None
        self.image_key, self.pred_key, self.name_key, self.boxes_key = image_key, pred_key, name_key, boxes_key
        self.frame_key, self.mask_key, self.native_key = frame_key, mask_key, native_key
        self.predictions: dict[str, list[dict]] = {}

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine=None) -> None:
        self.predictions = {}

    def __call__(self, engine) -> None:
        images = convert_to_numpy(engine.state.output[self.image_key], dtype=np.float32)
        recons = convert_to_numpy(engine.state.output[self.pred_key], dtype=np.float32)
        names = engine.state.batch[self.name_key]
        names = [names] if isinstance(names, str) else list(names)
        gold = engine.state.batch.get(self.boxes_key) if self.overlay_dir else None
        if images.shape != recons.shape or images.ndim != 4 or images.shape[1] != 1 or len(names) != len(images):
            raise ValueError(f"NovaBoxWriter expects (B, 1, H, W) images and reconstructions and B names, got "
                             f"{images.shape}, {recons.shape} and {len(names)} name(s); use decollate: false")
        batch = engine.state.batch
        frames = convert_to_numpy(batch[self.frame_key]) if self.frame_key in batch else None
        heads = convert_to_numpy(batch[self.mask_key]) if self.mask_key in batch else None
        natives = convert_to_numpy(batch[self.native_key]) if self.native_key in batch else None
        for i, name in enumerate(names):
            residual = residual_01(images[i, 0], recons[i, 0])
            if frames is not None:  # project protocol: back to the native pixels, inside the head
                residual = residual_to_native(residual, frames[i])
            if heads is not None:
                residual = residual * (heads[i] > 0)
            boxes = boxes_from_residual(residual, threshold=self.threshold, top_k=self.top_k,
                                        median_size=self.median_size)
            self.predictions[str(name)] = boxes
            if self.overlay_dir is not None:
                gt = convert_to_numpy(gold[i]) if gold is not None else np.zeros((0, 4))
                shown = natives[i, 0] if natives is not None else from_diffusion_range(images[i, 0])
                save_overlay(self.overlay_dir / Path(str(name)).with_suffix(".png"), shown, gt, boxes)

    def write(self, engine=None) -> None:
        write_json_atomic(self.predictions_file, self.predictions)
        n_boxes = sum(len(b) for b in self.predictions.values())
        logger.info(f"NOVA predictions: {n_boxes} box(es) on {len(self.predictions)} image(s) -> "
                    f"{self.predictions_file}" + (f"; overlays in {self.overlay_dir}" if self.overlay_dir else ""))

