"""reproduce: the per-fold plan of bundle commands, skipping and resuming, and a whole tiny run on demo data."""

import ast
import json
import os
import subprocess
import sys

import pytest

from custom_components import reproduce as R
from custom_components.demo import DemoError
from tests.conftest import REPO
from tests.test_demo import FakeRunner, _args


def _data_root(tmp_path):
    root = tmp_path / "data"
    (root / "splits").mkdir(parents=True)
    (root / "NOVA").mkdir()
    (root / "NOVA" / "metadata.csv").write_text("filename,caption,case_id,bbox_gold\n")
    return root


def test_plan_per_fold_then_nova_with_one_fold_then_the_tables(tmp_path):
    stages = R.plan(_data_root(tmp_path), tmp_path / "w", folds="0,3", size="tiny", protocol="reference", seed=2)
    names = [s.name for s in stages]
    assert names == ["encoder_0", "cond_ddpm_0", "maps_0", "score_0_reference", "score_0_project",
                     "encoder_3", "cond_ddpm_3", "maps_3", "score_3_reference", "score_3_project",
                     "nova_predict_reference", "nova_metrics_reference", "nova_predict_project",
                     "nova_metrics_project", "table_reference", "table_project"]
    by_name = {s.name: _args(s.command) for s in stages}
    for k in (0, 3):
        assert by_name[f"encoder_{k}"]["fold"] == by_name[f"cond_ddpm_{k}"]["fold"] == by_name[f"maps_{k}"]["fold"] == str(k)
        assert by_name[f"cond_ddpm_{k}"]["encoder_ckpt"] == by_name[f"encoder_{k}"]["output_dir"] + "/model.pt"
        assert by_name[f"maps_{k}"]["ckpt_path"] == by_name[f"cond_ddpm_{k}"]["output_dir"] + "/model.pt"
        for p in ("reference", "project"):
            score = by_name[f"score_{k}_{p}"]
            assert score["maps_dir"] == by_name[f"maps_{k}"]["output_dir"] and score["protocol"] == p
        # training follows --protocol; every config file exists
        assert by_name[f"cond_ddpm_{k}"]["protocol"] == by_name[f"encoder_{k}"]["protocol"] == "reference"
    for stage in stages[:-2]:
        args = _args(stage.command)
        files = ast.literal_eval(args["config_file"]) if args["config_file"].startswith("[") else [args["config_file"]]
        assert all((REPO / f).is_file() for f in files)
        assert args["experiment_name"] == "reproduce" and args["run_name"] == stage.name
    # the published NOVA model is fold 3's
    for p in ("reference", "project"):
        nova = by_name[f"nova_predict_{p}"]
        assert nova["ckpt_path"] == by_name["cond_ddpm_3"]["output_dir"] + "/model.pt" and nova["protocol"] == p
        assert nova["fold"] == "3" and nova["cache_dir"] == by_name["maps_3"]["cache_dir"]  # healthy calibration
    table = stages[-2].command
    assert table[1:4] == ["-m", "custom_components", "summarize_folds"]
    assert _args(table)["runs"] == f"[{tmp_path}/w/fold0/score_reference,{tmp_path}/w/fold3/score_reference]"


def test_plan_checks_its_arguments(tmp_path):
    root = _data_root(tmp_path)
    with pytest.raises(DemoError, match="--nova_fold 2 is not among the trained folds"):
        R.plan(root, tmp_path / "w", folds="0,1", nova_fold=2)
    with pytest.raises(DemoError, match="distinct folds among 0-4"):
        R.plan(root, tmp_path / "w", folds="0,7")
    with pytest.raises(DemoError, match="--protocol must be one of"):
        R.plan(root, tmp_path / "w", protocol="paper")
    with pytest.raises(DemoError, match="no splits/ folder"):
        R.plan(tmp_path / "nowhere", tmp_path / "w")
    # paper size: five folds, nova from fold 3; tiny: two folds, nova from the last
    assert [s.name for s in R.plan(root, tmp_path / "w")].count("maps_4") == 1
    tiny = {s.name: _args(s.command) for s in R.plan(root, tmp_path / "w", size="tiny")}
    assert "maps_2" not in tiny and "fold1" in tiny["nova_predict_reference"]["ckpt_path"]


def test_finished_stages_are_skipped_and_a_new_protocol_needs_force(tmp_path):
    root, work = _data_root(tmp_path), tmp_path / "w"

    def fake(stage, log_file, verbose):  # also the table, which reproduce prints at the end
        FakeRunner()(stage, log_file, verbose)

    R.reproduce(root, work, folds="0", size="tiny", runner=fake)
    again = FakeRunner()
    R.reproduce(root, work, folds="0", size="tiny", runner=again)
    assert again.calls == []
    with pytest.raises(DemoError, match="--force"):
        R.reproduce(root, work, folds="0", size="tiny", protocol="project", runner=FakeRunner())


@pytest.mark.slow
def test_tiny_reproduction_on_demo_data_writes_the_table(demo_root, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    work = tmp_path / "w"
    result = subprocess.run([sys.executable, "-m", "custom_components", "reproduce", "--data_root", str(demo_root),
                             "--workdir", str(work), "--size", "tiny"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=3000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    for protocol in ("reference", "project"):
        table = json.loads((work / "table" / protocol / "table.json").read_text())
        assert table["protocol"] == protocol and table["n_folds"] == 2
        for dataset, metric in (("Brats21", "dice"), ("MSLUB", "auprc"), ("IXI", "l1")):
            entry = table[dataset][metric]
            assert len(entry["folds"]) == 2 and all(0 <= v <= 1 for v in entry["folds"])
        markdown = (work / "table" / protocol / "table.md").read_text()
        assert "53.37 ± 1.80" in markdown and "fold 1" in markdown
    for protocol in ("reference", "project"):
        assert json.loads((work / "nova" / protocol / "metrics.json").read_text())["reference"]["GT@30"] > 0
    assert "BraTS21 Dice (%)" in result.stdout
    rerun = subprocess.run([sys.executable, "-m", "custom_components", "reproduce", "--data_root", str(demo_root),
                            "--workdir", str(work), "--size", "tiny"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
    assert rerun.returncode == 0 and "finished in" not in rerun.stdout
