"""Throughput of the data pipeline on a data root: preprocessing (uncached, then cached) and training slices.

Prints
- seconds per volume of the first pass through ``volume_dataset`` (curvature flow, crop, rescale, resample,
  written to the disk cache), and of a second pass that reads the cache;
- training slices per second through MONAI's DataLoader with the training transforms of cond_ddpm's
  train.yaml (``RandAxialSliced``, intensity augmentation, scaling to [-1, 1]), batch 32, for
  ``num_workers`` 0 and 2. Each epoch draws ``slices_per_volume`` slices per volume; epochs repeat until
  ``--min_slices`` slices were loaded (workers are started per epoch, as in training).

    python -m custom_components demo_data --out /tmp/demo_root
    python benchmarks/data_pipeline.py --data_root /tmp/demo_root [--cache_dir DIR] [--split IXI_train_fold0]

Without ``--cache_dir`` a temporary cache is used and removed; with it, volumes already cached there
make the "uncached" figure a cached one (the script says how many it found).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from monai.data import DataLoader  # noqa: E402
from monai.transforms import Compose  # noqa: E402
from monai.utils import set_determinism  # noqa: E402

from custom_components.data import load_split, volume_dataset  # noqa: E402
from custom_components.demo import bundle_config  # noqa: E402


def preprocessing_pass(items: list[dict], cache_dir: Path) -> float:
    """Seconds per volume to fetch every preprocessed volume once."""
    dataset = volume_dataset(items, cache_dir, bundle_config("cond_ddpm").get_parsed_content("volume_preprocessing"))
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return (time.perf_counter() - start) / len(dataset)


def training_transform(slices_per_volume: int, augment: bool) -> Compose:
    """The per-sample transforms of cond_ddpm's train.yaml (``train#preprocessing``), or its slicer and scaling
    alone."""
    config = bundle_config("cond_ddpm", ("common.yaml", "train.yaml"), slices_per_volume=slices_per_volume)
    if augment:
        return config.get_parsed_content("train#preprocessing")
    return Compose([config.get_parsed_content("train#slicer"), config.get_parsed_content("to_diffusion_range")])


def slices_per_second(items: list[dict], cache_dir: Path, num_workers: int, batch_size: int,
                      slices_per_volume: int, augment: bool, min_slices: int) -> tuple[float, int]:
    """Training slices per second (and how many were loaded) through the DataLoader."""
    preprocessing = bundle_config("cond_ddpm").get_parsed_content("volume_preprocessing")
    dataset = volume_dataset(items, cache_dir, preprocessing, transform=training_transform(slices_per_volume, augment))
    loader = DataLoader(dataset, batch_size=max(batch_size // slices_per_volume, 1), shuffle=True,
                        num_workers=num_workers)
    loaded = 0
    start = time.perf_counter()
    while loaded < min_slices:
        for batch in loader:
            assert batch["image"].shape[1:] == (1, 96, 96), batch["image"].shape
            loaded += batch["image"].shape[0]
    return loaded / (time.perf_counter() - start), loaded


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_root", required=True)
    parser.add_argument("--cache_dir", default=None, help="persistent cache (default: a temporary one)")
    parser.add_argument("--split", default="IXI_train_fold0")
    parser.add_argument("--mode", default="t2")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--slices_per_volume", type=int, default=1)
    parser.add_argument("--no_augment", action="store_true", help="leave out the intensity augmentation")
    parser.add_argument("--min_slices", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--torch_threads", type=int, default=0, help="0 keeps torch's default")
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    set_determinism(seed=0)

    items = load_split(args.data_root, args.split, mode=args.mode)
    temporary = args.cache_dir is None
    cache_dir = Path(tempfile.mkdtemp(prefix="uad-cache-") if temporary else args.cache_dir)
    cached_before = len(list(cache_dir.glob("*.pt")))
    print(f"{args.split}: {len(items)} volumes of {args.data_root}; cache {cache_dir}"
          + (f" (already holds {cached_before} volumes)" if cached_before else ""))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    try:
        first = preprocessing_pass(items, cache_dir)
        print(f"first pass (preprocess + write cache): {first:7.3f} s/volume")
        cached = preprocessing_pass(items, cache_dir)
        print(f"cached pass (read cache):              {cached:7.3f} s/volume  ({first / cached:.0f}x faster)")
        for workers in args.workers:
            rate, n = slices_per_second(items, cache_dir, workers, args.batch_size, args.slices_per_volume,
                                        not args.no_augment, args.min_slices)
            print(f"training slices, batch {args.batch_size}, num_workers {workers}: {rate:7.1f} slices/s "
                  f"({n} slices, {args.slices_per_volume} per volume per epoch"
                  f"{', no augmentation' if args.no_augment else ''})")
    finally:
        if temporary:
            shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
