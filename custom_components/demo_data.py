"""Offline demo data: a complete data root in the real layout, synthesised from the MNI152 template.

``make_demo_data(out)`` writes, without any network access::

    Train/ixi/{t1,t2,mask}/           healthy IXI-like T2 volumes + brain masks
    Test/Brats21/{t1,t2,mask,seg}/    BraTS21-like volumes with tumour + oedema lesions
    Test/MSLUB/{t1,t2,mask,seg}/      MSLUB-like volumes with MS-like white-matter lesions
    splits/*.csv                      split CSVs in the distributed formats (t1 paths, see below)
    NOVA/images/*.png, NOVA/metadata.csv
    demo_data.json                    the generation settings (marks a finished demo data root)

The ``t1`` folders stay empty: only T2 volumes are synthesised. The split CSVs still list t1 paths
(``/Train/ixi/t1/IXI012-HH-1211_t1.nii.gz``) exactly as the distributed ones do; readers in mode
``t2`` rewrite them to the t2 files. Two IXI subjects listed in the fold CSVs have no T2 file and are
absent from ``avail_t2.csv``, as in the real (incomplete) IXI T2 series, so the filter gets exercised.

Anatomy comes from the MNI152 2009 template and its grey/white-matter maps shipped inside the nilearn
wheel (read from the installed package, no download). Subjects differ as real ones do: head and brain
size, hemispheric asymmetry, a few degrees and millimetres of misregistration, local shape, ventricle
size and sulcal width (atrophy), T2 contrast (CSF bright, GM mid, WM dark), bias field and noise; all
are skull-stripped (zero outside the brain mask). Volumes are 1 mm NIfTI (float32 images, uint8 masks
and segmentations) on the template grid cropped to the brain's bounding box plus a margin (157 x 193 x
161 voxels), with the template's affine; the middle of the brain is at the middle axial slice, so the
pipeline's centre crop to 100 slices keeps it, and every lesion lies within those slices.

BraTS-like tumours overlap normal tissue in T2 signal, as real ones do: lobulated oedema following the
white matter, between grey matter and CSF in brightness; a heterogeneous solid core about as bright as
grey matter; sometimes CSF-bright necrosis; mass effect pushing the surrounding tissue (and ventricles)
aside. A plain intensity threshold therefore finds them poorly (the intensity baseline of
``benchmarks/demo_data_baseline.py``: Dice about 0.3 at the default size; real BraTS21 T2 about 0.2),
while they remain plainly visible as anatomy that does not belong. MSLUB-like: ten to thirty-five
lesions with log-normal sizes (mostly a few millimetres, some confluent), mostly periventricular ovoids
pointing away from the ventricles, some juxtacortical and in deep white matter, between grey matter and
CSF in brightness.

NOVA-like images are axial clinical slices (T2, FLAIR or T1 post-contrast contrast, 200-512 pixels a
side, not all square, the head filling 60-95 % of the image at a random position), most with skull and
scalp, with one or several lesions; ``metadata.csv`` has NOVA's columns with ``bbox_gold`` boxes as
Python-literal strings (pixels; ``x``, ``y`` = top-left corner, ``x + width`` exclusive, i.e. the
lesion's pixel extent) and two raters' boxes in ``bbox_raters``; most captions mention T2, some do not.

Everything is drawn from per-item random generators derived from ``seed``: same seed, same bytes (on
the same software stack), whatever the number of worker processes.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

logger = logging.getLogger(__name__)

__all__ = ["make_demo_data", "IXI_HEADER", "BRATS_HEADER", "MSLUB_HEADER", "AVAIL_T2_HEADER", "NOVA_HEADER"]

# ----------------------------------------------------------------------------------------------
# Distributed CSV formats (headers copied from the public split files, first column = old index)
# ----------------------------------------------------------------------------------------------
IXI_HEADER = [
    "", "img_name", "SEX_ID (1=m, 2=f)", "HEIGHT", "WEIGHT", "ETHNIC_ID", "MARITAL_ID", "OCCUPATION_ID",
    "QUALIFICATION_ID", "DATE_AVAILABLE", "STUDY_DATE", "age", "label", "img_path", "mask_path", "seg_path",
    "Agegroup",
]
BRATS_HEADER = [
    "", "img_name", "Cohort Name (if publicly available)", "Site No (represents the originating institution)",
    "Local ID ", "age", "label", "img_path", "mask_path", "seg_path",
]
MSLUB_HEADER = ["", "img_name", "age", "sex", "ms_type", "label", "img_path", "mask_path", "seg_path", "Agegroup"]
AVAIL_T2_HEADER = ["", "0"]
NOVA_HEADER = [
    "filename", "case_id", "caption", "clinical_history", "differential_diagnosis", "final_diagnosis",
    "bbox_gold", "bbox_raters",
]

MANIFEST = "demo_data.json"
N_FOLDS = 5
N_IXI_WITHOUT_T2 = 2  # listed in the fold CSVs, no T2 file, not in avail_t2.csv
MARGIN_MM = 6  # margin around the template brain's bounding box
_BRATS_COHORTS = ["Private Collection", "TCGA-GBM", "TCGA-LGG", "UPENN-GBM", "CPTAC-GBM", "IvyGAP", "ACRIN-FMISO-Brain"]
_MS_TYPES = ["RRMS", "RRMS", "RRMS", "SPMS", "PPMS", "CIS"]
_IXI_SITES = ["Guys", "HH", "IOP"]


# ----------------------------------------------------------------------------------------------
# Template anatomy (loaded once per process)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Anatomy:
    """Template tissue maps on the cropped grid, the voxels a warped brain can reach, lesion centres."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    affine: np.ndarray
    region: np.ndarray  # flat indices of the voxels near the brain (all others stay zero in every subject)
    region_xyz: np.ndarray  # (3, len(region)) float32 voxel coordinates of those voxels
    tumour_centres: np.ndarray  # (K, 3) voxel indices deep in the cerebrum, for tumour centres
    ms_centres: np.ndarray  # (K, 3) voxel indices of periventricular white matter
    ms_axes: np.ndarray  # (K, 3) unit vectors away from the ventricles at ms_centres (Dawson's fingers)
    juxta_centres: np.ndarray  # (K, 3) voxel indices of white matter touching the cortex
    deep_centres: np.ndarray  # (K, 3) voxel indices of deep white matter away from ventricles and cortex
    sulcal: np.ndarray  # 0..1, CSF next to grey matter: where atrophy widens the sulci
    ventricle_centre: np.ndarray  # (3,) voxel centroid of the lateral ventricles
    midline_x: float  # voxel x of the mid-sagittal plane (world x = 0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.gm.shape


