"""Shared helpers: atomic writes (a finished write replaces the file, a failed one leaves the old file alone)
and choice checks."""

import stat

import pytest

from custom_components.utils import atomic_path, check_choice, write_text_atomic


def test_atomic_path_replaces_on_success_and_keeps_the_format_ending(tmp_path):
    target = tmp_path / "sub" / "scan.nii.gz"
    with atomic_path(target, ".nii.gz") as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".tmp.nii.gz") and tmp.name.startswith(".")
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in target.parent.iterdir()) == ["scan.nii.gz"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_atomic_path_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = write_text_atomic(tmp_path / "metrics.json", "old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_check_choice_names_the_setting_and_lowercases_only_when_asked():
    assert check_choice("noise_type", "Simplex", ("simplex", "gaussian"), lower=True) == "simplex"
    with pytest.raises(ValueError, match=r"region must be one of \('brain', 'volume'\), got 'Brain'"):
        check_choice("region", "Brain", ("brain", "volume"))
