"""Small helpers the bundles share: atomic file writes (a reader never sees half a file) and yes/no flags."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_json_atomic(path, obj) -> str:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return str(write_text_atomic(path, json.dumps(obj, indent=2) + "\n"))


def as_bool(value, name: str = "value") -> bool:
    """A yes/no setting that may arrive as a string from the command line (``--save_maps true``)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0", "", "none", "null"):
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}.")
    return bool(value)