def _coarse_distance(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance (mm) to the nearest voxel outside ``mask``, computed on a 2 mm grid (fast)."""
    coarse = ndi.distance_transform_edt(mask[::2, ::2, ::2]) * 2.0
    full = np.repeat(np.repeat(np.repeat(coarse, 2, 0), 2, 1), 2, 2)
    return full[: mask.shape[0], : mask.shape[1], : mask.shape[2]]


@functools.lru_cache(maxsize=1)
def _anatomy() -> _Anatomy:
    """Load the MNI152 2009 T1 brain mask and GM/WM maps from nilearn's package data; crop; precompute."""
    from nilearn import datasets  # reads files inside the installed nilearn package; no download

    brain_img = datasets.load_mni152_brain_mask(resolution=1)
    brain = np.asarray(brain_img.dataobj) > 0
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).dataobj, dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).dataobj, dtype=np.float32)
    gm, wm = gm / gm.max(), wm / wm.max()

    idx = np.argwhere(brain)
    lo = np.maximum(idx.min(0) - MARGIN_MM, 0)
    hi = np.minimum(idx.max(0) + 1 + MARGIN_MM, brain.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    brain, gm, wm = brain[crop], gm[crop] * brain[crop], wm[crop] * brain[crop]
    over = np.maximum(gm + wm, 1.0)  # keep gm + wm + csf == 1 inside the brain
    gm, wm = gm / over, wm / over
    csf = np.where(brain, 1.0 - gm - wm, 0.0).astype(np.float32)

    affine = brain_img.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
    midline_x = float(-affine[0, 3] / affine[0, 0])

    # Voxels a subject's brain can reach under the (small) random warps: the brain dilated by 10 mm.
    region = (_coarse_distance(~brain) <= 10.0).ravel()
    region = np.flatnonzero(region)
    region_xyz = np.stack(np.unravel_index(region, brain.shape)).astype(np.float32)

    # Lesion centres lie in the central axial slices the pipeline keeps (centre crop to 100): tumours
    # close enough to the middle slice that they cross it, MS lesions next to the lateral ventricles.
    nz = brain.shape[2]
    z = np.arange(nz)[None, None, :] - (nz - 1) / 2.0
    depth = _coarse_distance(brain)
    tumour_ok = (depth > 16) & (z > -6) & (z < 10) & (csf < 0.3)
    ventricles = (csf > 0.6) & (depth > 14)
    dist_vent = _coarse_distance(~ventricles)
    dist_cortex = _coarse_distance(~((gm > 0.5) & (depth < 12)))
    in_slab = (z > -16) & (z < 24)
    ms_ok = (wm > 0.7) & (dist_vent > 1.5) & (dist_vent < 7) & in_slab
    juxta_ok = (wm > 0.5) & (dist_cortex > 0.5) & (dist_cortex < 3.5) & (depth > 6) & in_slab
    deep_ok = (wm > 0.85) & (dist_vent > 10) & (dist_cortex > 6) & in_slab
    ms_centres = np.argwhere(ms_ok)[::3]
    grad = np.stack([g[tuple(ms_centres.T)] for g in np.gradient(ndi.gaussian_filter(dist_vent, 2.0))], 1)
    ms_axes = grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-6)
    # sulcal CSF: CSF in the cortical ribbon, which atrophy widens at the expense of grey matter
    sulcal = np.clip(ndi.gaussian_filter(csf * (dist_vent > 6), 1.0) * 2.5, 0, 1) * ((gm > 0.05) | (csf > 0.05))
    return _Anatomy(
        gm=gm.astype(np.float32), wm=wm.astype(np.float32), csf=csf, affine=affine, region=region,
        region_xyz=region_xyz, tumour_centres=np.argwhere(tumour_ok)[::7].astype(np.int32),
        ms_centres=ms_centres.astype(np.int32), ms_axes=ms_axes.astype(np.float32),
        juxta_centres=np.argwhere(juxta_ok)[::3].astype(np.int32),
        deep_centres=np.argwhere(deep_ok)[::3].astype(np.int32), sulcal=sulcal.astype(np.float32),
        ventricle_centre=np.argwhere(ventricles & (z > -10)).mean(0), midline_x=midline_x,
    )


# ----------------------------------------------------------------------------------------------
# Smooth random fields, deformations, lesion shapes
# ----------------------------------------------------------------------------------------------
def _rbf_weights(n: int, k: int) -> np.ndarray:
    """(n, k) Gaussian interpolation weights from k evenly spaced control points, rows of unit norm."""
    ctrl = np.linspace(0.0, n - 1.0, k)
    sigma = max((n - 1.0) / max(k - 1, 1), 1.0) * 0.8
    w = np.exp(-0.5 * ((np.arange(n)[:, None] - ctrl[None, :]) / sigma) ** 2)
    return (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], k: int | tuple[int, ...]) -> np.ndarray:
    """Smooth random field of about unit standard deviation: random control values on a k-grid
    interpolated by a separable Gaussian basis (cheap tensor contractions, no full-size filtering)."""
    ks = (k,) * len(shape) if isinstance(k, int) else tuple(k)
    field = rng.standard_normal(ks).astype(np.float32)
    for axis, n in enumerate(shape):
        # contract the axis-th control dimension; the new axis goes last, so after all axes the order is restored
        field = np.tensordot(field, _rbf_weights(n, ks[axis]), axes=([0], [1]))
    return field


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix from three angles (radians) about the x, y and z axes."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _random_orthonormal(rng: np.random.Generator, ndim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    return q * np.sign(np.diag(r))


