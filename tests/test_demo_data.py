"""Demo data root: real layout and CSV formats, determinism, visible lesions, NOVA boxes, safe writes."""

from __future__ import annotations

import ast
import csv
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi

from custom_components import demo_data
from custom_components.demo_data import make_demo_data

TINY = dict(n_ixi=6, n_brats=2, n_mslub=2, n_nova=12)

# Header lines of the distributed split CSVs, written out by hand from the public files.
IXI_LINE = (',img_name,"SEX_ID (1=m, 2=f)",HEIGHT,WEIGHT,ETHNIC_ID,MARITAL_ID,OCCUPATION_ID,QUALIFICATION_ID,'
            "DATE_AVAILABLE,STUDY_DATE,age,label,img_path,mask_path,seg_path,Agegroup")
BRATS_LINE = (",img_name,Cohort Name (if publicly available),Site No (represents the originating institution),"
              "Local ID ,age,label,img_path,mask_path,seg_path")
MSLUB_LINE = ",img_name,age,sex,ms_type,label,img_path,mask_path,seg_path,Agegroup"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("demo") / "root", seed=0, workers=1, **TINY)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _t2(root: Path, csv_path: str) -> Path:
    return root / csv_path.lstrip("/").replace("t1", "t2")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_and_headers(root):
    for d in ("Train/ixi/t1", "Train/ixi/t2", "Train/ixi/mask", "splits", "NOVA/images"):
        assert (root / d).is_dir(), d
    for ds in ("Brats21", "MSLUB"):
        for d in ("t1", "t2", "mask", "seg"):
            assert (root / "Test" / ds / d).is_dir()
    expected = {f"IXI_{s}_fold{k}.csv": IXI_LINE for s in ("train", "val") for k in range(5)}
    expected.update({"IXI_test.csv": IXI_LINE, "avail_t2.csv": ",0", "Brats21_val.csv": BRATS_LINE,
                     "Brats21_test.csv": BRATS_LINE, "MSLUB_val.csv": MSLUB_LINE, "MSLUB_test.csv": MSLUB_LINE})
    assert sorted(p.name for p in (root / "splits").iterdir()) == sorted(expected)
    for name, line in expected.items():
        assert (root / "splits" / name).read_text().splitlines()[0] == line, name


def test_ixi_folds_and_t2_availability(root):
    s = root / "splits"
    val = [{r["img_name"] for r in _rows(s / f"IXI_val_fold{k}.csv")} for k in range(5)]
    train = [{r["img_name"] for r in _rows(s / f"IXI_train_fold{k}.csv")} for k in range(5)]
    test = {r["img_name"] for r in _rows(s / "IXI_test.csv")}
    pool = set().union(*val)
    assert sum(len(v) for v in val) == len(pool)  # each subject in exactly one val fold
    assert all(v for v in val) and test and not (pool & test)
    for k in range(5):
        assert train[k] == pool - val[k]
    avail = [r["0"] for r in _rows(s / "avail_t2.csv")]
    everyone = [r for k in range(5) for r in _rows(s / f"IXI_val_fold{k}.csv")] + _rows(s / "IXI_test.csv")
    missing = [r for r in everyone if r["img_name"].replace("_t1", "_t2") not in avail]
    assert len(missing) == 2 and len(everyone) == TINY["n_ixi"] + 2
    for r in everyone:
        assert r["img_path"] == f"/Train/ixi/t1/{r['img_name']}"
        assert r["img_name"].startswith("IXI") and r["img_name"].endswith("_t1.nii.gz")
        assert r["mask_path"] == r["img_path"].replace("/t1/", "/mask/").replace("_t1.", "_mask.")
        assert r["seg_path"] == "" and r["label"] == "0"
        assert _t2(root, r["img_path"]).is_file() == (r not in missing)
        assert (root / r["mask_path"].lstrip("/")).is_file() == (r not in missing)
    assert sorted(p.name for p in (root / "Train/ixi/t2").iterdir()) == sorted(avail)


@pytest.mark.parametrize("prefix", ["Brats21", "MSLUB"])
def test_test_sets(root, prefix):
    rows = _rows(root / "splits" / f"{prefix}_val.csv") + _rows(root / "splits" / f"{prefix}_test.csv")
    n = TINY["n_brats"] if prefix == "Brats21" else TINY["n_mslub"]
    assert len({r["img_name"] for r in rows}) == n
    for r in rows:
        assert r["img_path"] == f"/Test/{prefix}/t1/{r['img_name']}_t1.nii.gz" and r["label"] == "1"
        image = nib.load(_t2(root, r["img_path"]))
        mask = nib.load(root / r["mask_path"].lstrip("/"))
        seg = nib.load(root / r["seg_path"].lstrip("/"))
        assert image.get_data_dtype() == np.float32
        assert mask.get_data_dtype() == np.uint8 and seg.get_data_dtype() == np.uint8
        assert image.shape == mask.shape == seg.shape
        assert np.allclose(image.header.get_zooms(), 1.0)
        assert np.allclose(image.affine, mask.affine) and np.allclose(image.affine, seg.affine)
        img, m, sg = image.get_fdata(), mask.get_fdata() > 0, seg.get_fdata() > 0
        assert m.any() and sg.any() and not (sg & ~m).any()
        assert not img[~m].any()  # skull-stripped: zero outside the brain mask


