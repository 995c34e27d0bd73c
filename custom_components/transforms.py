"""The dictionary transforms MONAI lacks, for the preprocessing and slice sampling the bundle configs list.

ITK curvature-flow smoothing, percentile rescale inside the brain mask, random / all axial slices, and torchio's
ghosting and gamma augmentations; each pipeline itself is a transform list in a bundle's ``common.yaml``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import itk
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import CenterSpatialCrop, MapTransform, Randomizable

from .utils import check_choice

CROP_SIZE = (192, 192, 100)  # the crop of the preprocessing (common.yaml's crop_size), for input checks


class CurvatureFlowd(MapTransform):
    """Edge-preserving smoothing with ITK's ``CurvatureFlowImageFilter`` (as the reference preprocessing).

    With ``roi_size``, only the centre crop that a later ``ResizeWithPadOrCrop(roi_size)`` keeps is smoothed,
    plus a margin of ``iterations + 1`` voxels: inside the crop the result equals smoothing the whole volume
    (each iteration reads only the 3x3x3 neighbourhood), at a fraction of the cost.
    """

    def __init__(self, keys: KeysCollection, time_step: float = 0.125, iterations: int = 3,
                 roi_size: Sequence[int] | None = None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.time_step, self.iterations, self.roi_size = time_step, iterations, roi_size

    def _region(self, shape: Sequence[int]) -> tuple[slice, ...]:
        if self.roi_size is None:
            return tuple(slice(0, n) for n in shape)
        margin = self.iterations + 1
        crop = CenterSpatialCrop(self.roi_size).compute_slices(shape)
        return tuple(slice(max(c.start - margin, 0), min(c.stop + margin, n)) for c, n in zip(crop, shape))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            array = np.array(img, dtype=np.float32)
            region = self._region(array.shape[1:])
            for channel in array:
                itk_img = itk.image_view_from_array(np.ascontiguousarray(channel[region]))
                smoothed = itk.curvature_flow_image_filter(
                    itk_img, time_step=self.time_step, number_of_iterations=self.iterations)
                channel[region] = itk.array_from_image(smoothed)
            smoothed = torch.as_tensor(array)
            d[key] = MetaTensor(smoothed, meta=img.meta) if isinstance(img, MetaTensor) else smoothed
        return d


class MaskedPercentileRescaled(MapTransform):
    """Map the ``lower``-``upper`` percentiles of the intensities inside the brain mask to [0, 1], clipped."""

    def __init__(self, keys: KeysCollection, mask_key: str = "mask", lower: float = 1.0, upper: float = 99.0,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key, self.lower, self.upper = mask_key, lower, upper

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        brain = d[self.mask_key] > 0
        for key in self.key_iterator(d):
            img = d[key]
            inside = img[brain] if brain.any() else img.flatten()
            lo, hi = torch.quantile(inside.float(), torch.tensor([self.lower / 100, self.upper / 100])).tolist()
            d[key] = ((img - lo) / max(hi - lo, 1e-8)).clamp(0, 1)
        return d


SLICE_CHOICES = ("brain", "all")


class RandAxialSliced(Randomizable, MapTransform):
    """Random axial slices (last axis), for every key: (C,H,W,D) -> (C,H,W), drawn uniformly among the slices
    with brain (``slices="brain"``) or among all of them, empty ones included (``slices="all"``, the reference).

    ``num_samples=1`` gives one slice per volume (an epoch is one slice per volume, as in the reference); more give a list
    of slices that the DataLoader flattens into the batch. The chosen index is stored under ``"slice"``.
    """

    def __init__(self, keys: KeysCollection, mask_key: str = "mask", num_samples: int = 1, slices: str = "brain",
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.mask_key, self.num_samples = mask_key, num_samples
        self.slices = check_choice("slices", slices, SLICE_CHOICES)

    def __call__(self, data):
        d = dict(data)
        per_slice = d[self.mask_key].flatten(0, -2).sum(0)
        candidates = torch.arange(len(per_slice)) if self.slices == "all" else torch.nonzero(per_slice > 0).flatten()
        if len(candidates) == 0:
            raise ValueError(f"The brain mask of {d.get('name', 'a volume')} is empty: no slice to sample.")
        samples = []
        for index in self.R.randint(len(candidates), size=self.num_samples):
            z = int(candidates[index])
            sample = {**d, **{key: d[key][..., z] for key in self.key_iterator(d)}, "slice": z}
            samples.append(sample)
        return samples[0] if self.num_samples == 1 else samples


class RandGhostingd(Randomizable, MapTransform):
    """MRI ghosting artefact: scale every ``n``-th k-space plane along one random spatial axis (cf. torchio).

    ``spatial_dims`` 2 for slices (C, H, W), 3 for volumes (C, H, W, D). ``restore`` is the fraction of the k-space
    centre (along the axis) left intact; ``None`` leaves only the central plane, as torchio does.
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.5, num_ghosts: Sequence[int] = (4, 10),
                 intensity: Sequence[float] = (0.5, 1.0), restore: float | None = 0.02, spatial_dims: int = 2,
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.prob, self.num_ghosts, self.intensity, self.restore = prob, num_ghosts, intensity, restore
        self.spatial_dims = spatial_dims

    def __call__(self, data):
        d = dict(data)
        if self.R.rand() >= self.prob:
            return d
        n = self.R.randint(self.num_ghosts[0], self.num_ghosts[1] + 1)
        strength = self.R.uniform(*self.intensity)
        axis = -1 - self.R.randint(self.spatial_dims)
        dims = tuple(range(-self.spatial_dims, 0))
        for key in self.key_iterator(d):
            img = d[key]
            spectrum = torch.fft.fftshift(torch.fft.fftn(img.float(), dim=dims), dim=dims)
            size = img.shape[axis]
            keep = torch.ones(size)
            keep[::n] = 1 - strength
            centre = size // 2
            if self.restore is None:
                keep[centre] = 1.0
            else:
                half = max(int(self.restore * size / 2), 1)
                keep[centre - half:centre + half] = 1.0
            shape = [1] * img.ndim
            shape[axis] = size
            spectrum = spectrum * keep.reshape(shape)
            ghosted = torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=dims), dim=dims).real
            d[key] = ghosted.to(img.dtype) if not isinstance(img, MetaTensor) else MetaTensor(ghosted, meta=img.meta)
        return d


