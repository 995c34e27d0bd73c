"""Reading the distributed split CSVs (IXI, BraTS21, MSLUB) into MONAI data lists.

The split CSVs list t1 paths relative to the data root (despite their leading ``/``), e.g.
``/Train/ixi/t1/IXI076-Guys-0753_t1.nii.gz``; mode ``t2`` rewrites the ``t1`` folder and file suffix
(and BraTS ``FLAIR.nii.gz``) to ``t2``, and drops IXI rows whose T2 file is not in ``avail_t2.csv``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.data import PersistentDataset
from monai.data.utils import json_hashing
from monai.transforms import Compose, Transform

SPLITS_DIR = "splits"
AVAIL_T2 = "avail_t2.csv"
MODES = ("t1", "t2")


class DataError(ValueError):
    """A data root, split file or volume that cannot be used, with a message naming what and where."""


def _rewrite_mode(path: str, mode: str) -> str:
    """Point a distributed t1 path at the ``mode`` volume: the ``t1`` folder and the ``_t1``/FLAIR suffix."""
    if mode == "t1":
        return path
    path = re.sub(r"(^|/)t1(/)", rf"\g<1>{mode}\g<2>", path)
    return re.sub(r"(_t1|_?FLAIR)(\.nii(\.gz)?)$", rf"_{mode}\g<2>", path)


def _resolve(data_root: Path, path) -> str | None:
    """An absolute path under ``data_root`` for a CSV path; None for an empty cell."""
    return str(data_root / path.strip().lstrip("/")) if isinstance(path, str) and path.strip() else None


def read_split(csv_path, data_root, mode: str = "t2", check_files: bool = True) -> list[dict]:
    """One distributed split CSV as dicts with ``image``, ``mask``, ``seg`` (None for healthy rows), ``name``, ``age``
    and ``label``, paths absolute under ``data_root``; one :class:`DataError` lists the missing files (first 20)."""
    if mode not in MODES:
        raise DataError(f"mode must be one of {MODES}, got {mode!r}.")
    csv_path, data_root = Path(csv_path), Path(data_root)
    if not csv_path.is_file():
        raise DataError(f"Split file {csv_path} does not exist.")
    table = pd.read_csv(csv_path, index_col=0)
    missing_columns = {"img_name", "label", "img_path", "mask_path"} - set(table.columns)
    if missing_columns:
        raise DataError(f"{csv_path} lacks the column(s) {sorted(missing_columns)}; found {list(table.columns)}.")
    is_ixi = table["img_path"].astype(str).str.contains("/ixi/", case=False)
    if mode == "t2" and is_ixi.any():
        avail = csv_path.parent / AVAIL_T2
        if not avail.is_file():
            raise DataError(f"Mode 't2' needs {avail} (the list of IXI subjects with a T2 volume); it does not exist.")
        available = set(pd.read_csv(avail, index_col=0).iloc[:, 0].astype(str).map(lambda s: Path(s).name))
        rewritten = table["img_path"].astype(str).map(lambda p: Path(_rewrite_mode(p, mode)).name)
        table = table[~is_ixi | rewritten.isin(available)]
    items = []
    for row in table.itertuples(index=False):
        age = getattr(row, "age", None)
        items.append({
            "image": _resolve(data_root, _rewrite_mode(str(row.img_path), mode)),
            "mask": _resolve(data_root, row.mask_path),
            "seg": _resolve(data_root, getattr(row, "seg_path", None)),
            "name": str(row.img_name).replace(".nii.gz", ""),
            "age": None if pd.isna(age) else float(age),
            "label": int(row.label),
        })
    missing = [p for item in items for p in (item["image"], item["mask"], item["seg"])
               if check_files and p is not None and not Path(p).is_file()]
    if missing:
        shown = "\n  ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise DataError(f"{len(missing)} file(s) listed in {csv_path} are missing:\n  {shown}")
    return items


def split_names(data_root) -> list[str]:
    """The split CSVs present under ``data_root/splits`` (without ``avail_t2``), sorted."""
    return sorted(p.stem for p in (Path(data_root) / SPLITS_DIR).glob("*.csv") if p.name != AVAIL_T2)


def load_split(data_root, name: str, mode: str = "t2") -> list[dict]:
    """Read the split ``name`` (e.g. ``"IXI_train_fold0"``, ``"Brats21_test"``) of a data root."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise DataError(f"dataset_dir {data_root} does not exist or is not a folder.")
    csv_path = data_root / SPLITS_DIR / f"{name}.csv"
    if not csv_path.is_file():
        available = ", ".join(split_names(data_root)) or "none"
        raise DataError(f"No split file {csv_path}. Splits available in {data_root / SPLITS_DIR}: {available}.")
    return read_split(csv_path, data_root, mode=mode)


def transform_settings(obj):
    """The settings of (a list of) transforms as plain data, nested transforms included; any other object (an
    image reader, a function) by its class name and private flags left out, so run-time state never counts."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [transform_settings(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): transform_settings(v) for k, v in obj.items()}
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, Transform):
        public = {k: v for k, v in vars(obj).items() if not k.startswith("_") or isinstance(v, Transform)}
        return {type(obj).__qualname__: transform_settings(public)}
    return str(obj) if isinstance(obj, (type, torch.dtype, np.dtype)) else type(obj).__qualname__


def volume_dataset(items: list[dict], cache_dir, preprocessing: Sequence, transform=None) -> PersistentDataset:
    """The volumes of ``items`` through ``preprocessing`` (the deterministic transform list of a bundle's
    ``common.yaml``), cached on disk in ``cache_dir`` under a name made of the item and the transforms' settings, so
    other settings never reuse stale volumes; ``transform`` (slicing, augmentation) runs after the cache."""
    # a Compose counts as random for PersistentDataset, so wrapping ``transform`` in one stops the cache there;
    # the cache names hash ``preprocessing`` alone (MONAI's own hash would look into that Compose)
    steps = [*preprocessing, *([Compose([transform])] if transform else [])]
    data = [{k: v for k, v in item.items() if v is not None} for item in items]  # no seg/age: key left out
    # track_meta: cached volumes keep their MetaTensor affine like freshly computed ones (a batch never mixes
    # the two types); the cache holds only files this function wrote, hence weights_only=False
    return PersistentDataset(data, transform=Compose(steps), cache_dir=cache_dir,
                             hash_transform=lambda _: json_hashing(transform_settings(preprocessing)),
                             track_meta=True, weights_only=False)
