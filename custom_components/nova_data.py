"""NOVA benchmark, reading: the PNG images, ``metadata.csv`` and its ``bbox_gold`` boxes, and the dataset items.

Gold boxes are ``(y, x, y + height, x + width)`` in float pixels, rows first as ``skimage.measure.regionprops``
gives boxes (the convention of ``nova_inference`` and ``nova_metrics`` too).
"""

from __future__ import annotations

import ast
import csv
import math
import os
from numbers import Real
from pathlib import Path

import numpy as np

__all__ = ["load_nova_image", "parse_bbox", "read_nova_filenames", "read_nova_metadata", "nova_items"]

#: Columns metadata.csv must have.
METADATA_COLUMNS = ("filename", "caption", "case_id", "bbox_gold")
BBOX_KEYS = ("x", "y", "width", "height")


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

