"""The cond_ddpm evaluation protocol and inference: hand-made protocol cases, input checks, and the
evaluate / inference configs run as users run them on the demo data."""

import json
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.bundle import ConfigWorkflow

from custom_components.evaluation import VolumeReconstructionInferer
from custom_components.data import load_split
from custom_components.metrics import residual_map, segment
from custom_components.scoring import PROTOCOLS, THRESHOLD_METHODS, fpr_label, reconstruction_errors, score_maps
from custom_components.inference import InputError, PrepareInputd, check_volume, inference_items, resolve_threshold
from tests.conftest import REPO, run_bundle

BUNDLE = "cond_ddpm"
EVALUATE = ["common.yaml", "evaluate.yaml", "demo.yaml"]
INFERENCE = ["common.yaml", "inference.yaml", "demo.yaml"]
TINY = ["--channels", "[8,16,16]", "--num_res_blocks", "1", "--encoder_depth", "18", "--pixel_unshuffle", "2"]
FAST = ["--noise_type", "gaussian", "--recon_timesteps", "[500]", "--num_workers", "0"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A randomly initialised tiny ConditionalDDPM saved as a plain state_dict (what training writes)."""
    from custom_components.networks.diffusion_unet import ConditionalDDPM

    torch.manual_seed(0)
    model = ConditionalDDPM(channels=(8, 16, 16), num_res_blocks=1, encoder_depth=18, pixel_unshuffle=2)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save(model.state_dict(), path)
    return path


# ----------------------------------------------------------------------------------------------
# protocol on hand-made volumes
# ----------------------------------------------------------------------------------------------

SHAPE = (80, 80, 50)
BRAIN = (slice(10, 70), slice(10, 70), slice(5, 45))  # 60 x 60 x 40 = 144000 voxels


def _volume(background: float, block: tuple, value: float) -> tuple[np.ndarray, np.ndarray]:
    """(residual-as-image, brain mask): ``background`` in the brain, ``value`` in ``block``."""
    image = np.zeros(SHAPE, np.float32)
    mask = np.zeros(SHAPE, bool)
    mask[BRAIN] = True
    image[BRAIN] = background
    image[block] = value
    return image, mask


def _write_maps(root, splits: dict, settings=None):
    """A maps folder as evaluate.yaml writes it: ``splits`` = {split: [(name, image, recon, mask, seg), ...]}."""
    manifest = {"settings": settings or {}, "splits": {}}
    for split, volumes in splits.items():
        manifest["splits"][split] = {"dataset": split.split("_")[0], "volumes": [v[0] for v in volumes]}
        for name, image, recon, mask, seg in volumes:
            kinds = {"image": image, "reconstruction": recon, "residual": np.abs(image - recon),
                     "mask": mask.astype(np.uint8)}
            if seg is not None:
                kinds["seg"] = seg.astype(np.uint8)
            for kind, array in kinds.items():
                (root / split).mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4)), root / split / f"{name}_{kind}.nii.gz")
    (root / "maps.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def hand_made_maps(tmp_path):
    """Healthy IXI val (0.2 in the brain, a 16^3 block at 0.9), a lesion set (a 12^3 block at 0.8 = the
    segmentation, in 0.2) and IXI_test, all with reconstruction 0 (residual = intensity)."""
    healthy, mask = _volume(0.2, (slice(30, 46), slice(30, 46), slice(15, 31)), 0.9)
    lesion_block = (slice(30, 42), slice(30, 42), slice(15, 27))
    lesion, _ = _volume(0.2, lesion_block, 0.8)
    seg = np.zeros(SHAPE, bool)
    seg[lesion_block] = True
    zero = np.zeros(SHAPE, np.float32)
    maps = _write_maps(tmp_path / "maps", {
        "IXI_val_fold0": [("h", healthy, zero, mask, None)],
        "IXI_test": [("t", healthy, zero, mask, None)],
        "Set_val": [("v", lesion, zero, mask, seg)],
        "Set_test": [("t", lesion, zero, mask, seg)],
    })
    return maps, lesion_block


def test_score_thresholds_and_metrics_on_hand_made_maps(hand_made_maps, tmp_path):
    # After the 5^3 median filter the healthy block keeps 12^3 + 3*2*12*12 = 3608 voxels (edges and corners go):
    # 2.5 % of the 144000 brain voxels and 1.1 % of all 320000, so 1 % FPR needs t = 0.9 in both regions while
    # 5 % and 10 % allow everything above 0.2. The lesion block keeps (2+8)^3 + 3*2*8*8 = 1384 of its 1728
    # voxels, so any threshold in [0.2, 0.8) gives Dice 2*1384 / (1384 + 1728).
    maps, lesion_block = hand_made_maps
    expected_dice = 2 * 1384 / (1384 + 1728)
    results = {}
    for protocol in PROTOCOLS:
        results[protocol] = score_maps(maps, tmp_path / protocol, protocol=protocol)
        out = results[protocol]
        assert out["IXI"]["fpr_thresholds"] == {"1%": pytest.approx(0.9), "5%": pytest.approx(0.2),
                                                "10%": pytest.approx(0.2)}
        entry = out["Set"]
        assert entry["threshold_method"] == "bisection" and entry["thresholds"]["found_on"] == "Set_val"
        for method in THRESHOLD_METHODS:
            assert 0.2 <= entry["thresholds"][method]["threshold"] < 0.8
            assert entry["thresholds"][method]["val_dice"] == pytest.approx(expected_dice)
        assert entry["metrics"]["dice"]["mean"] == pytest.approx(expected_dice) and entry["metrics"]["dice"]["n"] == 1
        assert entry["metrics"]["best_dice"]["mean"] == pytest.approx(expected_dice)
        assert entry["metrics_at_exact"]["dice"]["mean"] == pytest.approx(expected_dice)
        assert entry["fpr"]["1%"]["metrics"]["dice"]["mean"] == 0.0  # nothing lies above 0.9
        assert entry["fpr"]["5%"]["metrics"]["dice"]["mean"] == pytest.approx(expected_dice)
        assert entry["metrics"]["precision"]["mean"] == 1.0 and entry["metrics"]["lesion_voxels"]["mean"] == 1728
        # IXI_test: L1 / L2 of the whole volume against a zero reconstruction
        healthy = nib.load(maps / "IXI_test" / "t_image.nii.gz").get_fdata()
        assert out["IXI"]["metrics"]["l1"]["mean"] == pytest.approx(healthy.mean())
        assert out["IXI"]["metrics"]["l2"]["mean"] == pytest.approx((healthy**2).mean())
        rows = pd.read_csv(tmp_path / protocol / "per_volume.csv")
        assert set(rows["split"]) == {"Set_test", "IXI_test"}
        assert (tmp_path / protocol / "Set_grid.png").read_bytes()[:8] == PNG_MAGIC
    # the reference counts every voxel of the volume, the project only brain voxels
    assert results["reference"]["settings"]["region"] == "volume" and results["project"]["settings"]["region"] == "brain"
    tn = {p: results[p]["Set"]["metrics"]["tn"]["mean"] for p in PROTOCOLS}
    assert tn["reference"] - tn["project"] == np.prod(SHAPE) - 144000
    assert results["reference"]["Set"]["metrics"]["auroc"]["mean"] > results["project"]["Set"]["metrics"]["auroc"]["mean"]


def test_reference_scores_the_raw_reconstruction_and_project_clips_it(tmp_path):
    image, mask = _volume(0.5, (slice(30, 40),) * 3, 1.0)
    recon = image.copy()
    recon[image == 1.0] = 1.5  # the network overshoots where the image is brightest
    maps = _write_maps(tmp_path / "maps", {"IXI_test": [("t", image, recon, mask, None)]})
    reference = score_maps(maps, tmp_path / "r", protocol="reference")["IXI"]["metrics"]["l1"]["mean"]
    project = score_maps(maps, tmp_path / "p", protocol="project")["IXI"]["metrics"]["l1"]["mean"]
    assert reference == pytest.approx(0.5 * 1000 / np.prod(SHAPE)) and project == 0.0
    unclipped = score_maps(maps, tmp_path / "u", protocol="project", clamp="false")["IXI"]["metrics"]["l1"]["mean"]
    assert unclipped == pytest.approx(reference)
    baseline = score_maps(maps, tmp_path / "b", baseline=True)["IXI"]["metrics"]["l1"]["mean"]
    assert baseline == pytest.approx(image.mean())


def test_reconstruction_errors_inside_and_outside_the_lesion():
    image = np.zeros((4, 4, 4), np.float32)
    recon = np.full((4, 4, 4), 0.5, np.float32)
    seg = np.zeros((4, 4, 4), bool)
    seg[0, 0, 0] = True
    recon[seg] = 1.0
    errors = reconstruction_errors(image, recon, seg)
    assert errors["l1_lesion"] == 1.0 and errors["l1_healthy"] == 0.5
    assert errors["l2_lesion"] == 1.0 and errors["l2_healthy"] == 0.25
    assert errors["l1"] == pytest.approx((1.0 + 63 * 0.5) / 64)
    assert np.isnan(reconstruction_errors(image, recon)["l1_lesion"])


def test_score_refuses_an_unfinished_maps_folder_and_missing_labels(tmp_path, hand_made_maps):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="maps.json does not exist"):
        score_maps(tmp_path / "empty", tmp_path / "out")
    maps, _ = hand_made_maps
    (maps / "Set_val" / "v_seg.nii.gz").unlink()
    with pytest.raises(ValueError, match="Set_val volume v has no segmentation"):
        score_maps(maps, tmp_path / "out")
    with pytest.raises(ValueError, match="protocol must be one of"):
        score_maps(maps, tmp_path / "out", protocol="paper")


def test_fpr_label():
    assert [fpr_label(r) for r in (0.01, 0.05, 0.1)] == ["1%", "5%", "10%"]


# ----------------------------------------------------------------------------------------------
# volume reconstruction: scaling, slice order, intensity baseline
# ----------------------------------------------------------------------------------------------


class _Recorder:
    """A slice inferer that records its input and returns ``fn(input)``."""

    def __init__(self, fn):
        self.fn, self.seen = fn, None

    def __call__(self, inputs, network):
        self.seen = inputs.clone()
        return self.fn(inputs)


def test_volume_inferer_scales_and_keeps_slice_order():
    volumes = torch.rand(2, 1, 8, 6, 5)
    identity = _Recorder(lambda x: x)
    out = VolumeReconstructionInferer(identity)(volumes, network=None)
    assert out.shape == volumes.shape and torch.allclose(out, volumes, atol=1e-6)
    # one slice batch per volume, its D slices in order, scaled to [-1, 1] (the last call: volume 1)
    assert identity.seen.shape == (5, 1, 8, 6)
    assert torch.allclose(identity.seen[3], volumes[1, :, :, :, 3] * 2 - 1)
    black = VolumeReconstructionInferer(_Recorder(lambda x: x * 0 - 1))  # -1 in the diffusion range is 0
    assert torch.equal(black(volumes, None), torch.zeros_like(volumes))
    overshoot = VolumeReconstructionInferer(_Recorder(lambda x: x * 0 + 5))  # clipped to 1
    assert torch.equal(overshoot(volumes, None), torch.ones_like(volumes))
    raw = VolumeReconstructionInferer(_Recorder(lambda x: x * 0 + 5), clamp=False)  # the maps keep the raw value
    assert torch.equal(raw(volumes, None), torch.full_like(volumes, 3.0))
    baseline = VolumeReconstructionInferer(None, reconstruction="none")
    assert torch.equal(baseline(volumes, network=None), torch.zeros_like(volumes))
    with pytest.raises(ValueError, match="reconstruction must be one of"):
        VolumeReconstructionInferer(identity, reconstruction="gan")


# ----------------------------------------------------------------------------------------------
# inference inputs and thresholds
# ----------------------------------------------------------------------------------------------


def _nifti(path, data, spacing=1.0):
    affine = np.diag([spacing, spacing, spacing, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def _brain(shape=(100, 100, 100)) -> np.ndarray:
    data = np.zeros(shape, np.float32)
    data[20:80, 20:80, 20:80] = np.linspace(0.1, 1.0, 60, dtype=np.float32)
    return data


def test_input_checks_name_the_file_and_the_problem(tmp_path):
    good = _nifti(tmp_path / "good_t2.nii.gz", _brain())
    assert check_volume(good)["brain_voxels"] == 60**3
    cases = {
        "empty.nii.gz": (np.zeros((100, 100, 100), np.float32), 1.0, "contains no brain"),
        "series.nii.gz": (np.stack([_brain(), _brain()], -1), 1.0, r"is 4D with shape \(100, 100, 100, 2\)"),
        "coarse.nii.gz": (_brain(), 2.0, r"voxel spacing \(2.0, 2.0, 2.0\) mm"),
        "small.nii.gz": (_brain((40, 100, 100)), 1.0, r"shape \(40, 100, 100\) is not that of a 1 mm brain"),
    }
    for name, (data, spacing, message) in cases.items():
        path = _nifti(tmp_path / name, data, spacing)
        with pytest.raises(InputError, match=f"{path}: {message}"):
            inference_items(path)
    # a folder: every problem in one error, good files not listed
    with pytest.raises(InputError, match="4 of 5 input") as error:
        inference_items(tmp_path)
    assert all(name in str(error.value) for name in cases) and "good_t2" not in str(error.value)

    masks = tmp_path / "masks"
    masks.mkdir()
    with pytest.raises(InputError, match="no brain mask for it in .*good_mask.nii.gz"):
        inference_items(good, masks)
    _nifti(masks / "good_mask.nii.gz", np.zeros((100, 100, 100), np.uint8))
    with pytest.raises(InputError, match="its brain mask good_mask.nii.gz is empty"):
        inference_items(good, masks)
    _nifti(masks / "good_mask.nii.gz", (_brain() > 0).astype(np.uint8))
    (item,) = inference_items(good, masks)
    assert item["name"] == "good_t2" and item["source_mask"].endswith("good_mask.nii.gz")
    with pytest.raises(InputError, match="is the input folder"):
        inference_items(tmp_path, output_dir=tmp_path)

    # an item with the image only (as MONAI Label sends it) is completed and checked on loading
    item = PrepareInputd()({"image": str(good)})
    assert item["mask"] == str(good) and item["name"] == "good_t2" and item["source_mask"] == ""
    with pytest.raises(InputError, match="empty.nii.gz: contains no brain"):
        PrepareInputd()({"image": str(tmp_path / "empty.nii.gz")})


def test_resolve_threshold(tmp_path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"Brats21": {"threshold": 0.25}, "IXI": {"fpr_thresholds": {"5%": 0.5, "0.1": 0.7}}}))
    assert resolve_threshold(0.3) == 0.3 and resolve_threshold("0.3") == 0.3
    assert resolve_threshold(str(metrics), "Brats21.threshold") == 0.25
    assert resolve_threshold(metrics, "IXI.fpr_thresholds.5%") == 0.5
    assert resolve_threshold(metrics, "IXI.fpr_thresholds.0.1") == 0.7  # a key with a dot in it
    with pytest.raises(InputError, match="has no entry 'MSLUB.threshold'"):
        resolve_threshold(metrics, "MSLUB.threshold")
    with pytest.raises(InputError, match="neither a number nor an existing metrics.json"):
        resolve_threshold(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------
# the configs, as users run them
# ----------------------------------------------------------------------------------------------


def _split_names(demo_root, split):
    return set(pd.read_csv(demo_root / "splits" / f"{split}.csv")["img_name"].str.replace(".nii.gz", ""))


@pytest.fixture(scope="module")
def maps_dir(demo_root, cache_dir, tiny_ckpt, tmp_path_factory):
    """The maps of every evaluation split of the demo data, written by evaluate.yaml with the tiny network."""
    out = tmp_path_factory.mktemp("maps")
    run_bundle(EVALUATE, BUNDLE, "--dataset_dir", str(demo_root), "--cache_dir", str(cache_dir),
               "--output_dir", str(out), "--ckpt_path", str(tiny_ckpt), "--tracking", "mlflow", *TINY, *FAST)
    return out


def test_maps_hold_every_split_on_the_model_grid(maps_dir, demo_root, tiny_ckpt):
    manifest = json.loads((maps_dir / "maps.json").read_text())
    assert list(manifest["splits"]) == ["IXI_val_fold0", "IXI_test", "Brats21_val", "Brats21_test", "MSLUB_val",
                                        "MSLUB_test"]
    settings = manifest["settings"]
    assert settings["ckpt_path"] == str(tiny_ckpt) and settings["protocol"] == "reference"
    assert settings["shared_noise_test"] is True and settings["timesteps"] == [500] and settings["fold"] == 0
    for split, entry in manifest["splits"].items():
        assert set(entry["volumes"]) == {item["name"] for item in load_split(demo_root, split)}
        assert entry["dataset"] == split.split("_")[0]
        name = entry["volumes"][0]
        maps = {kind: nib.load(maps_dir / split / f"{name}_{kind}.nii.gz")
                for kind in ("image", "reconstruction", "residual", "mask")}
        assert all(m.shape == (96, 96, 50) for m in maps.values())
        assert np.allclose(maps["image"].header.get_zooms(), 2.0)  # the model grid
        image, recon, residual = (maps[k].get_fdata() for k in ("image", "reconstruction", "residual"))
        assert np.allclose(residual, np.abs(image - recon), atol=1e-6)
        assert (maps_dir / split / f"{name}_seg.nii.gz").exists() == (entry["dataset"] != "IXI")
    assert not list(maps_dir.rglob(".*tmp*"))


def test_rescoring_needs_no_network_and_matches_the_saved_maps(maps_dir, demo_root, tiny_ckpt, tmp_path):
    import time

    hidden = tiny_ckpt.with_suffix(".hidden")
    tiny_ckpt.rename(hidden)  # scoring must not read the checkpoint
    try:
        run_bundle(["score.yaml"], BUNDLE, "--maps_dir", str(maps_dir), "--output_dir", str(tmp_path / "reference"),
                   "--grid_slices", "2")  # the default protocol is the reference
        start = time.perf_counter()
        score_maps(maps_dir, tmp_path / "project", protocol="project", grid_slices=2)
        print(f"scoring the maps in-process under the project protocol: {time.perf_counter() - start:.1f} s")
        run_bundle(["score.yaml"], BUNDLE, "--maps_dir", str(maps_dir), "--output_dir", str(tmp_path / "baseline"),
                   "--baseline", "true", "--tracking", "mlflow")
    finally:
        hidden.rename(tiny_ckpt)
    for protocol in PROTOCOLS:
        out = tmp_path / protocol
        results = json.loads((out / "metrics.json").read_text())
        assert set(results) == {"IXI", "Brats21", "MSLUB", "settings"}
        assert results["settings"]["protocol"] == protocol and results["settings"]["maps"]["ckpt_path"] == str(tiny_ckpt)
        brats = results["Brats21"]
        assert brats["threshold"] == brats["thresholds"]["bisection"]["threshold"]
        assert brats["thresholds"]["found_on"] == "Brats21_val"
        for metric in ("dice", "best_dice", "auroc", "auprc", "tpr", "fpr", "precision", "recall", "specificity",
                       "hausdorff", "slice_auroc", "slice_auprc", "volume_score", "l1", "l1_lesion"):
            assert set(brats["metrics"][metric]) == {"mean", "std", "n"}, metric
        assert set(brats["fpr"]) == {"1%", "5%", "10%"} and "dice" in brats["metrics_at_exact"]
        assert results["IXI"]["test_split"] == "IXI_test"
        assert results["IXI"]["n_test_volumes"] == len(load_split(demo_root, "IXI_test"))
        rows = pd.read_csv(out / "per_volume.csv").set_index("name")
        # the Dice of each test volume follows from the saved maps and the shared segmentation step
        for name in _split_names(demo_root, "Brats21_test"):
            load = lambda kind: nib.load(maps_dir / "Brats21_test" / f"{name}_{kind}.nii.gz").get_fdata()  # noqa: E731
            image, recon, mask, seg = load("image"), load("reconstruction"), load("mask") > 0, load("seg") > 0
            if protocol == "project":
                recon = np.clip(recon, 0, 1)
            residual = residual_map(image.astype(np.float32), recon.astype(np.float32), mask)
            region = mask if protocol == "project" else np.ones_like(mask)
            pred = segment(residual, brats["threshold"], region)
            dice = 2 * np.sum(pred & seg & region) / (np.sum(pred) + np.sum(seg & region))
            assert dice == pytest.approx(rows.loc[name, "dice"], abs=1e-6)
        assert (out / "Brats21_grid.png").read_bytes()[:8] == PNG_MAGIC
    # the same maps under the two protocols: same thresholds' data, other voxel counts
    ref, proj = (json.loads((tmp_path / p / "metrics.json").read_text()) for p in PROTOCOLS)
    assert ref["Brats21"]["metrics"]["tn"]["mean"] > proj["Brats21"]["metrics"]["tn"]["mean"]

    baseline = json.loads((tmp_path / "baseline" / "metrics.json").read_text())
    assert baseline["settings"]["baseline"] is True
    import mlflow

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'baseline' / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    logged = runs[0].data.metrics
    assert logged["Brats21/dice"] == pytest.approx(baseline["Brats21"]["metrics"]["dice"]["mean"])
    assert logged["IXI/l1"] == pytest.approx(baseline["IXI"]["metrics"]["l1"]["mean"])
    assert logged["IXI/fpr5pct_threshold"] == pytest.approx(baseline["IXI"]["fpr_thresholds"]["5%"])


def test_evaluate_without_checkpoint_fails_clearly(demo_root, tmp_path):
    with pytest.raises(AssertionError, match=r"checkpoint .*missing\.pt does not exist"):
        run_bundle(EVALUATE, BUNDLE, "--dataset_dir", str(demo_root), "--output_dir", str(tmp_path),
                   "--ckpt_path", str(tmp_path / "missing.pt"))


@pytest.fixture(scope="module")
def user_scan(demo_root, tmp_path_factory):
    """A BraTS-like demo volume copied to a user folder, with its mask in another folder."""
    folder = tmp_path_factory.mktemp("user")
    name = sorted(_split_names(demo_root, "Brats21_test"))[0]
    image = folder / "scans" / f"{name}_t2.nii.gz"
    image.parent.mkdir()
    shutil.copy(demo_root / "Test" / "Brats21" / "t2" / f"{name}_t2.nii.gz", image)
    masks = folder / "masks"
    masks.mkdir()
    shutil.copy(demo_root / "Test" / "Brats21" / "mask" / f"{name}_mask.nii.gz", masks)
    return image, masks


def test_inference_round_trip_in_the_input_grid(user_scan, tiny_ckpt, tmp_path):
    image, masks = user_scan
    before = (image.read_bytes(), image.stat().st_mtime_ns)
    out = tmp_path / "out"
    run_bundle(INFERENCE, BUNDLE, "--input", str(image.parent), "--input_mask", str(masks), "--output_dir", str(out),
               "--ckpt_path", str(tiny_ckpt), "--threshold", "0.3", *TINY, *FAST)
    assert (image.read_bytes(), image.stat().st_mtime_ns) == before
    source = nib.load(image)
    stem = image.name[: -len(".nii.gz")]
    anomaly, seg = nib.load(out / f"{stem}_anomaly.nii.gz"), nib.load(out / f"{stem}_seg.nii.gz")
    for output in (anomaly, seg):
        assert output.shape == source.shape and np.allclose(output.affine, source.affine)
    assert set(np.unique(seg.get_fdata())) <= {0, 1} and seg.get_data_dtype() == np.uint8
    values = anomaly.get_fdata()
    assert values.min() >= 0 and values.max() <= 1 and values.max() > 0
    assert (out / f"{stem}_overlay.png").read_bytes()[:8] == PNG_MAGIC
    written = sorted(p.name for p in out.iterdir())  # nothing else, no temporary files left
    assert written == [f"{stem}_{k}" for k in ("anomaly.nii.gz", "overlay.png", "seg.nii.gz")]


def test_inference_maps_land_on_the_input_anatomy(tmp_path):
    """Intensity baseline on a phantom: an ellipsoid brain at 0.3 with a bright sphere (radius 15 mm) off
    centre, in a grid that gets padded in x, kept in y and cropped in z, with a flipped x axis. The map at
    threshold 0.5 is the sphere, so in the input grid the segmentation must sit on it."""
    shape = (160, 192, 160)
    x, y, z = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    brain = ((x - 80) / 60) ** 2 + ((y - 96) / 75) ** 2 + ((z - 80) / 55) ** 2 <= 1
    sphere = (x - 55) ** 2 + (y - 125) ** 2 + (z - 92) ** 2 <= 15**2
    image = np.where(brain, 0.3, 0.0).astype(np.float32)
    image[sphere] = 1.0
    affine = np.array([[-1.0, 0, 0, 80], [0, 1, 0, -100], [0, 0, 1, -70], [0, 0, 0, 1]])
    path = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), path)
    out = tmp_path / "out"
    run_bundle(["common.yaml", "inference.yaml"], BUNDLE, "--input", str(path), "--output_dir", str(out),
               "--reconstruction", "none", "--threshold", "0.5")
    seg_image = nib.load(out / "phantom_seg.nii.gz")
    assert seg_image.shape == shape and np.allclose(seg_image.affine, affine)
    seg = seg_image.get_fdata() > 0
    dice = 2 * np.sum(seg & sphere) / (seg.sum() + sphere.sum())
    assert dice > 0.85  # 2 mm model voxels, nearest-neighbour back to 1 mm
    assert np.allclose(np.argwhere(seg).mean(0), [55, 125, 92], atol=1.0)
    anomaly = nib.load(out / "phantom_anomaly.nii.gz").get_fdata()
    assert anomaly[55, 125, 92] == pytest.approx(1.0, abs=0.02) and anomaly[~brain].max() == 0


def test_inference_rejects_bad_inputs_before_any_work(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    _nifti(folder / "blank.nii.gz", np.zeros((100, 100, 100), np.float32))
    _nifti(folder / "thick.nii.gz", _brain(), spacing=3.0)
    _nifti(folder / "series.nii.gz", np.stack([_brain()] * 2, -1))
    with pytest.raises(AssertionError) as error:
        run_bundle(["common.yaml", "inference.yaml"], BUNDLE, "--input", str(folder), "--output_dir", str(tmp_path / "out"),
                   "--reconstruction", "none", "--threshold", "0.5")
    message = str(error.value)
    assert "3 of 3 input(s) cannot be used" in message
    assert "blank.nii.gz: contains no brain" in message and "thick.nii.gz: voxel spacing" in message
    assert "series.nii.gz: is 4D" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("configs", [["common.yaml", "inference.yaml"], INFERENCE])
def test_inference_bundle_properties(configs):
    folder = REPO / "bundles" / BUNDLE / "configs"
    workflow = ConfigWorkflow(config_file=[str(folder / c) for c in configs], meta_file=str(folder / "metadata.json"),
                              logging_file=str(folder / "logging.conf"), workflow_type="infer",
                              bundle_root=str(REPO / "bundles" / BUNDLE))
    workflow.initialize()
    assert workflow.check_properties() == []
