"""Small helpers the bundles share: atomic file writes (a reader never sees half a file), yes/no flags, choice
checks, MLflow-safe metric names and the intensity-range convention."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np


@contextmanager
def atomic_path(path, ext: str = ""):
    """A temporary file beside ``path`` to write to: moved onto ``path`` when the block succeeds, removed when it
    fails. ``ext`` ends the temporary name, for writers that pick the format from it (``.png``, ``.nii.gz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{ext}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_safe(value):
    """NaN / infinity -> None, numpy scalars -> Python numbers, paths -> strings, recursively: standard JSON."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return str(value) if isinstance(value, Path) else value


def write_json_atomic(path, obj) -> str:
    """Write ``obj`` as indented standard JSON (see :func:`json_safe`) to ``path`` atomically."""
    return str(write_text_atomic(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n"))


TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0", "", "none", "null")


def as_bool(value, name: str = "value") -> bool:
    """A yes/no setting that may arrive as a string from the command line (``--baseline true``)."""
    if not isinstance(value, str):
        return bool(value)
    text = value.strip().lower()
    if text not in TRUE_WORDS + FALSE_WORDS:
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return text in TRUE_WORDS


def check_choice(name: str, value, choices: tuple, lower: bool = False) -> str:
    """``value`` (lower-cased first when ``lower``) if one of ``choices``, else a ValueError naming the setting."""
    key = str(value).lower() if lower else value
    if key not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.")
    return key


def mlflow_metric_name(key: str) -> str:
    """A metric name MLflow accepts: ``mAP@50:95`` -> ``mAP_50-95``, ``fpr5%/dice`` -> ``fpr5pct/dice``."""
    return key.replace("@", "_").replace(":", "-").replace("%", "pct")


# The intensity-range convention, its one home: data (volumes, slices, residuals) live in [0, 1]; the diffusion
# model (noise, network input and output) works in [-1, 1].
def to_diffusion_range(x):
    """[0, 1] intensities -> the diffusion model's [-1, 1]."""
    return x * 2 - 1


def from_diffusion_range(y):
    """The diffusion model's [-1, 1] -> [0, 1] intensities (no clipping)."""
    return (y + 1) / 2
