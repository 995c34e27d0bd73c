"""The expensive half of the BraTS21 / MSLUB / IXI evaluation: reconstruct every volume once and save the maps.

``evaluation_dataset`` gives the preprocessed volumes of the given splits tagged with split and data set,
``VolumeReconstructionInferer`` reconstructs each volume (its axial slices as one batch), and ``SaveMaps`` writes the
maps as NIfTI (model resolution) with a ``maps.json`` manifest. Scoring them needs no network: see ``scoring``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer, SliceInferer
from monai.utils import convert_to_numpy, convert_to_tensor
from torch.utils.data import ConcatDataset

from custom_components.utils import (as_bool, atomic_path, check_choice, from_diffusion_range, json_safe,
                                     to_diffusion_range, write_json_atomic)

logger = logging.getLogger(__name__)

RECONSTRUCTIONS = ("ddpm", "none")
MANIFEST = "maps.json"  # written last: a maps folder without it is incomplete


def atomic_save_nifti(array: np.ndarray, affine: np.ndarray, path, header=None) -> Path:
    """Save ``array`` as NIfTI at ``path`` atomically; ``header`` (e.g. the input's) keeps its codes and units."""
    import nibabel as nib

    path = Path(path)
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64), header=header)
    image.set_data_dtype(np.asarray(array).dtype)
    if header is not None:  # nibabel would otherwise keep the input's scaling and intent
        image.header.set_slope_inter(None, None)
    with atomic_path(path, ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix) as tmp:
        nib.save(image, tmp)
    return path


def checkpoint_path(path, reconstruction: str = "ddpm") -> str | None:
    """``path`` when it is needed and exists; None for the intensity baseline; a clear error otherwise."""
    if check_choice("reconstruction", reconstruction, RECONSTRUCTIONS, lower=True) == "none":
        return None
    if path is None or not Path(path).is_file():
        problem = "no cond_ddpm checkpoint given" if path is None else f"cond_ddpm checkpoint {path} does not exist"
        raise FileNotFoundError(f"{problem}: train the model first (cond_ddpm's train.yaml writes models/model.pt) "
                                "and pass --ckpt_path PATH.")
    return str(path)


class VolumeReconstructionInferer(SliceInferer):
    """Reconstruct (N, 1, H, W, D) volumes in [0, 1]: MONAI's ``SliceInferer`` hands the D axial slices of each volume
    as one batch to a [-1, 1] slice inferer (``ReconstructionInferer``); float32, clipped to [0, 1] when ``clamp``
    (the maps keep the raw prediction: the protocol decides). ``reconstruction="none"`` returns zeros without calling
    the network: the residual is then the intensity itself (the intensity baseline)."""

    def __init__(self, slice_inferer: Inferer | None = None, reconstruction: str = "ddpm", clamp: bool = True) -> None:
        super().__init__(spatial_dim=2, roi_size=(-1, -1), mode="constant")  # whole slices, each once
        self.reconstruction = check_choice("reconstruction", reconstruction, RECONSTRUCTIONS, lower=True)
        if self.reconstruction != "none" and slice_inferer is None:
            raise ValueError("VolumeReconstructionInferer needs a slice_inferer unless reconstruction is 'none'.")
        self.slice_inferer, self.clamp = slice_inferer, as_bool(clamp, "clamp")

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore
        volumes = convert_to_tensor(inputs, dtype=torch.float32, track_meta=False)  # slices carry no volume meta
        if self.reconstruction == "none":
            return torch.zeros_like(volumes)

        def reconstruct(slices: torch.Tensor) -> torch.Tensor:
            recon = self.slice_inferer(to_diffusion_range(slices), network, *args, **kwargs).float()
            recon = from_diffusion_range(recon)
            return recon.clamp(0, 1) if self.clamp else recon

        self.sw_batch_size = volumes.shape[-1]  # one network batch per volume: its D slices, in order
        return super().__call__(volumes, reconstruct)


class TagSplit:
    """Add the split's name and data set to every sample (after the cache, so cache entries are shared)."""

    def __init__(self, split: str) -> None:
        self.tags = {"split": split, "dataset": split.split("_")[0]}  # IXI_val_fold0 -> IXI

    def __call__(self, data: Mapping) -> dict:
        return {**data, **self.tags}


def evaluation_dataset(dataset_dir, cache_dir, splits: Sequence[str], preprocessing: Sequence, mode: str = "t2"
                       ) -> ConcatDataset:
    """The volumes of ``splits`` in order through the cached ``preprocessing``, each sample with ``image``, ``mask``,
    ``seg`` (lesion sets), ``name``, ``split`` and ``dataset``; the same cache as training (``volume_dataset``)."""
    from custom_components.data import load_split, volume_dataset

    splits = [splits] if isinstance(splits, str) else list(splits)
    if not splits or len(set(splits)) != len(splits):
        raise ValueError(f"eval_splits must name each split once, got {splits}.")
    parts = []
    for split in splits:
        items = load_split(dataset_dir, split, mode)
        if not items:
            raise ValueError(f"Split {split} of {dataset_dir} lists no volumes.")
        parts.append(volume_dataset(items, cache_dir, preprocessing, transform=TagSplit(split)))
    return ConcatDataset(parts)


class SaveMaps:
    """Evaluator handler: per volume ``<output_dir>/<split>/<name>_{image,reconstruction,residual,mask,seg}.nii.gz``
    (model grid, affine of the preprocessed volume; residual = |image - reconstruction|, raw; seg for lesion
    sets only), and at the end ``maps.json``: ``settings`` and, per split, its data set and volume names."""

    def __init__(self, output_dir, settings: Mapping | None = None, pred_key: str = "pred") -> None:
        self.output_dir, self.pred_key = Path(output_dir), pred_key
        self.settings = dict(settings or {})
        self.splits: dict[str, dict] = {}

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def iteration_completed(self, engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(batch, list) or isinstance(output, list):
            raise ValueError("SaveMaps needs the evaluator to run with decollate=False.")
        images, recons = batch["image"], output[self.pred_key]
        affines = convert_to_numpy(images.affine) if hasattr(images, "affine") else np.eye(4)
        for i in range(images.shape[0]):
            split, name = batch["split"][i], batch["name"][i]
            image, recon = (convert_to_numpy(t[i], dtype=np.float32)[0] for t in (images, recons))
            volumes = {"image": image, "reconstruction": recon, "residual": np.abs(image - recon)}
            for kind in ("mask", "seg") if "seg" in batch else ("mask",):
                volumes[kind] = (convert_to_numpy(batch[kind][i], dtype=np.float32)[0] > 0).astype(np.uint8)
            affine = affines[i] if affines.ndim == 3 else affines
            for kind, array in volumes.items():
                atomic_save_nifti(array, affine, self.output_dir / split / f"{name}_{kind}.nii.gz")
            entry = self.splits.setdefault(split, {"dataset": batch["dataset"][i], "volumes": []})
            entry["volumes"].append(name)

    def epoch_completed(self, engine) -> None:
        write_json_atomic(self.output_dir / MANIFEST, {"settings": json_safe(self.settings), "splits": self.splits})
        logger.info("Maps of %d volumes written to %s", sum(len(s["volumes"]) for s in self.splits.values()),
                    self.output_dir)
