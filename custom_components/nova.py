"""NOVA benchmark: reading images and metadata, boxes from residual maps, and the localisation metrics.

Box convention inside this module: ``(y_min, x_min, y_max, x_max)`` in float pixels, rows first as
``skimage.measure.regionprops`` gives them. Ground truth from ``bbox_gold`` is ``(y, x, y + height,
x + width)``; predictions come as ``{"x_min", "y_min", "x_max", "y_max", "score"}`` with the max
exclusive (regionprops). Two metric families are computed:

* ``reference`` -- the published NOVA protocol: per image, boxes sorted by area (largest first, top 5),
  inclusive IoU (``+1`` on widths, heights and the intersection), greedy matching to the highest-IoU
  ground-truth box, per-image AP = mean of the cumulative precisions at the TP positions, mAP = mean
  over images.
* ``score_ranked`` -- a COCO-style AP: boxes ranked by ``score`` over the whole set, standard IoU,
  101-point interpolated precision. Reported beside the reference numbers, never instead.
"""

from __future__ import annotations

import ast
import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path

import numpy as np

from custom_components.utils import as_bool, atomic_path, write_json_atomic

logger = logging.getLogger(__name__)

__all__ = [
    "IOU_THRESHOLDS_50_95",
    "load_nova_image",
    "parse_bbox",
    "read_nova_metadata",
    "read_nova_filenames",
    "boxes_from_residual",
    "load_network_weights",
    "LoadNetworkWeights",
    "nova_items",
    "LoadNovaImage",
    "residual_01",
    "save_overlay",
    "head_mask",
    "NovaTrainingFramed",
    "residual_to_native",
    "healthy_threshold",
    "HealthyThreshold",
    "NovaBoxWriter",
    "box_iou",
    "load_predictions",
    "evaluate_nova",
    "evaluate_nova_files",
    "format_summary",
]

#: IoU thresholds of mAP@50:95 (0.50, 0.55, ..., 0.95), rounded so that 0.5 and 0.95 are exact.
IOU_THRESHOLDS_50_95 = np.round(np.linspace(0.5, 0.95, 10), 2)
#: Precision denominator offset of the reference implementation: tp / (tp + fp + 1e-6).
REFERENCE_EPS = 1e-6
#: Columns metadata.csv must have.
METADATA_COLUMNS = ("filename", "caption", "case_id", "bbox_gold")
BBOX_KEYS = ("x", "y", "width", "height")
PRED_KEYS = ("x_min", "y_min", "x_max", "y_max", "score")