def _template_wm(image: nib.Nifti1Image) -> np.ndarray:
    """White-matter core of the MNI152 template on the volume's grid (same orientation, 1 mm, shifted)."""
    from nilearn import datasets

    wm_img = datasets.load_mni152_wm_template(resolution=1)
    offset = np.linalg.solve(wm_img.affine, image.affine)[:3, 3]
    assert np.allclose(offset, np.round(offset)) and np.allclose(image.affine[:3, :3], wm_img.affine[:3, :3])
    o = np.round(offset).astype(int)
    wm = np.asarray(wm_img.dataobj)[o[0]:o[0] + image.shape[0], o[1]:o[1] + image.shape[1], o[2]:o[2] + image.shape[2]]
    # the subjects are warped by a few mm: erode so that what is left is white matter in every subject
    return ndi.binary_erosion(wm > 0.9 * wm.max(), iterations=3)


@pytest.mark.parametrize("prefix", ["Brats21", "MSLUB"])
def test_lesions_brighter_than_white_matter(root, prefix):
    for r in _rows(root / "splits" / f"{prefix}_test.csv"):
        image = nib.load(_t2(root, r["img_path"]))
        img = image.get_fdata()
        seg = nib.load(root / r["seg_path"].lstrip("/")).get_fdata() > 0
        mask = nib.load(root / r["mask_path"].lstrip("/")).get_fdata() > 0
        wm = _template_wm(image) & mask & ~ndi.binary_dilation(seg, iterations=3)
        wm &= img < np.median(img[wm])  # subjects differ in size and shape: the darker half is white matter
        assert wm.sum() > 5000
        assert img[seg].mean() > 1.5 * img[wm].mean()
        assert img[seg].mean() > np.median(img[mask])  # brighter than the typical brain voxel
        # CSF (the brightest voxels outside the lesions) stays brighter than the lesions on average:
        # a plain threshold would pick up the ventricles as well
        assert np.percentile(img[mask & ~seg], 99.5) > img[seg].mean()
        if prefix == "Brats21":
            assert seg.sum() > 3000  # large tumour + oedema
        else:
            n_lesions = ndi.label(seg)[1]
            assert n_lesions >= 3 and seg.sum() / n_lesions < 1000  # several small lesions


def test_subjects_differ_in_anatomy():
    # head/brain size and the CSF share (ventricles, sulcal widening with atrophy) vary between subjects
    subjects = [demo_data._make_subject(np.random.default_rng([0, 10, k]), "healthy") for k in range(4)]
    brain = np.array([s.mask.sum() for s in subjects], float)
    csf = []
    for s in subjects:
        inside = s.mask > 0
        csf.append(np.mean(ndi.median_filter(s.image, 3)[inside] > 0.8 * np.percentile(s.image[inside], 99)))
    assert np.ptp(brain) / brain.mean() > 0.08
    assert max(csf) / min(csf) > 1.3


def test_tumours_overlap_normal_tissue_in_intensity(root):
    # as on real BraTS T2, no intensity level separates tumour from brain well (oedema between grey matter
    # and CSF, core as dark as grey matter, CSF as bright as necrosis): the best possible Dice stays low
    from custom_components.metrics import find_best_threshold

    dice = []
    for r in _rows(root / "splits" / "Brats21_val.csv") + _rows(root / "splits" / "Brats21_test.csv"):
        img = ndi.median_filter(nib.load(_t2(root, r["img_path"])).get_fdata(), 3)
        seg = nib.load(root / r["seg_path"].lstrip("/")).get_fdata() > 0
        mask = nib.load(root / r["mask_path"].lstrip("/")).get_fdata() > 0
        dice.append(find_best_threshold(img[mask], seg[mask], "exact")[0])
        assert np.mean(img[seg] < np.percentile(img[mask & ~seg], 95)) > 0.2  # much of it looks like tissue
    assert np.mean(dice) < 0.3


