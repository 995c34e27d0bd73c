"""summarize_folds: the paper's table (mean and ddof-0 std of the fold means) from hand-made score outputs."""

import json
import subprocess
import sys

import numpy as np
import pytest

from custom_components.folds import fold_table, summarize_folds
from tests.conftest import REPO


def _run(folder, protocol, values, baseline=False):
    """A score output folder whose metrics.json holds the given fold means."""
    folder.mkdir(parents=True)
    result = {"settings": {"protocol": protocol, "baseline": baseline},
              "IXI": {"metrics": {"l1": {"mean": values["l1"], "std": 0.0, "n": 3}}}}
    for dataset in ("Brats21", "MSLUB"):
        result[dataset] = {"metrics": {m: {"mean": values[f"{dataset}_{m}"], "std": 0.1, "n": 5}
                                       for m in ("dice", "auprc")}}
    (folder / "metrics.json").write_text(json.dumps(result))
    return folder


@pytest.fixture
def five_folds(tmp_path):
    rng = np.random.default_rng(3)
    keys = ("Brats21_dice", "Brats21_auprc", "MSLUB_dice", "MSLUB_auprc", "l1")
    values = [{k: float(rng.uniform(0.01, 0.9)) for k in keys} for _ in range(5)]
    runs = [_run(tmp_path / f"fold{k}", "reference", v) for k, v in enumerate(values)]
    return runs, values


def test_table_is_mean_and_population_std_of_fold_means(five_folds, tmp_path):
    runs, values = five_folds
    out = summarize_folds(runs, tmp_path / "table")
    table = json.loads((out / "table.json").read_text())
    assert table["protocol"] == "reference" and table["n_folds"] == 5
    for dataset, metric, key in (("Brats21", "dice", "Brats21_dice"), ("Brats21", "auprc", "Brats21_auprc"),
                                 ("MSLUB", "dice", "MSLUB_dice"), ("MSLUB", "auprc", "MSLUB_auprc"),
                                 ("IXI", "l1", "l1")):
        folds = np.array([v[key] for v in values])
        entry = table[dataset][metric]
        assert entry["folds"] == pytest.approx(list(folds))
        assert entry["mean"] == pytest.approx(np.mean(folds)) and entry["std"] == pytest.approx(np.std(folds, ddof=0))
        assert entry["std"] != pytest.approx(np.std(folds, ddof=1))
    assert table["Brats21"]["dice"]["published"] == {"mean": 53.37, "std": 1.80}
    markdown = (out / "table.md").read_text()
    mean, std = 100 * np.mean([v["Brats21_dice"] for v in values]), 100 * np.std([v["Brats21_dice"] for v in values])
    assert f"| BraTS21 Dice (%) | {mean:.2f} ± {std:.2f} | 53.37 ± 1.80 |" in markdown
    assert "fold 4" in markdown and "protocol `reference`" in markdown


def test_table_refuses_mixed_protocols_and_missing_runs(five_folds, tmp_path):
    runs, values = five_folds
    other = _run(tmp_path / "project_fold", "project", values[0])
    with pytest.raises(ValueError, match="different protocols"):
        fold_table([*runs[:2], other])
    with pytest.raises(FileNotFoundError, match="score output folder"):
        fold_table([tmp_path / "nowhere"])


def test_command_line_takes_a_list_of_unquoted_paths(five_folds, tmp_path):
    runs, values = five_folds
    out = tmp_path / "cli"
    result = subprocess.run([sys.executable, "-m", "custom_components", "summarize_folds",
                             "--runs", "[" + ",".join(str(r) for r in runs[:2]) + "]", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    table = json.loads((out / "table.json").read_text())
    assert table["n_folds"] == 2
    assert table["MSLUB"]["auprc"]["mean"] == pytest.approx(np.mean([v["MSLUB_auprc"] for v in values[:2]]))
    assert "MSLUB AUPRC (%)" in result.stdout
