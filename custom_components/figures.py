"""matplotlib without a display (the Agg backend) and an atomic figure writer, for every module that draws."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from custom_components.utils import atomic_path  # noqa: E402


def save_figure(fig, out) -> Path:
    """Write a figure atomically (temp file + rename) and close it."""
    out = Path(out)
    try:
        with atomic_path(out, out.suffix) as tmp:
            fig.savefig(tmp, dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return out