def test_ms_lesions_sizes_and_places(root):
    # many small lesions and a few large ones; most next to the ventricles, some far from them (juxtacortical)
    for r in _rows(root / "splits" / "MSLUB_val.csv") + _rows(root / "splits" / "MSLUB_test.csv"):
        img = nib.load(_t2(root, r["img_path"])).get_fdata()
        seg = nib.load(root / r["seg_path"].lstrip("/")).get_fdata() > 0
        mask = nib.load(root / r["mask_path"].lstrip("/")).get_fdata() > 0
        bright = ndi.median_filter(img, 3) > 0.8 * np.percentile(img[mask], 99)
        ventricles = bright & (ndi.distance_transform_edt(mask) > 15) & ~seg
        labels, n = ndi.label(seg)
        sizes = np.bincount(labels.ravel())[1:]
        centres = np.round(ndi.center_of_mass(seg, labels, range(1, n + 1))).astype(int)
        distance = ndi.distance_transform_edt(~ventricles)[tuple(centres.T)]
        assert n >= 8 and sizes.max() >= 5 * np.median(sizes)
        assert np.mean(distance < 10) >= 0.4 and distance.max() > 15


def test_nova_metadata_and_boxes(root):
    rows = _rows(root / "NOVA" / "metadata.csv")
    assert len(rows) == TINY["n_nova"]
    assert {"filename", "caption", "case_id", "bbox_gold", "bbox_raters"} <= set(rows[0])
    assert any("T2" in r["caption"] for r in rows) and any("T2" not in r["caption"] for r in rows)
    sizes = set()
    for r in rows:
        img = np.asarray(Image.open(root / "NOVA" / "images" / r["filename"]))
        assert img.ndim == 2 and img.dtype == np.uint8
        h, w = img.shape
        assert 200 <= h <= 512 and 200 <= w <= 512
        sizes.add((h, w))
        gold = ast.literal_eval(r["bbox_gold"])
        assert set(gold) == {"x", "y", "width", "height"} and len(gold["x"]) >= 1
        assert len({len(v) for v in gold.values()}) == 1
        for x, y, bw, bh in zip(gold["x"], gold["y"], gold["width"], gold["height"]):
            assert 0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
            inside = img[int(y):int(y + bh), int(x):int(x + bw)]
            assert inside.max() > np.median(img[img > 0])  # something bright inside every box
        raters = ast.literal_eval(r["bbox_raters"])
        assert len(raters["x"]) == len(raters["rater"]) > 0
    assert any(h != w for h, w in sizes) and len(sizes) > 1
    assert any(len(ast.literal_eval(r["bbox_gold"])["x"]) > 1 for r in rows)


def _same_tree(a: Path, b: Path) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert _sha(a / rel) == _sha(b / rel), rel


def test_same_seed_same_bytes(root, tmp_path):
    _same_tree(root, make_demo_data(tmp_path / "same", seed=0, workers=1, **TINY))


@pytest.mark.slow
def test_worker_processes_do_not_change_the_output(root, tmp_path):
    _same_tree(root, make_demo_data(tmp_path / "pool", seed=0, workers=2, **TINY))


def test_other_seed_differs(root, tmp_path, monkeypatch):
    # Only one volume (and the cheap NOVA images) of the seed-1 root are generated, to keep this fast.
    def run_some(jobs, workers):
        demo_data._run_job(next(j for j in jobs if j[0] == "volume" and j[1] == "tumour"))
        return [demo_data._run_job(j) for j in jobs if j[0] == "nova"]

    monkeypatch.setattr(demo_data, "_run_jobs", run_some)
    other = make_demo_data(tmp_path / "other", seed=1, **TINY)
    (b,) = list((other / "Test/Brats21/t2").iterdir())
    assert all(_sha(a) != _sha(b) for a in (root / "Test/Brats21/t2").iterdir())
    for name in ("IXI_test.csv", "Brats21_test.csv", "MSLUB_test.csv"):
        assert (root / "splits" / name).read_text() != (other / "splits" / name).read_text()
    assert (root / "NOVA/metadata.csv").read_text() != (other / "NOVA/metadata.csv").read_text()


def test_refuses_non_empty_output(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        make_demo_data(out, **TINY)
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_demo_data(out, overwrite=True, **TINY)  # not a demo data root: never deleted
    assert (out / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        make_demo_data(tmp_path / "file", **TINY)


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    def boom(jobs, workers):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_data, "_run_jobs", boom)
    with pytest.raises(KeyboardInterrupt):
        make_demo_data(tmp_path / "root", **TINY)
    assert list(tmp_path.iterdir()) == []  # neither the root nor a partial sibling


def test_rejects_too_few_subjects(tmp_path):
    with pytest.raises(ValueError, match="n_ixi"):
        make_demo_data(tmp_path / "root", n_ixi=3)
