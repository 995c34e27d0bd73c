"""The Dice the evaluation's post-processing leaves a perfect anomaly map, per lesion split of a maps folder.

Each volume's ground-truth segmentation itself is taken as the residual and goes through what a model's residual
goes through: the eroded brain mask, the 3D median filter, then ``segment`` at 0.5 (which drops components of up to
7 voxels). On the protocol's 2 mm voxels a median filter of 5 removes lesions less than about a centimetre across,
so on MS lesions this bound lies far below 1: read a model's Dice against it, not against 1. Works on any maps folder
(``cond_ddpm``'s evaluate.yaml), demo data or the real BraTS21 / MSLUB.

    python benchmarks/postprocessing_ceiling.py --maps_dir W/eval/maps [--median_sizes 5,3,1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from custom_components import metrics as M  # noqa: E402
from custom_components.evaluation import MANIFEST  # noqa: E402


def perfect_map_dice(seg: np.ndarray, mask: np.ndarray, median_size: int) -> float:
    """Dice of ``seg`` against itself after the protocol's post-processing; NaN without lesion."""
    residual = M.postprocess_residual((seg > 0).astype(np.float32), mask, median_size)
    return M.threshold_metrics(residual, seg, mask, 0.5, region="volume", hausdorff=False)["dice"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--maps_dir", required=True, help="a finished maps folder (holds maps.json)")
    parser.add_argument("--median_sizes", default="5", help="comma-separated median filter sizes (protocol: 5)")
    args = parser.parse_args(argv)
    import nibabel as nib

    maps_dir = Path(args.maps_dir)
    manifest_path = maps_dir / MANIFEST
    if not manifest_path.is_file():
        parser.error(f"{manifest_path} does not exist: {maps_dir} is not a finished maps folder.")
    sizes = [int(s) for s in args.median_sizes.split(",")]
    print(f"{'split':<16} {'volumes':>7} " + " ".join(f"{f'median {s}: Dice':>16} {'lost':>5}" for s in sizes))
    for split, entry in json.loads(manifest_path.read_text())["splits"].items():
        dice = {s: [] for s in sizes}
        for name in entry["volumes"]:
            seg_path = maps_dir / split / f"{name}_seg.nii.gz"
            if not seg_path.is_file():  # a healthy volume: nothing to find
                continue
            seg = np.asanyarray(nib.load(str(seg_path)).dataobj)
            mask = np.asanyarray(nib.load(str(maps_dir / split / f"{name}_mask.nii.gz")).dataobj)
            for s in sizes:
                dice[s].append(perfect_map_dice(seg, mask, s))
        if not dice[sizes[0]]:
            continue
        cells = [f"{np.nanmean(d):>16.3f} {sum(v == 0 for v in d):>5}" for d in dice.values()]
        print(f"{split:<16} {len(dice[sizes[0]]):>7} " + " ".join(cells))
    print("Dice: mean over the split's volumes; lost: volumes none of whose lesion voxels survive.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
