"""The dictionary transforms MONAI lacks, for the bundles' preprocessing (``common.yaml``) and slice sampling: ITK
curvature flow, percentile rescale inside the brain mask, random / all axial slices, torchio's ghosting and gamma."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import itk
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import CenterSpatialCrop, MapTransform, Randomizable

from .utils import check_choice

CROP_SIZE = (192, 192, 100)  # the crop of the preprocessing (common.yaml's crop_size), for input checks


class CurvatureFlowd(MapTransform):
    """Edge-preserving smoothing with ITK's ``CurvatureFlowImageFilter`` (as the reference preprocessing). With
    ``roi_size``, only the centre crop a later ``ResizeWithPadOrCrop(roi_size)`` keeps is smoothed, plus a margin of
    ``iterations + 1`` voxels: inside the crop the result equals smoothing the whole volume (each iteration reads
    only the 3x3x3 neighbourhood), at a fraction of the cost."""

    def __init__(self, keys: KeysCollection, time_step: float = 0.125, iterations: int = 3,
                 roi_size: Sequence[int] | None = None):
        super().__init__(keys)
        self.time_step, self.iterations, self.roi_size = time_step, iterations, roi_size

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            array = np.array(img, dtype=np.float32)
            shape = array.shape[1:]
            region = tuple(slice(0, n) for n in shape)
            if self.roi_size is not None:
                m, crop = self.iterations + 1, CenterSpatialCrop(self.roi_size).compute_slices(shape)
                region = tuple(slice(max(c.start - m, 0), min(c.stop + m, n)) for c, n in zip(crop, shape))
            for channel in array:
                itk_img = itk.image_view_from_array(np.ascontiguousarray(channel[region]))
                smoothed = itk.curvature_flow_image_filter(itk_img, time_step=self.time_step,
                                                           number_of_iterations=self.iterations)
                channel[region] = itk.array_from_image(smoothed)
            smoothed = torch.as_tensor(array)
            d[key] = MetaTensor(smoothed, meta=img.meta) if isinstance(img, MetaTensor) else smoothed
        return d


class MaskedPercentileRescaled(MapTransform):
    """Map the ``lower``-``upper`` percentiles of the intensities inside the brain mask to [0, 1], clipped."""

    def __init__(self, keys: KeysCollection, mask_key: str = "mask", lower: float = 1.0, upper: float = 99.0):
        super().__init__(keys)
        self.mask_key, self.lower, self.upper = mask_key, lower, upper

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        brain = d[self.mask_key] > 0
        for key in self.key_iterator(d):
            img = d[key]
            inside = img[brain] if brain.any() else img.flatten()
            lo, hi = torch.quantile(inside.float(), torch.tensor([self.lower / 100, self.upper / 100])).tolist()
            d[key] = ((img - lo) / max(hi - lo, 1e-8)).clamp(0, 1)
        return d


def _axial_slice(transform: MapTransform, d: dict, z: int) -> dict:
    """``d`` with its ``transform.keys`` at axial slice ``z``, the index under ``"slice"``."""
    return {**d, **{key: d[key][..., z] for key in transform.key_iterator(d)}, "slice": z}


class RandAxialSliced(Randomizable, MapTransform):
    """``num_samples`` random axial slices (C,H,W,D) -> (C,H,W) of every key, uniform among the slices with brain
    (``slices="brain"``) or among all, empty ones included (``"all"``, the reference); one sample, or a list that
    the DataLoader flattens into the batch. The index is stored under ``"slice"``."""

    def __init__(self, keys: KeysCollection, mask_key: str = "mask", num_samples: int = 1, slices: str = "brain"):
        MapTransform.__init__(self, keys)
        self.mask_key, self.num_samples = mask_key, num_samples
        self.slices = check_choice("slices", slices, ("brain", "all"))

    def __call__(self, data):
        d = dict(data)
        per_slice = d[self.mask_key].flatten(0, -2).sum(0)
        candidates = torch.arange(len(per_slice)) if self.slices == "all" else torch.nonzero(per_slice > 0).flatten()
        if len(candidates) == 0:
            raise ValueError(f"The brain mask of {d.get('name', 'a volume')} is empty: no slice to sample.")
        indices = self.R.randint(len(candidates), size=self.num_samples)
        samples = [_axial_slice(self, d, int(candidates[i])) for i in indices]
        return samples[0] if self.num_samples == 1 else samples


class AxialSlicesd(MapTransform):
    """All axial slices of a volume, in order, as a list of 2D samples (the DataLoader flattens the list): only those
    with brain when ``brain_only`` (validation losses), else all (evaluation stacks them back into a volume)."""

    def __init__(self, keys: KeysCollection, mask_key: str = "mask", brain_only: bool = True):
        super().__init__(keys)
        self.mask_key, self.brain_only = mask_key, brain_only

    def __call__(self, data) -> list[dict]:
        d = dict(data)
        has_brain = d[self.mask_key].flatten(0, -2).sum(0) > 0
        return [_axial_slice(self, d, z) for z in range(len(has_brain)) if has_brain[z] or not self.brain_only]


class RandGhostingd(Randomizable, MapTransform):
    """MRI ghosting artefact: scale every ``n``-th k-space plane along one random spatial axis (cf. torchio), of
    slices (``spatial_dims`` 2) or volumes (3). ``restore`` is the fraction of the k-space centre (along the axis)
    left intact; ``None`` leaves only the central plane, as torchio does."""

    def __init__(self, keys: KeysCollection, prob: float = 0.5, num_ghosts: Sequence[int] = (4, 10),
                 intensity: Sequence[float] = (0.5, 1.0), restore: float | None = 0.02, spatial_dims: int = 2):
        MapTransform.__init__(self, keys)
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
            size = img.shape[axis]
            keep = torch.ones(size)
            keep[::n] = 1 - strength
            half = 0 if self.restore is None else max(int(self.restore * size / 2), 1)
            keep[size // 2 - half:size // 2 + (half or 1)] = 1.0  # the k-space centre stays
            spectrum = torch.fft.fftshift(torch.fft.fftn(img.float(), dim=dims), dim=dims)
            spectrum = spectrum * keep.reshape(-1, *[1] * (-1 - axis))  # along ``axis``
            ghosted = torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=dims), dim=dims).real
            d[key] = ghosted.to(img.dtype) if not isinstance(img, MetaTensor) else MetaTensor(ghosted, meta=img.meta)
        return d


class RandGammad(Randomizable, MapTransform):
    """torchio's random gamma: ``I -> sign(I) |I|^gamma`` with ``log(gamma)`` uniform in ``log_gamma``, no rescaling
    (MONAI's ``RandAdjustContrast`` draws gamma uniformly and rescales to the image's range first)."""

    def __init__(self, keys: KeysCollection, prob: float = 0.5, log_gamma: Sequence[float] = (-0.3, 0.3)):
        MapTransform.__init__(self, keys)
        self.prob, self.log_gamma = prob, log_gamma

    def __call__(self, data):
        d = dict(data)
        if self.R.rand() >= self.prob:
            return d
        gamma = float(np.exp(self.R.uniform(*self.log_gamma)))
        for key in self.key_iterator(d):
            d[key] = d[key].sign() * d[key].abs() ** gamma
        return d
