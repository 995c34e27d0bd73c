"""``check_data`` and ``preview`` on a demo data root, intact and after deliberate damage."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from custom_components.check_data import check_data

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m custom_components ...`` from the repository root, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "custom_components", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def root(demo_root, tmp_path) -> Path:
    """A private copy of the session's demo root, free to damage."""
    return Path(shutil.copytree(demo_root, tmp_path / "root"))


def _splits_listing(root: Path, filename: str) -> list[str]:
    """The split CSVs whose text mentions ``filename`` (read as plain text, independent of the reader)."""
    return sorted(p.stem for p in (root / "splits").glob("*.csv") if filename in p.read_text())


def _row(stdout: str, split: str) -> list[str]:
    """The table row of ``split`` as whitespace-separated cells."""
    rows = [line.split() for line in stdout.splitlines() if line.split()[:1] == [split]]
    assert len(rows) == 1, f"no single table row for {split} in:\n{stdout}"
    return rows[0]


def _problem_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.strip().startswith("- ")]


def test_cli_passes_on_demo_data_and_lists_every_split(demo_root):
    result = _cli("check_data", "--data_root", str(demo_root))
    assert result.returncode == 0, result.stdout + result.stderr
    csvs = [p for p in (demo_root / "splits").glob("*.csv") if p.name != "avail_t2.csv"]
    assert len(csvs) >= 10
    for csv in csvs:
        row = _row(result.stdout, csv.stem)
        assert row[-1] == "0"  # no problems
        if not csv.stem.startswith("IXI"):  # IXI rows without a T2 volume are dropped in mode t2
            n_rows = len(csv.read_text().strip().splitlines()) - 1
            assert int(row[1]) == n_rows
    assert _problem_lines(result.stdout) == []


def test_cli_names_a_deleted_file(root):
    victim = sorted((root / "Test/Brats21/seg").glob("*.nii.gz"))[0]
    victim.unlink()
    result = _cli("check_data", "--data_root", str(root))
    assert result.returncode == 1
    problems = _problem_lines(result.stdout)
    assert len(problems) == 1, result.stdout
    assert "missing" in problems[0] and str(victim) in problems[0]
    (split,) = _splits_listing(root, victim.name)
    assert split in problems[0]
    assert _row(result.stdout, split)[-1] == "1"


def _rewrite(path: Path, data: np.ndarray) -> None:
    """Replace a NIfTI volume by ``data`` with the original affine."""
    affine = nib.load(path).affine
    nib.save(nib.Nifti1Image(data.astype(np.uint8), affine), path)


def test_empty_brain_mask_is_reported(root, capsys):
    mask = sorted((root / "Test/MSLUB/mask").glob("*.nii.gz"))[0]
    _rewrite(mask, np.zeros(nib.load(mask).shape))
    assert check_data(root) == 1
    problems = _problem_lines(capsys.readouterr().out)
    assert len(problems) == 1
    assert "empty brain mask" in problems[0] and str(mask) in problems[0]


def test_shape_mismatch_is_reported(root, capsys):
    mask = sorted((root / "Test/Brats21/mask").glob("*.nii.gz"))[-1]
    shape = nib.load(mask).shape
    _rewrite(mask, np.ones((60, 70, 80)))
    assert check_data(root) == 1
    problems = _problem_lines(capsys.readouterr().out)
    assert len(problems) == 1
    name = mask.name.replace("_mask.nii.gz", "")
    assert name in problems[0] and "(60, 70, 80)" in problems[0] and str(tuple(shape)) in problems[0]


def test_truncated_file_is_reported_as_unreadable(root, capsys):
    image = sorted((root / "Test/Brats21/t2").glob("*.nii.gz"))[0]
    image.write_bytes(image.read_bytes()[:2000])
    assert check_data(root) == 1
    problems = _problem_lines(capsys.readouterr().out)
    assert len(problems) == 1 and "unreadable" in problems[0] and str(image) in problems[0]


def test_missing_splits_folder_fails(tmp_path, capsys):
    assert check_data(tmp_path) == 1
    assert "no split CSVs" in capsys.readouterr().out


def _red_pixels(png: np.ndarray) -> int:
    r, g, b = (png[..., c].astype(int) for c in range(3))
    return int(((r > 180) & (g < 90) & (b < 90)).sum())


def test_preview_writes_a_grid_with_lesions_outlined(demo_root, tmp_path):
    from custom_components.preview import preview

    out = Path(preview(demo_root, split="Brats21_test", out=tmp_path / "figs" / "grid.png"))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = np.asarray(Image.open(out).convert("RGB"))
    n = len((demo_root / "splits/Brats21_test.csv").read_text().strip().splitlines()) - 1
    # one row of panels (n <= 6 columns), each panel 2.2 x 2.4 inches at 100 dpi, tight bounding box
    assert 0.7 * 240 <= png.shape[0] <= 1.2 * 240
    assert 0.8 * 220 * min(n, 6) <= png.shape[1] <= 1.1 * 220 * 6
    assert _red_pixels(png) > 50 * n  # every BraTS-like volume has a lesion outline
    assert not list(out.parent.glob(".*tmp*"))  # atomic write leaves no temporary file


def test_preview_of_healthy_split_has_no_outline(demo_root, tmp_path):
    from custom_components.preview import preview

    out = preview(demo_root, split="IXI_train_fold0", out=tmp_path / "ixi.png", n=8)
    png = np.asarray(Image.open(out).convert("RGB"))
    assert 0.7 * 480 <= png.shape[0] <= 1.2 * 480  # 8 volumes in rows of 6: two rows
    assert _red_pixels(png) == 0
