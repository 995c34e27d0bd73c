"""NOVA benchmark, reading: the PNG images, ``metadata.csv`` and its ``bbox_gold`` boxes, and the dataset items.

Gold boxes are ``(y, x, y + height, x + width)`` in float pixels, rows first as regionprops gives boxes.
"""

from __future__ import annotations

import ast
import csv
import math
import os
from collections import Counter
from numbers import Real
from pathlib import Path

import numpy as np

BBOX_KEYS = ("x", "y", "width", "height")


def load_nova_image(path: str | os.PathLike) -> np.ndarray:
    """A NOVA PNG at native resolution as float32 ``(H, W)`` in [0, 1]; RGB(A) to gray by ITU-R 601 luma."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NOVA image not found: {path}")
    try:
        with Image.open(path) as img:
            if img.mode in ("1", "P", "PA"):  # bilevel to 0/255, palette indices to their colours
                img = img.convert("L" if img.mode == "1" else "RGBA")
            mode, arr = img.mode, np.asarray(img)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from e
    if mode in ("LA", "RGBA"):
        arr = arr[..., :-1]  # drop alpha
    channels = arr.shape[-1] if arr.ndim == 3 else 1
    # 16-bit PNGs open as "I;16" or "I" depending on Pillow's version
    if not (mode.startswith("I") or arr.dtype in (np.uint8, np.uint16)) or channels not in (1, 3):
        raise ValueError(f"{path}: unsupported image mode {mode!r} (dtype {arr.dtype}, shape {arr.shape})")
    arr, scale = arr.astype(np.float64), 255.0 if arr.dtype == np.uint8 else 65535.0
    if arr.ndim == 3:
        arr = arr[..., 0] if arr.shape[-1] == 1 else arr @ np.array([0.299, 0.587, 0.114])
    return np.clip(arr / scale, 0.0, 1.0).astype(np.float32)


def parse_bbox(text: str | None, filename: str = "<unknown>") -> np.ndarray:
    """``(n, 4)`` float boxes ``(y, x, y + height, x + width)`` of a ``bbox_gold`` cell: a Python-literal dict
    ``{'x': [...], 'y': [...], 'width': [...], 'height': [...]}`` read with ``ast.literal_eval`` (never ``eval``),
    empty/NaN for no box. Anything else raises a ValueError naming ``filename`` and the problem."""
    if text is None or str(text).strip().lower() in ("", "nan", "none"):
        return np.zeros((0, 4), dtype=np.float64)
    short = repr(text if len(text) <= 120 else text[:117] + "...")
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise ValueError(f"{filename}: bbox_gold is not a Python literal dict ({type(e).__name__}): {short}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{filename}: bbox_gold must be a dict, got {type(value).__name__}: {short}")
    missing = [k for k in BBOX_KEYS if k not in value]
    if missing:
        raise ValueError(f"{filename}: bbox_gold lacks key(s) {missing}: {short}")
    columns = {}
    for key in BBOX_KEYS:
        items = list(value[key]) if isinstance(value[key], (list, tuple)) else [value[key]]
        bad = [v for v in items if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v)]
        if bad:
            raise ValueError(f"{filename}: bbox_gold['{key}'] holds a non-number or non-finite {bad[0]!r}: {short}")
        if key in ("width", "height") and min(items, default=0) < 0:
            raise ValueError(f"{filename}: bbox_gold['{key}'] holds a negative value: {short}")
        columns[key] = np.asarray(items, dtype=np.float64)
    lengths = {k: len(c) for k, c in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{filename}: bbox_gold lists differ in length {lengths}: {short}")
    x, y, w, h = (columns[k] for k in BBOX_KEYS)
    return np.stack([y, x, y + h, x + w], axis=1).reshape(-1, 4)


def read_metadata_rows(csv_path: str | os.PathLike) -> list[dict]:
    """Rows of metadata.csv as dicts of strings, after checking the file, its columns and its filenames."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in ("filename", "caption", "case_id", "bbox_gold") if c not in header]
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {missing}; found {header}")
        rows = list(reader)
    names = [(row.get("filename") or "").strip() for row in rows]
    if "" in names:
        raise ValueError(f"{csv_path}: row at line {names.index('') + 2} has an empty filename")
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"{csv_path}: duplicated filename(s) {duplicates[:20]}")
    return [{**row, "filename": name} for row, name in zip(rows, names)]


def read_nova_metadata(csv_path: str | os.PathLike, caption_filter: str | None = "T2") -> list[dict]:
    """``[{filename, caption, case_id, boxes}]`` of the rows whose caption contains ``caption_filter`` (case-sensitive,
    as the protocol's "T2"; None or "" keeps all: ``monai.bundle`` drops ``None`` overrides); only those are parsed."""
    records = []
    for row in read_metadata_rows(csv_path):
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
    """Dataset items ``[{"image": path, "filename", "gt_boxes": (n, 4)}]``, one per row kept by ``caption_filter``;
    missing images raise a FileNotFoundError listing them, before any network call."""
    records = read_nova_metadata(metadata_file, caption_filter=caption_filter)
    if not records:
        raise ValueError(f"{metadata_file}: no image left to predict (caption_filter={caption_filter!r})")
    items = [{"image": str(Path(image_dir) / r["filename"]), "filename": r["filename"],
              "gt_boxes": np.asarray(r["boxes"], dtype=np.float32).reshape(-1, 4)} for r in records]
    missing = [it["filename"] for it in items if not Path(it["image"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) listed in {metadata_file} are missing from {image_dir}: "
                                f"{missing[:20]}{' ...' if len(missing) > 20 else ''}")
    return items