def _blob(
    rng: np.random.Generator, shape: tuple[int, ...], centre: np.ndarray, radii: np.ndarray,
    roughness: float, edge: float = 0.06, lobes: int = 1, spread: np.ndarray | None = None,
    rotation: np.ndarray | None = None,
) -> np.ndarray:
    """Soft irregular ellipsoid (2D or 3D) in a box: 1 inside, 0 outside, a smooth rim.

    ``lobes`` > 1 joins smaller ellipsoids around the first one; the radius is modulated by a smooth
    random field (``roughness`` = its relative amplitude) and grows where ``spread`` (0..1, e.g. white
    matter) is high, so tumour-like shapes are lobulated and follow the white matter; a single lobe with
    small roughness gives an ovoid MS-like lesion. ``rotation`` (rows = the axes of ``radii``) orients the
    first lobe, e.g. the long axis of a lesion along the direction away from the ventricles.
    """
    ndim = len(shape)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    r = None
    for lobe in range(lobes):
        if lobe == 0:
            c, rad = centre, radii
        else:
            c = centre + rng.normal(0.0, 0.4, ndim) * radii
            rad = radii * rng.uniform(0.45, 0.8, ndim)
        rot = (rotation if lobe == 0 and rotation is not None else _random_orthonormal(rng, ndim)).astype(np.float32)
        r2 = np.zeros(shape, np.float32)
        for i in range(ndim):
            u = sum(rot[i, j] * (grids[j] - np.float32(c[j])) for j in range(ndim))
            r2 += (u / np.float32(rad[i])) ** 2
        r = np.sqrt(r2) if r is None else np.minimum(r, np.sqrt(r2))
    if roughness > 0:
        r = r + np.float32(roughness) * _smooth_field(rng, shape, 6)
    if spread is not None:
        r = r - 0.3 * spread
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) / edge, -30, 30)))


def _box(centre: np.ndarray, half: int, shape: tuple[int, ...]) -> tuple[tuple[slice, ...], np.ndarray]:
    """Slices of a box of half-size ``half`` around ``centre`` clipped to ``shape``, and the centre in it."""
    lo = np.maximum(np.floor(centre).astype(int) - half, 0)
    hi = np.minimum(np.floor(centre).astype(int) + half + 1, shape)
    return tuple(slice(a, b) for a, b in zip(lo, hi)), centre - lo


# ----------------------------------------------------------------------------------------------
# 3D subjects
# ----------------------------------------------------------------------------------------------
@dataclass
class _Subject:
    image: np.ndarray  # float32, T2-like, zero outside the brain
    mask: np.ndarray  # uint8 brain mask
    seg: np.ndarray | None  # uint8 lesion mask (None for healthy subjects)


class _Warp:
    """Per-subject smooth spatial transform: output voxel -> template voxel (affine + smooth displacement).

    Subjects differ in head size and shape (scaling), hemispheric asymmetry, position (a few degrees and
    millimetres of misregistration) and local shape; :meth:`expand` adds local swelling (ventricle
    enlargement, a tumour's mass effect).
    """

    def __init__(self, rng: np.random.Generator, shape: tuple[int, int, int], midline_x: float):
        self.shape = shape
        self.centre = (np.asarray(shape, np.float64) - 1) / 2
        scale = rng.uniform(0.88, 1.03) * rng.uniform(0.97, 1.03, 3)
        angles = np.deg2rad(rng.uniform(-1, 1, 3) * np.array([3.0, 3.0, 4.0]))
        self.matrix = _rotation(angles) @ np.diag(1.0 / scale)
        self.shift = rng.uniform(-3.0, 3.0, 3)
        amp = rng.uniform(1.5, 3.0)  # mm, std of the smooth displacement
        self.disp = [amp * _smooth_field(rng, shape, (5, 6, 5)) for _ in range(3)]
        # asymmetry: one hemisphere up to 4 % wider than the other
        x = np.arange(shape[0], dtype=np.float32) - np.float32(midline_x)
        self.disp[0] -= (np.float32(rng.uniform(-0.04, 0.04)) * np.maximum(x, 0))[:, None, None]

    def expand(self, centre: np.ndarray, amount: float, sigma: float) -> None:
        """Swell the tissue around output voxel ``centre``: near it the template is magnified by about
        ``1 / (1 - amount)``, fading out over ``sigma`` voxels (the centre itself stays in place)."""
        axes = [np.arange(n, dtype=np.float32) - np.float32(c) for n, c in zip(self.shape, centre)]
        g = [np.exp(-0.5 * (a / np.float32(sigma)) ** 2) for a in axes]
        gauss = np.float32(amount) * g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
        for i, a in enumerate(axes):
            self.disp[i] -= gauss * a.reshape([-1 if j == i else 1 for j in range(3)])

    def _apply(self, xyz: np.ndarray, disp: list[np.ndarray]) -> np.ndarray:
        offset = (self.centre + self.shift - self.matrix @ self.centre).astype(np.float32)
        coords = self.matrix.astype(np.float32) @ xyz.reshape(3, -1)
        coords += offset[:, None]
        for i in range(3):
            coords[i] += disp[i]
        return coords.reshape(xyz.shape)

    def region_coordinates(self, anat: _Anatomy) -> np.ndarray:
        """(3, n) float32 template coordinates of the voxels in ``anat.region``."""
        return self._apply(anat.region_xyz, [d.ravel()[anat.region] for d in self.disp])

    def box_coordinates(self, box: tuple[slice, ...]) -> np.ndarray:
        """(3, *box shape) float32 template coordinates of the voxels in a box (slices may have a step)."""
        xyz = np.stack(np.meshgrid(*[np.arange(s.start, s.stop, s.step or 1, dtype=np.float32) for s in box],
                                   indexing="ij"))
        return self._apply(xyz, [d[box].ravel() for d in self.disp])

    def to_output(self, p: np.ndarray) -> np.ndarray:
        """Approximate inverse: output voxel that lands on template voxel ``p`` (two fixed-point steps)."""
        inv = np.linalg.inv(self.matrix)
        o = inv @ (p - self.centre - self.shift) + self.centre
        for _ in range(2):
            j = tuple(np.clip(np.round(o).astype(int), 0, np.asarray(self.shape) - 1))
            d = np.array([self.disp[i][j] for i in range(3)])
            o = inv @ (p - self.centre - self.shift - d) + self.centre
        return np.clip(o, 0, np.asarray(self.shape) - 1)


def _composite(image: np.ndarray, alpha_all: np.ndarray, box: tuple[slice, ...], alpha: np.ndarray,
               value: np.ndarray | float) -> None:
    """Blend a lesion into ``image`` inside ``box`` (in place) and keep the union of lesion alphas."""
    sub = image[box]
    image[box] = sub * (1.0 - alpha) + alpha * value
    alpha_all[box] = np.maximum(alpha_all[box], alpha)