# ----------------------------------------------------------------------------------------- reading
def load_nova_image(path: str | os.PathLike) -> np.ndarray:
    """Read a NOVA PNG at native resolution as float32 ``(H, W)`` in [0, 1].

    RGB(A) images become gray (ITU-R 601 luma, alpha dropped); 16-bit images are scaled by 65535.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NOVA image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            if mode in ("P", "PA"):  # palette: map indices to colours first
                img = img.convert("RGBA" if mode == "PA" or "transparency" in img.info else "RGB")
                mode = img.mode
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e

    if mode == "1":
        return arr.astype(np.float32)
    if mode in ("LA", "RGBA", "PA"):
        arr = arr[..., :-1]  # drop alpha
    if mode.startswith("I") or arr.dtype == np.uint16:
        scale = 65535.0  # 16-bit PNGs open as "I;16" or "I" depending on Pillow's version
    elif arr.dtype == np.uint8:
        scale = 255.0
    else:
        raise ValueError(f"{path}: unsupported image mode {mode!r} (dtype {arr.dtype})")
    arr = arr.astype(np.float64)
    if arr.ndim == 3:
        if arr.shape[-1] == 1:
            arr = arr[..., 0]
        elif arr.shape[-1] == 3:
            arr = arr @ np.array([0.299, 0.587, 0.114])
        else:
            raise ValueError(f"{path}: unexpected channel count {arr.shape[-1]} (mode {mode!r})")
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a 2D image, got shape {arr.shape}")
    return np.clip(arr / scale, 0.0, 1.0).astype(np.float32)


def _is_missing(text) -> bool:
    if text is None:
        return True
    if isinstance(text, float) and math.isnan(text):
        return True
    return isinstance(text, str) and text.strip().lower() in ("", "nan", "none")


def parse_bbox(text: str | None, filename: str = "<unknown>") -> np.ndarray:
    """Parse a ``bbox_gold`` string into ``(n, 4)`` float boxes ``(y, x, y + height, x + width)``.

    The string is a Python-literal dict ``{'x': [...], 'y': [...], 'width': [...], 'height': [...]}``
    read with ``ast.literal_eval`` (never ``eval``). An empty/NaN cell means no box. Anything else
    that is not that format raises a ValueError naming ``filename`` and the problem.
    """
    if _is_missing(text):
        return np.zeros((0, 4), dtype=np.float64)
    if not isinstance(text, str):
        raise ValueError(f"{filename}: bbox_gold must be a string, got {type(text).__name__}")
    short = text if len(text) <= 120 else text[:117] + "..."
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise ValueError(f"{filename}: bbox_gold is not a Python literal dict ({type(e).__name__}): {short!r}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{filename}: bbox_gold must be a dict with keys {list(BBOX_KEYS)}, got "
                         f"{type(value).__name__}: {short!r}")
    missing = [k for k in BBOX_KEYS if k not in value]
    if missing:
        raise ValueError(f"{filename}: bbox_gold lacks key(s) {missing}: {short!r}")

    columns = {}
    for key in BBOX_KEYS:
        v = value[key]
        items = list(v) if isinstance(v, (list, tuple)) else [v]
        for item in items:
            if isinstance(item, bool) or not isinstance(item, Real):
                raise ValueError(f"{filename}: bbox_gold['{key}'] holds a non-number {item!r}: {short!r}")
        columns[key] = np.asarray(items, dtype=np.float64)
    lengths = {k: len(c) for k, c in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{filename}: bbox_gold lists differ in length {lengths}: {short!r}")
    for key, c in columns.items():
        if not np.all(np.isfinite(c)):
            raise ValueError(f"{filename}: bbox_gold['{key}'] holds a non-finite value: {short!r}")
    for key in ("width", "height"):
        if np.any(columns[key] < 0):
            raise ValueError(f"{filename}: bbox_gold['{key}'] holds a negative value: {short!r}")
    x, y, w, h = (columns[k] for k in BBOX_KEYS)
    return np.stack([y, x, y + h, x + w], axis=1).reshape(-1, 4)


def _read_metadata_rows(csv_path: str | os.PathLike) -> list[dict]:
    """Rows of metadata.csv as dicts of strings, after checking the file and its columns."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"NOVA metadata file not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in METADATA_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; found {header}")
        rows = list(reader)
    seen, duplicates = set(), []
    for line, row in enumerate(rows, start=2):
        name = (row.get("filename") or "").strip()
        if not name:
            raise ValueError(f"{csv_path}: row at line {line} has an empty filename")
        if name in seen:
            duplicates.append(name)
        seen.add(name)
        row["filename"] = name
    if duplicates:
        raise ValueError(f"{csv_path}: duplicated filename(s) {sorted(set(duplicates))[:20]}")
    return rows


def read_nova_filenames(csv_path: str | os.PathLike) -> list[str]:
    """Every filename listed in metadata.csv (no caption filter, boxes not parsed)."""
    return [row["filename"] for row in _read_metadata_rows(csv_path)]


def read_nova_metadata(csv_path: str | os.PathLike, caption_filter: str | None = "T2") -> list[dict]:
    """Read metadata.csv into ``[{filename, caption, case_id, boxes}]``, boxes as from :func:`parse_bbox`.

    ``caption_filter``: keep the rows whose caption contains this string (case-sensitive, as the
    published protocol's "T2"); None or "" keeps every row ("" is how to ask for all rows on the
    ``monai.bundle`` command line, which drops ``None`` overrides). Only kept rows have their boxes parsed; a
    malformed ``bbox_gold`` raises a ValueError naming the file and the row's filename.
    """
    records = []
    for row in _read_metadata_rows(csv_path):
        caption = row.get("caption") or ""
        if caption_filter and str(caption_filter) not in caption:
            continue
        try:
            boxes = parse_bbox(row.get("bbox_gold"), row["filename"])
        except ValueError as e:
            raise ValueError(f"{csv_path}: {e}") from e
        records.append({"filename": row["filename"], "caption": caption,
                        "case_id": (row.get("case_id") or "").strip(), "boxes": boxes})
    return records