class RandGammad(Randomizable, MapTransform):
    """torchio's random gamma: ``I -> sign(I) |I|^gamma`` with ``log(gamma)`` uniform in ``log_gamma``, no rescaling
    (MONAI's ``RandAdjustContrast`` draws gamma uniformly and rescales to the image's range first)."""

    def __init__(self, keys: KeysCollection, prob: float = 0.5, log_gamma: Sequence[float] = (-0.3, 0.3),
                 allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.prob, self.log_gamma = prob, log_gamma

    def __call__(self, data):
        d = dict(data)
        if self.R.rand() >= self.prob:
            return d
        gamma = float(np.exp(self.R.uniform(*self.log_gamma)))
        for key in self.key_iterator(d):
            d[key] = d[key].sign() * d[key].abs() ** gamma
        return d


class AxialSlicesd(MapTransform):
    """All axial slices of a volume, in order, as a list of 2D samples (the DataLoader flattens the list).

    With ``brain_only`` only slices with brain are kept (validation losses); without, all of them
    (evaluation, where the slices are stacked back into a volume).
    """

    def __init__(self, keys: KeysCollection, mask_key: str = "mask", brain_only: bool = True,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask_key, self.brain_only = mask_key, brain_only

    def __call__(self, data) -> list[dict]:
        d = dict(data)
        depth = d[self.mask_key].shape[-1]
        has_brain = d[self.mask_key].flatten(0, -2).sum(0) > 0
        slices = []
        for z in range(depth):
            if self.brain_only and not has_brain[z]:
                continue
            sample = dict(d)
            for key in self.key_iterator(d):
                sample[key] = d[key][..., z]
            sample["slice"] = z
            slices.append(sample)
        return slices
