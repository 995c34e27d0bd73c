"""Validate a data root before training: every split CSV, every file present and readable, shapes agree,
brain masks non-empty. Prints one table row per split and the list of problems."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from custom_components.data import DataError, read_split, split_names


def _inspect_volume(path: str, is_mask: bool) -> tuple[tuple | None, str | None]:
    """(shape, problem) of one NIfTI file; reads the data so that truncated files are caught."""
    if not Path(path).is_file():
        return None, f"missing file {path}"
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises several types for corrupt files
        return None, f"unreadable file {path}: {err}"
    if is_mask and not data.any():
        return data.shape, f"empty brain mask {path}"
    return data.shape, None


def check_data_root(data_root, mode: str = "t2") -> tuple[pd.DataFrame, list[str]]:
    """Check every split of ``data_root``; returns a table (one row per split) and the problems found."""
    data_root = Path(data_root)
    names = split_names(data_root) if data_root.is_dir() else []
    if not names:
        return pd.DataFrame(), [f"no split CSVs found in {data_root / 'splits'}"]
    inspected: dict[str, tuple] = {}
    rows, problems = [], []
    for name in names:
        csv_path = data_root / "splits" / f"{name}.csv"
        try:
            items = read_split(csv_path, data_root, mode=mode, check_files=False)
        except (DataError, ValueError, KeyError) as err:
            problems.append(f"{name}: {err}")
            rows.append({"split": name, "volumes": 0, "with seg": 0, "problems": 1})
            continue
        split_problems = []
        for item in tqdm(items, desc=f"checking {name}", leave=False, disable=None):
            shapes = {}
            for key in ("image", "mask", "seg"):
                if item[key] is None:
                    continue
                if item[key] not in inspected:
                    inspected[item[key]] = _inspect_volume(item[key], is_mask=key == "mask")
                shapes[key], problem = inspected[item[key]]
                if problem:
                    split_problems.append(f"{name}: {item['name']}: {problem}")
            known = {k: s for k, s in shapes.items() if s is not None}
            if len(set(known.values())) > 1:
                split_problems.append(f"{name}: {item['name']}: shapes differ {known}")
        problems += split_problems
        rows.append({"split": name, "volumes": len(items), "with seg": sum(i["seg"] is not None for i in items),
                     "problems": len(split_problems)})
    return pd.DataFrame(rows), problems


def check_data(data_root, mode: str = "t2") -> int:
    """Print the per-split table and every problem; return 0 when the data root is usable, else 1."""
    table, problems = check_data_root(data_root, mode)
    if not table.empty:
        print(table.to_string(index=False))
    if problems:
        print(f"\n{len(problems)} problem(s) in {data_root}:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"\n{data_root}: all {len(table)} splits OK.")
    return 0