# ------------------------------------------------------------------------------------ prediction
def boxes_from_residual(residual: np.ndarray, threshold: float = 0.5, top_k: int | None = 5,
                        median_size: int | None = 5) -> list[dict]:
    """Boxes of the anomalous regions of a 2D residual map (the prediction side of the NOVA protocol).

    Median filter (``median_size``; None or 1 = none), binarise ``> threshold``, 4-connected
    components; one box per component as regionprops gives it (min inclusive, max exclusive) with
    ``score`` = mean of the unfiltered residual inside the component. Returns the ``top_k`` largest
    boxes by box area (descending, stable on ties; None = all) as
    ``[{"x_min", "y_min", "x_max", "y_max", "score"}]``.
    """
    from scipy import ndimage

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


# ------------------------------------------------------------------------------ inference pipeline
def load_network_weights(network, ckpt_path: str | os.PathLike, map_location="cpu"):
    """Load the trained weights at ``ckpt_path`` into ``network`` (strict) and return the network.

    The file is a plain ``state_dict`` (what cond_ddpm saves as ``models/model.pt``) or a training
    checkpoint holding it under ``"network"`` or ``"model"``. A missing file or weights of another
    architecture raise an error naming the file and, for the latter, the network ids to check.
    """
    import torch

    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (set ckpt_path to cond_ddpm's models/model.pt)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file, or objects that are not tensors
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from e
    if isinstance(state, Mapping) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        state = next((state[k] for k in ("network", "model") if isinstance(state.get(k), Mapping)), None)
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state_dict of tensors (or a checkpoint holding one under "
                         f"'network' or 'model')")
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            f"{len(missing)} missing key(s), e.g. {missing[:2]}" if missing else "",
            f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:2]}" if unexpected else "",
            f"{len(wrong)} tensor(s) of another shape, e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} in the file vs "
            f"{tuple(expected[wrong[0]].shape)} here" if wrong else "") if part)
        raise ValueError(f"{path} does not fit the configured {type(network).__name__} ({detail}); the network ids "
                         "(channels, num_res_blocks, cond_dim, encoder_depth, pixel_unshuffle, conditioning) must be "
                         "those it was trained with (a demo-profile checkpoint needs configs/demo.yaml)")
    network.load_state_dict(state, strict=True)
    logger.info(f"Loaded network weights from {path}")
    return network


class LoadNetworkWeights:
    """Engine handler: :func:`load_network_weights` when the run starts, so that building the workflow
    (and checking its properties) needs no checkpoint."""

    def __init__(self, network, ckpt_path: str | os.PathLike, map_location="cpu") -> None:
        self.network, self.ckpt_path, self.map_location = network, ckpt_path, map_location

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine=None) -> None:
        load_network_weights(self.network, self.ckpt_path, map_location=self.map_location)


