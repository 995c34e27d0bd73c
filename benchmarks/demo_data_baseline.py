"""The intensity baseline on demo data: how far a plain threshold on the preprocessed T2 gets, no network.

The residual is the preprocessed image itself, post-processed as the protocol does (eroded brain mask,
3D median filter 5); the Dice-optimal threshold is searched on the pooled in-brain voxels of the val
split (``--threshold_method``, the reference's bisection by default) and every test volume is scored at
it. Prints, for BraTS-like and MSLUB-like, the mean Dice and AUPRC over the test volumes (real data:
BraTS21 T2 Dice about 0.20, MSLUB about 0.06), and, when it generates the data, how long that took.

    python benchmarks/demo_data_baseline.py                       # generate the default demo size, then score
    python benchmarks/demo_data_baseline.py --data_root DIR [--cache_dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from custom_components import metrics as M  # noqa: E402
from custom_components.data import load_split, volume_dataset  # noqa: E402
from custom_components.demo import bundle_config  # noqa: E402

DATASETS = ("Brats21", "MSLUB")
DEFAULT_SIZES = dict(n_ixi=40, n_brats=16, n_mslub=12, n_nova=24)


def _volumes(data_root: Path, split: str, cache_dir: Path):
    """(name, post-processed baseline residual, brain mask, segmentation) of every volume of a split."""
    dataset = volume_dataset(load_split(data_root, split), cache_dir, bundle_config("cond_ddpm").get_parsed_content("volume_preprocessing"))
    for item in dataset:
        image = np.asarray(item["image"][0], dtype=np.float32)
        mask = np.asarray(item["mask"][0]) > 0
        seg = np.asarray(item["seg"][0]) > 0
        yield item.get("name", split), M.postprocess_residual(image, mask), mask, seg


def baseline(data_root: Path, dataset: str, cache_dir: Path, threshold_method: str = "bisection") -> dict:
    """Mean test Dice / AUPRC (and the val threshold) of the intensity baseline on one data set."""
    values, labels = [], []
    for _, residual, mask, seg in _volumes(data_root, f"{dataset}_val", cache_dir):
        values.append(residual[mask])
        labels.append(seg[mask])
    val_dice, threshold = M.find_best_threshold(np.concatenate(values), np.concatenate(labels), threshold_method)
    rows = [M.volume_metrics(residual, seg, mask, threshold)
            for _, residual, mask, seg in _volumes(data_root, f"{dataset}_test", cache_dir)]
    return {"threshold": float(threshold), "val_dice": float(val_dice), "n_test": len(rows),
            **{k: float(np.nanmean([r[k] for r in rows])) for k in ("dice", "auprc", "best_dice")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", type=Path, help="an existing data root (default: generate one)")
    parser.add_argument("--cache_dir", type=Path, help="preprocessed-volume cache (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="processes generating the data")
    parser.add_argument("--threshold_method", default="bisection", choices=("bisection", "exact"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data_root
        if data_root is None:
            from custom_components.demo_data import make_demo_data

            start = time.perf_counter()
            data_root = make_demo_data(Path(tmp) / "data", seed=args.seed, workers=args.workers, **DEFAULT_SIZES)
            print(f"data generation ({', '.join(f'{k}={v}' for k, v in DEFAULT_SIZES.items())}, "
                  f"{args.workers} workers): {time.perf_counter() - start:.1f} s")
        cache_dir = args.cache_dir or Path(tmp) / "cache"
        print(f"intensity baseline on {data_root} (threshold: {args.threshold_method} on the val split)")
        for dataset in DATASETS:
            r = baseline(data_root, dataset, cache_dir, args.threshold_method)
            print(f"  {dataset + '-like':<13} Dice {r['dice']:.3f}  AUPRC {r['auprc']:.3f}  best Dice "
                  f"{r['best_dice']:.3f}  (threshold {r['threshold']:.3f}, val Dice {r['val_dice']:.3f}, "
                  f"{r['n_test']} test volumes)")


if __name__ == "__main__":
    main()
