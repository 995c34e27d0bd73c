"""Split reading on CSVs in the exact distributed formats, and the cached preprocessing pipeline."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged, ResizeWithPadOrCropd, ScaleIntensityRanged

from custom_components import transforms as T
from custom_components.data import DataError, load_split, read_split, transform_settings, volume_dataset
from tests.conftest import REPO

IXI_HEADER = (',img_name,"SEX_ID (1=m, 2=f)",HEIGHT,WEIGHT,ETHNIC_ID,MARITAL_ID,OCCUPATION_ID,QUALIFICATION_ID,'
              'DATE_AVAILABLE,STUDY_DATE,age,label,img_path,mask_path,seg_path,Agegroup')
IXI_ROWS = [
    "64,IXI076-Guys-0753_t1.nii.gz,1,0,0,1,2,1,4,1,2005-08-12,55.83,0,/Train/ixi/t1/IXI076-Guys-0753_t1.nii.gz,"
    "/Train/ixi/mask/IXI076-Guys-0753_mask.nii.gz,,2.0",
    "65,IXI012-HH-1211_t1.nii.gz,2,0,0,1,2,1,4,1,2005-06-01,38.78,0,/Train/ixi/t1/IXI012-HH-1211_t1.nii.gz,"
    "/Train/ixi/mask/IXI012-HH-1211_mask.nii.gz,,1.0",
]
BRATS_HEADER = (",img_name,Cohort Name (if publicly available),Site No (represents the originating institution),"
                "Local ID ,age,label,img_path,mask_path,seg_path")
BRATS_ROW = ("983,BraTS2021_00538,Private Collection,18,,,1,/Test/Brats21/t1/BraTS2021_00538_t1.nii.gz,"
             "/Test/Brats21/mask/BraTS2021_00538_mask.nii.gz,/Test/Brats21/seg/BraTS2021_00538_seg.nii.gz")
MSLUB_HEADER = ",img_name,age,sex,ms_type,label,img_path,mask_path,seg_path,Agegroup"
MSLUB_ROW = ("28,patient12,26,F,CIS,1,/Test/MSLUB/t1/patient12_t1.nii.gz,/Test/MSLUB/mask/patient12_mask.nii.gz,"
             "/Test/MSLUB/seg/patient12_seg.nii.gz,1.0")


def _touch(root: Path, rel: str) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


@pytest.fixture
def root(tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "IXI_train_fold0.csv").write_text("\n".join([IXI_HEADER, *IXI_ROWS]) + "\n")
    (splits / "avail_t2.csv").write_text(",0\n0,IXI002-Guys-0828_t2.nii.gz\n1,IXI076-Guys-0753_t2.nii.gz\n")
    (splits / "Brats21_test.csv").write_text(BRATS_HEADER + "\n" + BRATS_ROW + "\n")
    (splits / "MSLUB_test.csv").write_text(MSLUB_HEADER + "\n" + MSLUB_ROW + "\n")
    for rel in ["Train/ixi/t2/IXI076-Guys-0753_t2.nii.gz", "Train/ixi/mask/IXI076-Guys-0753_mask.nii.gz",
                "Train/ixi/t1/IXI076-Guys-0753_t1.nii.gz", "Train/ixi/t1/IXI012-HH-1211_t1.nii.gz",
                "Train/ixi/mask/IXI012-HH-1211_mask.nii.gz",
                "Test/Brats21/t2/BraTS2021_00538_t2.nii.gz", "Test/Brats21/mask/BraTS2021_00538_mask.nii.gz",
                "Test/Brats21/seg/BraTS2021_00538_seg.nii.gz", "Test/MSLUB/t2/patient12_t2.nii.gz",
                "Test/MSLUB/mask/patient12_mask.nii.gz", "Test/MSLUB/seg/patient12_seg.nii.gz"]:
        _touch(tmp_path, rel)
    return tmp_path


def test_ixi_t2_rewrite_and_avail_filter(root):
    items = read_split(root / "splits/IXI_train_fold0.csv", root)
    # IXI012 has no T2 volume (not in avail_t2.csv) and is dropped
    assert [i["name"] for i in items] == ["IXI076-Guys-0753_t1"]
    item = items[0]
    assert item["image"] == str(root / "Train/ixi/t2/IXI076-Guys-0753_t2.nii.gz")
    assert item["mask"] == str(root / "Train/ixi/mask/IXI076-Guys-0753_mask.nii.gz")
    assert item["seg"] is None
    assert item["age"] == pytest.approx(55.83) and item["label"] == 0


def test_t1_mode_keeps_paths_and_rows(root):
    items = read_split(root / "splits/IXI_train_fold0.csv", root, mode="t1")
    assert [Path(i["image"]).name for i in items] == ["IXI076-Guys-0753_t1.nii.gz", "IXI012-HH-1211_t1.nii.gz"]


def test_brats_and_mslub_rows(root):
    (brats,) = load_split(root, "Brats21_test")
    assert brats["image"].endswith("Test/Brats21/t2/BraTS2021_00538_t2.nii.gz")
    assert brats["seg"].endswith("Test/Brats21/seg/BraTS2021_00538_seg.nii.gz")
    assert brats["age"] is None and brats["label"] == 1
    (ms,) = load_split(root, "MSLUB_test")
    # only the folder and the suffix change: the "t1" inside "patient12" stays
    assert ms["image"].endswith("Test/MSLUB/t2/patient12_t2.nii.gz")
    assert ms["name"] == "patient12"


def test_missing_files_listed_in_one_error(root):
    (root / "Test/Brats21/seg/BraTS2021_00538_seg.nii.gz").unlink()
    (root / "Test/Brats21/mask/BraTS2021_00538_mask.nii.gz").unlink()
    with pytest.raises(DataError) as err:
        load_split(root, "Brats21_test")
    message = str(err.value)
    assert "2 file(s)" in message and "Brats21_test.csv" in message
    assert "BraTS2021_00538_seg.nii.gz" in message and "BraTS2021_00538_mask.nii.gz" in message


def test_unknown_split_and_data_root(root, tmp_path):
    with pytest.raises(DataError, match="IXI_train_fold7.*available.*IXI_train_fold0"):
        load_split(root, "IXI_train_fold7")
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "nowhere", "IXI_train_fold0")


@pytest.fixture
def volume(tmp_path):
    """A 1 mm ellipsoid 'brain' of 150x170x120 with a bright blob as lesion."""
    x, y, z = np.mgrid[:150, :170, :120]
    brain = ((x - 75) / 60) ** 2 + ((y - 85) / 75) ** 2 + ((z - 60) / 55) ** 2 < 1
    lesion = ((x - 90) ** 2 + (y - 85) ** 2 + (z - 60) ** 2) < 12 ** 2
    rng = np.random.default_rng(0)
    image = brain * (100 + 10 * rng.standard_normal(brain.shape)) + lesion * 80
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    paths = {}
    for key, array in {"image": image.astype(np.float32), "mask": brain.astype(np.uint8),
                       "seg": lesion.astype(np.uint8)}.items():
        paths[key] = str(tmp_path / f"{key}.nii.gz")
        nib.save(nib.Nifti1Image(array, affine), paths[key])
    return paths


def _config(bundle: str, id: str, *configs: str):
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / c) for c in ("common.yaml", *configs)])
    return parser.get_parsed_content(id)


@pytest.fixture
def preprocessing():
    """The volume preprocessing as the cond_ddpm configs list it."""
    return _config("cond_ddpm", "volume_preprocessing")


def test_bundles_share_one_preprocessing():
    encoder, ddpm = (json.dumps(transform_settings(_config(b, "volume_preprocessing")))  # NaN settings compare as text
                     for b in ("contrastive_encoder", "cond_ddpm"))
    assert encoder == ddpm


def test_preprocessing_shape_range_alignment(volume, preprocessing):
    out = Compose(preprocessing)(volume)
    for key in ("image", "mask", "seg"):
        assert out[key].shape == (1, 96, 96, 50)
    image, mask, seg = out["image"], out["mask"], out["seg"]
    assert image.min() >= 0 and image.max() <= 1
    assert set(torch.unique(mask).tolist()) == {0.0, 1.0} and set(torch.unique(seg).tolist()) == {0.0, 1.0}
    # the lesion is the brightest tissue after the percentile rescale and sits where the segmentation says
    assert image[seg > 0].mean() > 0.95 and image[(mask > 0) & (seg == 0)].mean() < 0.85
    # background outside the (resampled) brain mask stays dark
    assert image[mask == 0].mean() < 0.05
    # the 150x170x120 volume was padded to 192x192 and cropped to 100 slices, centred, then halved
    z_profile = mask[0].sum((0, 1))
    assert z_profile[0] > 0 and z_profile[-1] > 0 and z_profile[25] == z_profile.max()


def test_curvature_flow_crop_matches_full_volume(volume):
    data = LoadImaged("image", image_only=True, ensure_channel_first=True)({"image": volume["image"]})
    crop = ResizeWithPadOrCropd("image", spatial_size=(120, 120, 60))
    full = crop(T.CurvatureFlowd("image")(data))["image"]
    fast = crop(T.CurvatureFlowd("image", roi_size=(120, 120, 60))(data))["image"]
    assert torch.equal(full, fast)
    assert not torch.equal(full, crop(data)["image"])  # it does smooth


def test_cache_reused_on_second_pass(volume, tmp_path, monkeypatch, preprocessing):
    items = [{**volume, "name": "v", "label": 1}]
    first = volume_dataset(items, tmp_path / "cache", preprocessing)[0]
    cached = list((tmp_path / "cache").rglob("*.pt"))
    assert len(cached) == 1

    def fail(*_):
        raise AssertionError("preprocessing ran again")

    monkeypatch.setattr(T.CurvatureFlowd, "__call__", fail)
    second = volume_dataset(items, tmp_path / "cache", _config("cond_ddpm", "volume_preprocessing"))[0]
    assert torch.equal(first["image"], second["image"])
    # a cached volume is the same type, with the same affine, as a freshly computed one
    assert isinstance(second["image"], MetaTensor) and torch.equal(second["image"].affine, first["image"].affine)
    # other settings -> other cache files, so stale volumes are never reused
    monkeypatch.undo()
    other = _config("cond_ddpm", "volume_preprocessing")
    other[3].iterations = 2
    volume_dataset(items, tmp_path / "cache", other)[0]
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 2


def test_cache_holds_preprocessing_only(volume, tmp_path, preprocessing):
    """Datasets with different (even deterministic) post-transforms share the cache, never each other's output."""
    items = [{**volume, "name": "v", "label": 1}]
    slices = volume_dataset(items, tmp_path / "cache", preprocessing, transform=T.AxialSlicesd(["image", "mask"]))[0]
    shifted = volume_dataset(items, tmp_path / "cache", preprocessing,
                             transform=ScaleIntensityRanged("image", 0.5, 1.0, 0.5, 1.0, clip=True))[0]
    assert isinstance(slices, list) and slices[0]["image"].shape == (1, 96, 96)
    assert shifted["image"].shape == (1, 96, 96, 50) and shifted["image"].min() == 0.5
    assert len(list((tmp_path / "cache").rglob("*.pt"))) == 1


def test_random_slices_have_brain(volume, tmp_path, preprocessing):
    slicer = T.RandAxialSliced(["image", "mask", "seg"])
    dataset = volume_dataset([{**volume, "name": "v", "label": 1}], tmp_path / "cache", preprocessing, transform=slicer)
    seen = set()
    for _ in range(30):
        sample = dataset[0]
        assert sample["image"].shape == (1, 96, 96)
        assert sample["mask"].sum() > 0
        seen.add(sample["slice"])
    assert len(seen) > 5


def test_intensity_augmentation_keeps_shape_and_range():
    augment = _config("cond_ddpm", "augment_slice", "train.yaml")
    augment.set_random_state(0)
    image = torch.rand(1, 96, 96)
    outputs = [augment({"image": image})["image"] for _ in range(20)]
    assert all(o.shape == (1, 96, 96) and o.min() >= 0 and o.max() <= 1 for o in outputs)
    assert sum(not torch.allclose(o, image) for o in outputs) >= 10