def nova_items(metadata_file: str | os.PathLike, image_dir: str | os.PathLike,
               caption_filter: str | None = "T2") -> list[dict]:
    """Dataset items ``[{"image": path, "filename", "gt_boxes": (n, 4)}]`` of the NOVA images to predict.

    One item per row of ``metadata_file`` kept by ``caption_filter`` (see :func:`read_nova_metadata`).
    Every image must exist in ``image_dir``; missing ones raise a FileNotFoundError listing them, before
    any network call.
    """
    records = read_nova_metadata(metadata_file, caption_filter=caption_filter)
    if not records:
        raise ValueError(f"{metadata_file}: no image left to predict (caption_filter={caption_filter!r})")
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"NOVA image folder not found: {image_dir}")
    items = [{"image": str(image_dir / r["filename"]), "filename": r["filename"],
              "gt_boxes": np.asarray(r["boxes"], dtype=np.float32).reshape(-1, 4)} for r in records]
    missing = [it["filename"] for it in items if not Path(it["image"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {metadata_file} are missing from {image_dir}: "
                                f"{missing[:20]}{' ...' if len(missing) > 20 else ''}")
    return items


class LoadNovaImage:
    """Dictionary transform: replace ``d[key]`` (a PNG path) by the image ``(1, H, W)`` float32 in [0, 1]
    at native resolution (:func:`load_nova_image`)."""

    def __init__(self, key: str = "image") -> None:
        self.key = key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        d[self.key] = load_nova_image(d[self.key])[None]
        return d


# ------------------------------------------------------------------- project protocol: the image frame
#: Training slices: 96 x 96 at 2 mm, where an average brain spans about 72 x 90 pixels (left-right x
#: anterior-posterior); a NOVA head's bounding box is resampled to that area under ``training_scale``.
TRAINING_SIZE = 96
TRAINING_BRAIN_AREA = 72.0 * 90.0
#: ``frame`` vector stored per image: zoom, head centre (row, column, training orientation), native
#: height and width, reoriented flag.
FRAME_FIELDS = ("zoom", "centre_row", "centre_col", "height", "width", "reoriented")


def head_mask(image: np.ndarray, erosion: float = 3.0 / 86.0) -> np.ndarray:
    """Boolean mask of the brain region of a 2D slice in [0, 1], skull or not.

    The head is what lies above a tenth of Otsu's level (holes filled, largest component); inside it the
    brain is the large bright region (above half Otsu's level) closest to the head's centre, which the
    dark skull separates from the scalp; its holes (ventricles) are filled. Eroded by ``erosion`` x its
    extent (the protocol erodes the brain mask by about 3 of the 86 pixels a brain spans in training).
    """
    from scipy import ndimage
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
        from scipy import ndimage

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


def residual_to_native(residual: np.ndarray, frame: np.ndarray, size: int = TRAINING_SIZE) -> np.ndarray:
    """Map a residual computed in the training frame (:class:`NovaTrainingFramed`) back onto the native
    pixels of the image (bilinear; zero outside the canvas)."""
    from scipy import ndimage

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
    import torch

    from custom_components.metrics import erode_brain_mask

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
        from ignite.engine import Events

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
    """Residual ``|x - x_hat|`` on the [0, 1] intensity scale of an image and its reconstruction given in
    [-1, 1] (the reconstruction is clipped to that range first, so the residual lies in [0, 1])."""
    x = np.clip(np.asarray(image, dtype=np.float32), -1.0, 1.0)
    x_hat = np.clip(np.asarray(recon, dtype=np.float32), -1.0, 1.0)
    return np.abs(x - x_hat) * 0.5


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
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine=None) -> None:
        self.predictions = {}

    @staticmethod
    def _numpy(x) -> np.ndarray:
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)

    def __call__(self, engine) -> None:
        images = self._numpy(engine.state.output[self.image_key])
        recons = self._numpy(engine.state.output[self.pred_key])
        names = engine.state.batch[self.name_key]
        names = [names] if isinstance(names, str) else list(names)
        gold = engine.state.batch.get(self.boxes_key) if self.overlay_dir else None
        if images.shape != recons.shape or images.ndim != 4 or images.shape[1] != 1 or len(names) != len(images):
            raise ValueError(f"NovaBoxWriter expects (B, 1, H, W) images and reconstructions and B names, got "
                             f"{images.shape}, {recons.shape} and {len(names)} name(s); use decollate: false")
        batch = engine.state.batch
        frames = self._numpy(batch[self.frame_key]) if self.frame_key in batch else None
        heads = self._numpy(batch[self.mask_key]) if self.mask_key in batch else None
        natives = self._numpy(batch[self.native_key]) if self.native_key in batch else None
        for i, name in enumerate(names):
            residual = residual_01(images[i, 0], recons[i, 0])
            if frames is not None:  # project protocol: back to the native pixels, inside the head
                residual = residual_to_native(residual, frames[i], size=residual.shape[0])
            if heads is not None:
                residual = residual * (heads[i] > 0)
            boxes = boxes_from_residual(residual, threshold=self.threshold, top_k=self.top_k,
                                        median_size=self.median_size)
            self.predictions[str(name)] = boxes
            if self.overlay_dir is not None:
                gt = self._numpy(gold[i]) if gold is not None else np.zeros((0, 4))
                shown = natives[i, 0] if natives is not None else (images[i, 0] + 1.0) * 0.5
                save_overlay(self.overlay_dir / Path(str(name)).with_suffix(".png"), shown, gt, boxes)

    def write(self, engine=None) -> None:
        write_json_atomic(self.predictions_file, self.predictions)
        n_boxes = sum(len(b) for b in self.predictions.values())
        logger.info(f"NOVA predictions: {n_boxes} box(es) on {len(self.predictions)} image(s) -> "
                    f"{self.predictions_file}" + (f"; overlays in {self.overlay_dir}" if self.overlay_dir else ""))


# --------------------------------------------------------------------------------------- metrics
def box_iou(a: np.ndarray, b: np.ndarray, inclusive: bool = False) -> np.ndarray:
    """Pairwise IoU ``(n, m)`` of ``(y_min, x_min, y_max, x_max)`` boxes.

    ``inclusive=True`` is the reference's pixel-inclusive IoU: ``+1`` on each side length and on
    the intersection's; ``False`` is the standard continuous IoU.
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


# ------------------------------------------------------------------------------------ file-level
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
