"""Quick-look figures: a grid of axial slices of a split with the lesion segmentation outlined."""

from __future__ import annotations

import nibabel as nib
import numpy as np

from custom_components.data import load_split
from custom_components.figures import plt, save_figure


def _show_slice(volume: np.ndarray, seg: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The axial slice with the most lesion voxels (the middle slice when there is no lesion)."""
    z = volume.shape[2] // 2
    if seg is not None and seg.any():
        z = int(np.argmax(seg.reshape(-1, seg.shape[2]).sum(0)))
    return np.rot90(volume[:, :, z]), None if seg is None else np.rot90(seg[:, :, z] > 0)


def preview(data_root, split: str = "Brats21_test", out: str = "preview.png", n: int = 12, mode: str = "t2",
            columns: int = 6) -> str:
    """Save a PNG grid of ``n`` volumes of ``split``: the slice with the largest lesion, lesion outlined in red."""
    items = load_split(data_root, split, mode=mode)[:n]
    if not items:
        raise ValueError(f"Split {split} of {data_root} lists no volumes.")
    columns = min(columns, len(items))
    rows = -(-len(items) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items):
        volume = np.asanyarray(nib.load(item["image"]).dataobj)
        seg = np.asanyarray(nib.load(item["seg"]).dataobj) if item["seg"] else None
        image, outline = _show_slice(volume, seg)
        ax.imshow(image, cmap="gray")
        if outline is not None and outline.any():
            ax.contour(outline, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(item["name"], fontsize=7)
    fig.suptitle(f"{split}: {len(items)} volumes, lesions outlined", fontsize=10)
    return str(save_figure(fig, out))