def _plan_tumour(rng, warp: _Warp, anat: _Anatomy, size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """A tumour's centre (output voxel) and oedema radii; its mass effect swells the tissue around it."""
    centre = warp.to_output(anat.tumour_centres[rng.integers(len(anat.tumour_centres))].astype(np.float64))
    radii = size * rng.uniform(14.0, 30.0) * rng.uniform(0.8, 1.2, 3)
    warp.expand(centre, amount=size * rng.uniform(0.08, 0.2), sigma=float(radii.mean()) * 1.2)
    return centre, radii


def _add_tumour(rng, image, alpha_all, mask, warp, anat, c_csf, centre, r_oedema) -> None:
    """A lobulated tumour whose T2 signal overlaps normal tissue: oedema between grey matter and CSF,
    a heterogeneous solid core about as bright as grey matter, sometimes fluid-bright necrosis.

    The shapes are smooth, so they are drawn on a 2 mm grid over the lesion's box and upsampled: the
    blended layers reduce to ``image * keep + add`` (alpha compositing), three arrays to upsample.
    """
    half = 2 * int(np.ceil(r_oedema.max() * 0.9)) + 2  # even: odd box sizes map exactly onto the 2 mm grid
    box, c = _box(centre, half, image.shape)
    shp = image[box].shape
    coords = warp.box_coordinates(tuple(slice(s.start, s.stop, 2) for s in box))
    cshape = coords.shape[1:]
    csf = ndi.map_coordinates(anat.csf, coords, order=1, prefilter=False)
    wm = ndi.map_coordinates(anat.wm, coords, order=1, prefilter=False)
    c, r_oedema = c / 2.0, r_oedema / 2.0

    inside = 1.0 - 0.85 * np.clip(csf, 0, 1)  # oedema spares the ventricles
    lobes = int(rng.integers(1, 4))
    oedema = _blob(rng, cshape, c, r_oedema, roughness=rng.uniform(0.2, 0.4), lobes=lobes, spread=wm) * inside
    # oedema fades towards its rim (partial volume with the surrounding tissue) and varies inside
    oedema_level = rng.uniform(0.58, 0.8) * (1.0 + 0.12 * _smooth_field(rng, cshape, 7))
    keep = 1.0 - oedema
    add = oedema * c_csf * oedema_level
    if rng.random() < 0.85:  # solid core: heterogeneous, around grey matter
        r_core = r_oedema * rng.uniform(0.4, 0.65)
        core = _blob(rng, cshape, c + rng.uniform(-1, 1, 3), r_core, roughness=0.35, lobes=2) * oedema
        core_level = rng.uniform(0.42, 0.6) * (1.0 + 0.2 * _smooth_field(rng, cshape, 10))
        keep, add = keep * (1.0 - core), add * (1.0 - core) + core * c_csf * core_level
        if rng.random() < 0.6:  # necrosis / cyst: fluid, as bright as CSF
            necro = _blob(rng, cshape, c, r_core * rng.uniform(0.3, 0.6), roughness=0.3) * core
            keep, add = keep * (1.0 - necro), add * (1.0 - necro) + necro * (c_csf * rng.uniform(0.85, 1.0))

    factors = np.asarray(shp, np.float64) / np.asarray(cshape, np.float64)
    m = mask[box]
    alpha = ndi.zoom(oedema.astype(np.float32), factors, order=1) * m
    keep = 1.0 - (1.0 - ndi.zoom(keep.astype(np.float32), factors, order=1)) * m
    add = ndi.zoom(add.astype(np.float32), factors, order=1) * m
    image[box] = image[box] * keep + add
    alpha_all[box] = np.maximum(alpha_all[box], alpha)


def _ms_lesion_sites(rng, anat: _Anatomy, n: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Template voxel centres (and long-axis directions) of ``n`` MS lesions: mostly periventricular,
    oriented away from the ventricles, some juxtacortical, a few in deep white matter."""
    sites = []
    for kind in rng.choice(3, size=n, p=[0.6, 0.28, 0.12]):
        if kind == 0:
            i = rng.integers(len(anat.ms_centres))
            sites.append((anat.ms_centres[i].astype(np.float64), anat.ms_axes[i].astype(np.float64)))
        else:
            pool = anat.juxta_centres if kind == 1 else anat.deep_centres
            sites.append((pool[rng.integers(len(pool))].astype(np.float64), None))
    return sites


def _add_ms_lesions(rng, image, alpha_all, mask, warp, anat, c_csf) -> None:
    """MS-like T2 lesions: ten to thirty-five, most a few millimetres across (log-normal sizes), some
    confluent; periventricular ovoids perpendicular to the ventricles, juxtacortical and deep ones;
    moderately hyperintense (between grey matter and CSF), so intensity alone does not separate them."""
    sites = _ms_lesion_sites(rng, anat, int(rng.integers(10, 36)))
    for p, axis in sites:
        centre = warp.to_output(p)
        radius = float(np.clip(rng.lognormal(np.log(2.2), 0.5), 1.2, 8.0))
        if axis is not None and rng.random() < 0.2:  # confluent periventricular lesion
            radius = rng.uniform(5.0, 10.0)
        radii = radius * np.array([rng.uniform(1.3, 2.0), rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0)])
        rotation = None
        if axis is not None:  # first radius along the direction away from the ventricles
            other = np.cross(axis, _random_orthonormal(rng, 3)[0])
            other /= max(np.linalg.norm(other), 1e-6)
            rotation = np.stack([axis, other, np.cross(axis, other)])
        half = int(np.ceil(radii.max() * 1.6)) + 2
        box, c = _box(centre, half, image.shape)
        wm_box = ndi.map_coordinates(anat.wm, warp.box_coordinates(box), order=1, prefilter=False)
        lesion = _blob(rng, image[box].shape, c, radii, roughness=0.15, rotation=rotation)
        lesion *= np.clip((wm_box - 0.2) / 0.4, 0, 1)
        _composite(image, alpha_all, box, lesion * mask[box], c_csf * rng.uniform(0.6, 0.85))


def _make_subject(rng: np.random.Generator, kind: str) -> _Subject:
    """One T2-like volume: ``kind`` is ``healthy``, ``tumour`` or ``ms``.

    Subjects differ in anatomy (head size, asymmetry, position, ventricle size, sulcal width) and in
    contrast, bias field and noise, so that a subject-specific condition carries information.
    """
    anat = _anatomy()
    shape = anat.shape
    c_csf = float(rng.uniform(700.0, 1100.0))
    c_gm = c_csf * float(rng.uniform(0.5, 0.58))
    c_wm = c_csf * float(rng.uniform(0.31, 0.37))
    atrophy = float(rng.beta(1.5, 2.5))  # 0: young brain, 1: marked atrophy

    warp = _Warp(rng, shape, anat.midline_x)
    ventricles = warp.to_output(anat.ventricle_centre + rng.normal(0.0, 2.0, 3))
    warp.expand(ventricles, amount=0.6 * atrophy + rng.uniform(-0.15, 0.1), sigma=rng.uniform(14.0, 22.0))
    tumours = []
    if kind == "tumour":
        sizes = [1.0] + ([rng.uniform(0.4, 0.7)] if rng.random() < 0.15 else [])  # occasional second focus
        tumours = [_plan_tumour(rng, warp, anat, size) for size in sizes]

    # atrophy: sulcal CSF widens at the expense of the grey matter next to it
    widen = np.float32(atrophy * 0.8) * anat.sulcal * anat.gm
    template = (np.float32(c_csf) * (anat.csf + widen) + np.float32(c_gm) * (anat.gm - widen)
                + np.float32(c_wm) * anat.wm)

    # Warp only the voxels a brain can reach; everything else is background (zero).
    values = ndi.map_coordinates(template, warp.region_coordinates(anat), order=1, output=np.float32, prefilter=False)
    image = np.zeros(shape, np.float32)
    image.ravel()[anat.region] = values
    mask = (image > 0.5 * c_wm).astype(np.float32)  # skull-stripping mask of the clean image

    seg = None
    if kind != "healthy":
        alpha_all = np.zeros(shape, np.float32)
        if kind == "tumour":
            for centre, radii in tumours:
                _add_tumour(rng, image, alpha_all, mask, warp, anat, c_csf, centre, radii)
        else:
            _add_ms_lesions(rng, image, alpha_all, mask, warp, anat, c_csf)
        seg = ((alpha_all > 0.5) & (mask > 0)).astype(np.uint8)

    values = image.ravel()[anat.region]
    values *= np.exp(np.float32(rng.uniform(0.05, 0.2)) * _smooth_field(rng, shape, 3).ravel()[anat.region])
    values += rng.standard_normal(len(values), dtype=np.float32) * np.float32(rng.uniform(0.015, 0.03) * c_csf)
    values *= mask.ravel()[anat.region]
    np.maximum(values, 0.0, out=values)
    image.ravel()[anat.region] = np.round(values)  # integer-valued, as scanners store them (smaller files)
    return _Subject(image=image, mask=mask.astype(np.uint8), seg=seg)


def _save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=4)  # MNI152 space
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


# ----------------------------------------------------------------------------------------------
# 2D NOVA-like images
# ----------------------------------------------------------------------------------------------
_NOVA_CONTRASTS = {
    # modality: (csf, gm, wm, lesion) relative intensities, caption templates
    "t2": ((1.0, 0.55, 0.34, 0.82), [
        "Axial T2-weighted MRI showing {desc} in the {side} {region}.",
        "Axial T2 image demonstrates {desc} in the {side} {region}.",
        "T2-weighted axial slice with {desc} involving the {side} {region}.",
        "Axial T2 MRI: {desc}, {side} {region}.",
    ]),
    "flair": ((0.12, 0.5, 0.36, 0.9), [
        "Axial FLAIR image shows {desc} in the {side} {region}.",
        "FLAIR axial MRI with {desc} of the {side} {region}.",
    ]),
    "t1c": ((0.15, 0.55, 0.75, 0.95), [
        "T1 post-contrast axial image with {desc} in the {side} {region}.",
    ]),
}
_NOVA_DIAGNOSES = [
    ("glioblastoma", "a large heterogeneous mass with surrounding oedema", 1),
    ("low-grade glioma", "an expansile hyperintense lesion", 1),
    ("metastases", "multiple round lesions", 3),
    ("multiple sclerosis", "several ovoid white matter hyperintensities", 4),
    ("abscess", "a rounded lesion with perilesional oedema", 1),
    ("infarct", "a wedge-shaped hyperintense area", 1),
]
_NOVA_REGIONS = ["frontal lobe", "parietal lobe", "temporal lobe", "occipital lobe", "periventricular white matter"]


def _nova_image(rng: np.random.Generator, anat: _Anatomy, modality: str, n_lesions: int, big: bool):
    """One 2D slice with lesions at a random size: returns (uint8 image, list of boxes (x, y, w, h), side)."""
    csf_c, gm_c, wm_c, les_c = _NOVA_CONTRASTS[modality][0]
    nz = anat.shape[2]
    z = int(rng.integers(nz // 2 - 25, nz // 2 + 30))
    base = csf_c * anat.csf[:, :, z] + gm_c * anat.gm[:, :, z] + wm_c * anat.wm[:, :, z]
    brain = (anat.csf[:, :, z] + anat.gm[:, :, z] + anat.wm[:, :, z]) > 0.5
    # small smooth deformation in 2D
    shape2 = base.shape
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape2], indexing="ij")
    scale = rng.uniform(0.95, 1.05)
    coords = np.stack([(g - (n - 1) / 2) / scale + (n - 1) / 2 + 2.0 * _smooth_field(rng, shape2, 5)
                       for g, n in zip(grid, shape2)])
    base = ndi.map_coordinates(base, coords, order=1, output=np.float32)
    brain = ndi.map_coordinates(brain.astype(np.float32), coords, order=1) > 0.5
    wm = ndi.map_coordinates(anat.wm[:, :, z], coords, order=1)
    depth = ndi.distance_transform_edt(brain)

    labels = np.zeros(shape2, np.int32)
    side = None
    for k in range(n_lesions):
        radius = rng.uniform(10, 22) if big else rng.uniform(3, 7)
        candidates = np.argwhere((depth > radius + 3) & (big | (wm > 0.7)))  # small lesions: white matter
        if len(candidates) == 0:
            continue
        c = candidates[rng.integers(len(candidates))].astype(np.float64)
        if side is None:
            side = "right" if c[0] > anat.midline_x else "left"
        radii = radius * rng.uniform(0.7, 1.3, 2)
        half = int(np.ceil(radii.max() * 1.6)) + 2
        box, cb = _box(c, half, shape2)
        if big:
            alpha = _blob(rng, base[box].shape, cb, radii, roughness=0.3, lobes=int(rng.integers(1, 4)), spread=wm[box])
        else:
            alpha = _blob(rng, base[box].shape, cb, radii, roughness=0.08)
        alpha = alpha * brain[box]
        value = les_c * (1.0 + 0.05 * _smooth_field(rng, alpha.shape, 4))
        if modality == "t1c" and big:  # ring enhancement: bright rim, dark centre
            inner = _blob(rng, alpha.shape, cb, radii * 0.65, roughness=0.0)
            value = value * (1.0 - inner) + 0.3 * inner
        base[box] = base[box] * (1.0 - alpha) + alpha * value
        lab = labels[box]
        lab[(alpha > 0.5) & (lab == 0)] = k + 1

    base, labels, head = _add_skull(rng, base * brain, labels, brain, modality)
    base *= np.exp(0.1 * _smooth_field(rng, base.shape, 3))
    base += 0.02 * rng.standard_normal(base.shape).astype(np.float32)
    base = np.clip(base, 0, None) * head
    # radiological display: anterior up, patient's right on the image's left
    base, labels = base[::-1, ::-1].T, labels[::-1, ::-1].T

    # place the slice on a canvas of a random size (not always square) and resample to it
    height, width = int(rng.integers(200, 513)), int(rng.integers(200, 513))
    if rng.random() < 0.35:
        width = height
    fill = rng.uniform(0.6, 0.95)
    zoom = min(height / base.shape[0], width / base.shape[1]) * fill
    img = ndi.zoom(base, zoom, order=1)
    lab = ndi.zoom(labels, zoom, order=0)
    canvas = np.zeros((height, width), np.float32)
    lab_canvas = np.zeros((height, width), np.int32)
    oy = int(rng.integers(0, height - img.shape[0] + 1))
    ox = int(rng.integers(0, width - img.shape[1] + 1))
    canvas[oy:oy + img.shape[0], ox:ox + img.shape[1]] = img
    lab_canvas[oy:oy + lab.shape[0], ox:ox + lab.shape[1]] = lab
    png = np.clip(canvas / max(float(canvas.max()), 1e-6) * 255.0, 0, 255).astype(np.uint8)

    boxes = []
    for k, sl in enumerate(ndi.find_objects(lab_canvas)):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
        if (y1 - y0) < 3 or (x1 - x0) < 3:
            continue
        boxes.append((float(x0), float(y0), float(x1 - x0), float(y1 - y0)))
    return png, boxes, side or "left"


#: Extra-cerebral tissue of a clinical slice per contrast: (CSF rim, bone, marrow, scalp fat) intensities.
_NOVA_HEAD = {"t2": (0.8, 0.04, 0.2, 0.7), "flair": (0.1, 0.04, 0.25, 0.65), "t1c": (0.12, 0.04, 0.6, 0.9)}


def _add_skull(rng, base: np.ndarray, labels: np.ndarray, brain: np.ndarray, modality: str):
    """Most clinical slices are not skull-stripped: pad the slice and draw, outside the brain, a thin CSF
    rim, the skull (dark tables around brighter marrow) and the scalp; a quarter of the slices stay
    skull-stripped. Returns the padded image, labels and head mask."""
    pad = 24
    base, labels = np.pad(base, pad), np.pad(labels, pad)
    brain = np.pad(brain, pad)
    if rng.random() < 0.25:
        return base, labels, brain
    csf, bone, marrow, fat = _NOVA_HEAD[modality]
    rim, table = rng.uniform(1.0, 3.0), rng.uniform(2.0, 3.0)  # mm
    diploe, scalp = rng.uniform(2.0, 5.0), rng.uniform(3.0, 8.0)
    dist = ndi.distance_transform_edt(~brain) * (1.0 + 0.15 * _smooth_field(rng, base.shape, 4))
    edges = np.cumsum([rim, table, diploe, table, scalp])
    values = [csf, bone, marrow, bone, fat]
    out = base.copy()
    for lo, hi, v in zip(np.concatenate([[0.0], edges[:-1]]), edges, values):
        out[~brain & (dist > lo) & (dist <= hi)] = v
    return out, labels, brain | (dist <= edges[-1])


def _box_string(boxes: list[tuple[float, float, float, float]], raters: list[str] | None = None) -> str:
    """NOVA's Python-literal box dict: ``{'x': [...], 'y': [...], 'width': [...], 'height': [...]}``."""
    d: dict[str, list] = {
        "x": [round(b[0], 1) for b in boxes], "y": [round(b[1], 1) for b in boxes],
        "width": [round(b[2], 1) for b in boxes], "height": [round(b[3], 1) for b in boxes],
    }
    if raters is not None:
        d["rater"] = raters
    return repr(d)


def _rater_boxes(rng: np.random.Generator, boxes, height: int, width: int):
    """Two raters' boxes: the gold boxes with a few pixels of disagreement, clipped to the image."""
    out, names = [], []
    for rater in ("rater1", "rater2"):
        for x, y, w, h in boxes:
            x0 = np.clip(x + rng.normal(0, 1.5), 0, width - 1)
            y0 = np.clip(y + rng.normal(0, 1.5), 0, height - 1)
            x1 = np.clip(x + w + rng.normal(0, 1.5), x0 + 1, width)
            y1 = np.clip(y + h + rng.normal(0, 1.5), y0 + 1, height)
            out.append((float(x0), float(y0), float(x1 - x0), float(y1 - y0)))
            names.append(rater)
    return out, names


def _nova_plan(seed: int, n_nova: int) -> list[tuple]:
    """Cases (diagnosis, number of lesions) and their images, 1-2 images per case: one job per image."""
    jobs = []
    case = 0
    while len(jobs) < n_nova:
        case += 1
        rng = np.random.default_rng([seed, 4, case])
        diagnosis_index = int(rng.integers(len(_NOVA_DIAGNOSES)))
        max_lesions = _NOVA_DIAGNOSES[diagnosis_index][2]
        n_lesions = 1 if max_lesions == 1 else int(rng.integers(2, max_lesions + 2))
        n_img = min(1 + int(rng.random() < 0.3), n_nova - len(jobs))
        jobs += [(seed, case, k + 1, diagnosis_index, n_lesions) for k in range(n_img)]
    return jobs


def _nova_job(job: tuple, images: Path) -> dict:
    """Make, save and describe one NOVA-like image; returns its metadata row."""
    seed, case, k, diagnosis_index, n_lesions = job
    diagnosis, desc, _ = _NOVA_DIAGNOSES[diagnosis_index]
    big = diagnosis not in ("multiple sclerosis", "metastases")
    for attempt in range(20):  # a slice without any box large enough is redrawn (rare)
        rng = np.random.default_rng([seed, 4, case, k, attempt])
        modality = str(rng.choice(["t2"] * 6 + ["flair"] * 2 + ["t1c"]))
        png, boxes, side = _nova_image(rng, _anatomy(), modality, n_lesions, big)
        if boxes:
            break
    else:
        raise RuntimeError(f"demo data: could not place a lesion in NOVA image {case}/{k}")
    case_id = f"case{case:04d}"
    filename = f"{case_id}_{k:02d}.png"
    _save_png(png, images / filename)
    templates = _NOVA_CONTRASTS[modality][1]
    region = _NOVA_REGIONS[-1] if diagnosis == "multiple sclerosis" else _NOVA_REGIONS[int(rng.integers(4))]
    caption = templates[int(rng.integers(len(templates)))].format(desc=desc, side=side, region=region)
    rboxes, raters = _rater_boxes(rng, boxes, *png.shape)
    symptom = ["headache", "seizure", "visual disturbance", "progressive weakness", "numbness"][int(rng.integers(5))]
    return {
        "filename": filename, "case_id": case_id, "caption": caption,
        "clinical_history": f"{int(rng.integers(18, 85))}-year-old with {symptom}.",
        "differential_diagnosis": ", ".join(d for d, _, _ in _NOVA_DIAGNOSES if d != diagnosis),
        "final_diagnosis": diagnosis,
        "bbox_gold": _box_string(boxes), "bbox_raters": _box_string(rboxes, raters),
    }


def _save_png(png: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(png, dtype=np.uint8)).save(path, format="PNG")


# ----------------------------------------------------------------------------------------------
# Split tables
# ----------------------------------------------------------------------------------------------
def _agegroup(age: float) -> str:
    return f"{float(min(int(age // 20), 4)):.1f}"


def _ixi_subjects(rng: np.random.Generator, n: int) -> list[dict]:
    numbers = np.sort(rng.choice(np.arange(2, 663), size=n, replace=False))
    subjects = []
    for num in numbers:
        site = _IXI_SITES[int(rng.integers(len(_IXI_SITES)))]
        stem = f"IXI{num:03d}-{site}-{int(rng.integers(500, 1300)):04d}"
        age = rng.uniform(20, 86)
        month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
        # most IXI rows carry 0 for height and weight (not recorded)
        height = str(int(rng.integers(150, 195))) if rng.random() < 0.25 else "0"
        weight = str(int(rng.integers(50, 110))) if rng.random() < 0.25 else "0"
        row = {
            "stem": stem, "index": 0,
            "fields": [
                f"{stem}_t1.nii.gz", str(int(rng.integers(1, 3))),
                height, weight,
                str(int(rng.integers(1, 7))), str(int(rng.integers(1, 6))), str(int(rng.integers(1, 9))),
                str(int(rng.integers(1, 6))), "1", f"{int(rng.integers(2005, 2007))}-{month:02d}-{day:02d}",
                f"{age:.2f}", "0", f"/Train/ixi/t1/{stem}_t1.nii.gz", f"/Train/ixi/mask/{stem}_mask.nii.gz", "",
                _agegroup(age),
            ],
        }
        subjects.append(row)
    order = rng.permutation(n)  # the first column is an index of the original table, not the row order
    for s, idx in zip(subjects, order):
        s["index"] = int(idx)
    return subjects


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _n_val(n: int) -> int:
    return min(max(1, round(0.35 * n)), n - 1)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------
def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"demo data: output path {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"demo data: output folder {out} exists and is not empty; choose another folder or pass "
                "overwrite=True (--overwrite) to replace a previous demo data root"
            )
        if not (out / MANIFEST).is_file():
            raise FileExistsError(
                f"demo data: refusing to overwrite {out}: it is not empty and holds no {MANIFEST}, so it is not "
                "a demo data root written by this tool; remove it yourself if it really should go"
            )


def make_demo_data(
    out: str | os.PathLike,
    seed: int = 0,
    n_ixi: int = 40,
    n_brats: int = 16,
    n_mslub: int = 12,
    n_nova: int = 24,
    overwrite: bool = False,
    workers: int = 2,
) -> Path:
    """Write a synthetic data root (the layout of the distributed preprocessed data) to ``out`` and return its path.

    ``n_ixi`` healthy IXI-like T2 volumes (plus two subjects listed in the fold CSVs without a T2 file),
    ``n_brats`` BraTS21-like and ``n_mslub`` MSLUB-like volumes (about a third go to the val CSV, the
    rest to test), ``n_nova`` NOVA-like PNGs. The ``t1`` folders stay empty (split CSVs list t1 paths
    as distributed; mode ``t2`` reads the t2 files). ``out`` must not exist or be empty, unless
    ``overwrite`` is set and it holds a previous demo data root, which is then replaced. The root is
    built in a temporary sibling folder and renamed into place at the end, so an interrupted run
    never leaves a half-written ``out``. ``workers`` processes share the work (1: no pool; at most the
    number of CPUs); the output does not depend on it. Worker processes are started fresh ("spawn"), so
    a calling script needs the usual ``if __name__ == "__main__":`` guard.
    """
    n_ixi, n_brats, n_mslub, n_nova, seed = int(n_ixi), int(n_brats), int(n_mslub), int(n_nova), int(seed)
    workers = max(1, min(int(workers), os.cpu_count() or 1))
    if n_ixi < N_FOLDS + 1:
        raise ValueError(f"demo data: n_ixi must be at least {N_FOLDS + 1} (test + {N_FOLDS} folds), got {n_ixi}")
    if n_brats < 2 or n_mslub < 2:
        raise ValueError(f"demo data: n_brats and n_mslub must be at least 2 (val + test), got {n_brats}, {n_mslub}")
    if n_nova < 1:
        raise ValueError(f"demo data: n_nova must be at least 1, got {n_nova}")
    out = Path(out).expanduser().absolute()
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        _write_root(tmp, seed, n_ixi, n_brats, n_mslub, n_nova, workers)
        settings = {"seed": seed, "n_ixi": n_ixi, "n_brats": n_brats, "n_mslub": n_mslub, "n_nova": n_nova,
                    "generator": "custom_components.demo_data", "template": "MNI152 2009 (nilearn package data)"}
        (tmp / MANIFEST).write_text(json.dumps(settings, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "root")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("demo data written to %s in %.1f s", out, time.perf_counter() - start)
    return out


def _write_root(root: Path, seed: int, n_ixi: int, n_brats: int, n_mslub: int, n_nova: int, workers: int) -> None:
    for d in ("Train/ixi/t1", "Train/ixi/t2", "Train/ixi/mask", "splits"):
        (root / d).mkdir(parents=True)
    for ds in ("Brats21", "MSLUB"):
        for d in ("t1", "t2", "mask", "seg"):
            (root / "Test" / ds / d).mkdir(parents=True)
    splits = root / "splits"

    # --- IXI: names, test set, 5 folds, avail_t2 ---
    rng = np.random.default_rng([seed, 0])
    subjects = _ixi_subjects(rng, n_ixi + N_IXI_WITHOUT_T2)
    perm = [int(i) for i in rng.permutation(len(subjects))]
    missing = perm[:N_IXI_WITHOUT_T2]
    available = perm[N_IXI_WITHOUT_T2:]
    n_test = max(1, n_ixi // 5)
    test, pool = available[:n_test], missing + available[n_test:]  # the missing ones land in folds 0 and 1
    fold_of = {s: k % N_FOLDS for k, s in enumerate(pool)}

    def rows(ids):
        ordered = sorted(ids, key=lambda i: subjects[i]["index"])
        return [[str(subjects[i]["index"])] + subjects[i]["fields"] for i in ordered]

    for k in range(N_FOLDS):
        _write_csv(splits / f"IXI_train_fold{k}.csv", IXI_HEADER, rows([s for s in pool if fold_of[s] != k]))
        _write_csv(splits / f"IXI_val_fold{k}.csv", IXI_HEADER, rows([s for s in pool if fold_of[s] == k]))
    _write_csv(splits / "IXI_test.csv", IXI_HEADER, rows(test))
    t2_names = sorted(f"{subjects[i]['stem']}_t2.nii.gz" for i in available)
    _write_csv(splits / "avail_t2.csv", AVAIL_T2_HEADER, [[str(i), n] for i, n in enumerate(t2_names)])

    # --- BraTS21 and MSLUB tables ---
    rng = np.random.default_rng([seed, 1])
    brats_ids = np.sort(rng.choice(np.arange(0, 1667), size=n_brats, replace=False))
    brats_index = rng.choice(np.arange(0, 1251), size=n_brats, replace=False)
    brats_rows = []
    for bid, idx in zip(brats_ids, brats_index):
        name = f"BraTS2021_{bid:05d}"
        cohort = _BRATS_COHORTS[int(rng.integers(len(_BRATS_COHORTS)))]
        local = ""
        if cohort.startswith("TCGA"):
            local = f"TCGA-{int(rng.integers(2, 99)):02d}-{int(rng.integers(1, 9999)):04d}"
        brats_rows.append([str(idx), name, cohort, str(int(rng.integers(1, 24))), local, "", "1",
                           f"/Test/Brats21/t1/{name}_t1.nii.gz", f"/Test/Brats21/mask/{name}_mask.nii.gz",
                           f"/Test/Brats21/seg/{name}_seg.nii.gz"])
    ms_ids = np.sort(rng.choice(np.arange(1, max(30, n_mslub) + 1), size=n_mslub, replace=False))
    ms_index = rng.permutation(n_mslub)
    ms_rows = []
    for pid, idx in zip(ms_ids, ms_index):
        name = f"patient{pid:02d}"
        age = int(rng.integers(18, 60))
        ms_rows.append([str(idx), name, str(age), str(rng.choice(["F", "F", "M"])),
                        _MS_TYPES[int(rng.integers(len(_MS_TYPES)))], "1", f"/Test/MSLUB/t1/{name}_t1.nii.gz",
                        f"/Test/MSLUB/mask/{name}_mask.nii.gz", f"/Test/MSLUB/seg/{name}_seg.nii.gz", _agegroup(age)])
    for prefix, table in (("Brats21", brats_rows), ("MSLUB", ms_rows)):
        order = [int(i) for i in rng.permutation(len(table))]
        n_val = _n_val(len(table))
        _write_csv(splits / f"{prefix}_val.csv", BRATS_HEADER if prefix == "Brats21" else MSLUB_HEADER,
                   sorted((table[i] for i in order[:n_val]), key=lambda r: int(r[0])))
        _write_csv(splits / f"{prefix}_test.csv", BRATS_HEADER if prefix == "Brats21" else MSLUB_HEADER,
                   sorted((table[i] for i in order[n_val:]), key=lambda r: int(r[0])))

    # --- volumes and NOVA images: one random generator per item, so the order (and workers) do not matter ---
    ixi = str(root / "Train/ixi")
    jobs: list[tuple] = [("volume", "healthy", ixi, subjects[i]["stem"], (seed, 10, i)) for i in available]
    jobs += [("volume", "tumour", str(root / "Test/Brats21"), r[1], (seed, 11, k)) for k, r in enumerate(brats_rows)]
    jobs += [("volume", "ms", str(root / "Test/MSLUB"), r[1], (seed, 12, k)) for k, r in enumerate(ms_rows)]
    (root / "NOVA" / "images").mkdir(parents=True)
    jobs += [("nova", str(root / "NOVA" / "images"), job) for job in _nova_plan(seed, n_nova)]
    results = _run_jobs(jobs, workers)
    rows = [r for r in results if r is not None]
    with open(root / "NOVA" / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=NOVA_HEADER, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _run_job(job: tuple) -> dict | None:
    """Worker entry: write one volume (returns None) or one NOVA image (returns its metadata row)."""
    if job[0] == "nova":
        return _nova_job(job[2], Path(job[1]))
    _, kind, folder, stem, key = job
    folder = Path(folder)
    subject = _make_subject(np.random.default_rng(list(key)), kind)
    affine = _anatomy().affine
    _save_nifti(subject.image, affine, folder / "t2" / f"{stem}_t2.nii.gz")
    _save_nifti(subject.mask, affine, folder / "mask" / f"{stem}_mask.nii.gz")
    if subject.seg is not None:
        _save_nifti(subject.seg, affine, folder / "seg" / f"{stem}_seg.nii.gz")
    return None


def _run_jobs(jobs: list[tuple], workers: int) -> list:
    """Run the jobs in order (``workers`` <= 1) or in a pool of fresh processes; results keep job order."""
    if workers <= 1 or len(jobs) <= 1:
        return [_run_job(job) for job in jobs]
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters: safe whatever the parent has imported
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        return list(pool.map(_run_job, jobs, chunksize=1))
