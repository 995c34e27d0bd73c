"""The one-command demo: its plan (bundle commands), skipping / resuming / forcing stages, and a
whole tiny run with its summary, report and MLflow store."""

import ast
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from custom_components import demo as D

REPO = Path(__file__).resolve().parents[1]
STAGES = ["data", "encoder", "cond_ddpm", "maps", "score_model", "score_baseline", "nova_predict", "nova_metrics",
          "nova_predict_project", "nova_metrics_project"]


def _args(command: list[str]) -> dict[str, str]:
    """The ``--key value`` pairs of a command."""
    pairs = {}
    for i, item in enumerate(command):
        if item.startswith("--"):
            key, _, value = item[2:].partition("=")
            pairs[key] = value if _ else command[i + 1]
    return pairs


def test_every_model_stage_is_a_bundle_run_with_tracking(tmp_path):
    stages = D.plan(tmp_path / "w", size="tiny", seed=3)
    assert [s.name for s in stages] == STAGES
    assert stages[0].command[1:4] == ["-m", "custom_components", "demo_data"]
    channels = set()
    for stage in stages[1:]:
        assert stage.command[1:4] == ["-m", "monai.bundle", "run"]
        # the printed command, pasted into a shell, is the command that runs
        assert shlex.split(D._display(stage.command)) == ["python", *stage.command[1:]]
        args = _args(stage.command)
        files = args["config_file"]
        files = ast.literal_eval(files) if files.startswith("[") else [files]
        for f in files:  # the configs a user would name, relative to the repository root
            assert (REPO / f).is_file(), f
            assert f.startswith(args["bundle_root"] + "/configs/")
        assert args["tracking"] == "mlflow" and args["run_name"] == stage.name
        assert args["experiment_name"] == "demo"
        assert args["tracking_uri"] == f"sqlite:///{tmp_path / 'w' / 'mlruns.db'}"
        if "channels" in args:
            channels.add(args["channels"])
        if stage.name in ("encoder", "cond_ddpm", "maps", "nova_predict", "nova_predict_project"):
            assert args["seed"] == "3"
    by_name = {s.name: _args(s.command) for s in stages}
    # one network shape for training, evaluation and NOVA inference; one shared preprocessing cache
    assert channels == {"[8,16,16]"} and "channels" in by_name["nova_predict"] and "channels" in by_name["maps"]
    assert {by_name[n]["cache_dir"] for n in ("encoder", "cond_ddpm", "maps")} == {str(tmp_path / "w" / "cache")}
    assert by_name["cond_ddpm"]["encoder_ckpt"] == by_name["encoder"]["output_dir"] + "/model.pt"
    assert by_name["maps"]["ckpt_path"] == by_name["cond_ddpm"]["output_dir"] + "/model.pt"
    # model and intensity baseline are two scores of the same maps: no network in either
    assert by_name["score_model"]["maps_dir"] == by_name["score_baseline"]["maps_dir"] == by_name["maps"]["output_dir"]
    assert by_name["score_model"]["baseline"] == "false" and by_name["score_baseline"]["baseline"] == "true"
    assert "ckpt_path" not in by_name["score_model"] and "ckpt_path" not in by_name["score_baseline"]
    assert by_name["nova_metrics"]["predictions_file"] == by_name["nova_predict"]["predictions_file"]
    # NOVA under both protocols from the same model; the project one calibrates on the shared cache
    assert by_name["nova_predict"]["protocol"] == "reference" and by_name["nova_predict_project"]["protocol"] == "project"
    assert by_name["nova_predict_project"]["ckpt_path"] == by_name["nova_predict"]["ckpt_path"]
    assert by_name["nova_predict_project"]["cache_dir"] == by_name["maps"]["cache_dir"]


class FakeRunner:
    """Stands in for the stage commands: writes each stage's outputs; can fail at a chosen stage after
    leaving a partial file behind, as an interrupted training run leaves its epoch checkpoint."""

    def __init__(self, interrupt_at: str | None = None):
        self.calls, self.interrupt_at, self.seen_partial = [], interrupt_at, {}

    def __call__(self, stage, log_file, verbose):
        self.calls.append(stage.name)
        partial = stage.folder / "checkpoint_epoch=1.pt"
        self.seen_partial[stage.name] = partial.exists()
        if stage.name == self.interrupt_at:
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text("partial")
            time.sleep(0.3)  # the interrupted attempt's time still counts in the stage's seconds
            raise KeyboardInterrupt
        for path in stage.outputs:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(stage.name)


def test_done_stages_are_skipped_interrupted_ones_resume_force_reruns(tmp_path):
    work = tmp_path / "w"
    first = FakeRunner()
    D.run_demo(work, size="tiny", runner=first, report=False)
    assert first.calls == STAGES

    again = FakeRunner()
    D.run_demo(work, size="tiny", runner=again, report=False)
    assert again.calls == []

    # a stage whose output went missing runs again, and so does everything after it
    (work / "eval" / "baseline" / "metrics.json").unlink()
    partial = FakeRunner()
    D.run_demo(work, size="tiny", runner=partial, report=False)
    assert partial.calls == STAGES[5:]

    # interrupted during cond_ddpm training: the next run continues it from its checkpoint
    D.run_demo(work, size="tiny", runner=FakeRunner(), report=False, force=True)
    interrupted = FakeRunner(interrupt_at="cond_ddpm")
    (work / "encoder" / "keep.txt").write_text("x")
    with pytest.raises(KeyboardInterrupt):
        D.run_demo(work, size="tiny", runner=interrupted, report=False, force=True)
    assert interrupted.calls == ["data", "encoder", "cond_ddpm"]
    assert not (work / "encoder" / "keep.txt").exists()  # --force cleared the finished stage's folder
    resumed = FakeRunner()
    D.run_demo(work, size="tiny", runner=resumed, report=False)
    assert resumed.calls == STAGES[2:]
    assert resumed.seen_partial["cond_ddpm"]  # the checkpoint of the interrupted attempt was kept
    assert json.loads((work / D.STATE_FILE).read_text())["stages"]["cond_ddpm"]["seconds"] >= 0.3


def test_interrupted_stage_that_cannot_resume_starts_clean(tmp_path):
    work = tmp_path / "w"
    with pytest.raises(KeyboardInterrupt):
        D.run_demo(work, size="tiny", runner=FakeRunner(interrupt_at="maps"), report=False)
    runner = FakeRunner()
    D.run_demo(work, size="tiny", runner=runner, report=False)
    assert runner.calls == STAGES[3:] and runner.seen_partial["maps"] is False


def test_workdir_of_other_settings_or_not_a_demo_is_refused(tmp_path):
    work = tmp_path / "w"
    D.run_demo(work, size="tiny", runner=FakeRunner(), report=False)
    with pytest.raises(D.DemoError, match="--force"):
        D.run_demo(work, size="tiny", seed=1, runner=FakeRunner(), report=False)
    rerun = FakeRunner()
    D.run_demo(work, size="tiny", seed=1, force=True, runner=rerun, report=False)
    assert rerun.calls == STAGES

    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_text("")
    with pytest.raises(D.DemoError, match="not a work folder"):
        D.run_demo(other, size="tiny", force=True, runner=FakeRunner(), report=False)
    assert (other / "holiday.jpg").exists()
    with pytest.raises(D.DemoError, match="size must be one of"):
        D.plan(tmp_path / "x", size="huge")


# ------------------------------------------------------------------------------------------------------
# the real thing, at the tiny size
# ------------------------------------------------------------------------------------------------------
def _demo(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "custom_components", "demo", "--workdir", str(workdir),
                             "--size", "tiny", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _in_unit_range(value) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


@pytest.mark.demo
@pytest.mark.slow
def test_tiny_demo_runs_every_stage_and_reruns_nothing(tmp_path):
    work = tmp_path / "demo"
    first = _demo(work)
    for stage in STAGES:
        assert f"[{stage}] finished" in first.stdout

    summary = json.loads((work / "summary.json").read_text())
    assert summary["size"] == "tiny" and summary["seed"] == 0
    for dataset in ("Brats21", "MSLUB"):
        entry = summary["datasets"][dataset]
        assert entry["n_test_volumes"] >= 1
        for kind in ("model", "baseline"):
            for metric in ("dice", "auprc", "auroc"):
                assert _in_unit_range(entry[kind][metric]), (dataset, kind, metric, entry[kind][metric])
    for kind in ("model", "baseline"):
        thresholds = summary["datasets"]["IXI"][kind]["fpr_thresholds"]
        assert len(thresholds) == 3 and all(_in_unit_range(t) for t in thresholds.values())
        assert _in_unit_range(summary["datasets"]["IXI"][kind]["l1"])  # IXI_test reconstruction error
    for key in ("nova", "nova_project"):
        reference = summary[key]["reference"]
        assert all(_in_unit_range(float(reference[k])) for k in ("mAP@30", "mAP@50", "ACC@50"))
    timings = json.loads((work / "timings.json").read_text())
    assert set(timings["stages"]) == set(STAGES)
    assert all(s["seconds"] > 0 and s["cpu_seconds"] > 0 for s in timings["stages"].values())
    assert {"python", "torch", "monai"} <= set(summary["versions"])
    assert summary["networks"]["conditioning_encoder"] == "ResNet-10"  # the depth of the bundles' demo.yaml

    report = (work / "report.md").read_text()
    links = [line.split("](", 1)[1].split(")", 1)[0] for line in report.splitlines() if "![" in line]
    assert len(links) >= 5 and all((work / link).is_file() for link in links)
    assert "figures/training_curves.png" in links and any(link.startswith("nova/overlays/") for link in links)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("demo")
    runs = client.search_runs([experiment.experiment_id])
    names = sorted(r.info.run_name for r in runs)
    assert names == sorted(STAGES)  # one run per stage
    by_name = {r.info.run_name: r for r in runs}
    assert all(r.info.status == "FINISHED" for r in runs)
    for stage in ("encoder", "cond_ddpm"):
        assert {"train_loss", "val_loss"} <= set(by_name[stage].data.metrics)
        assert {"epochs", "batch_size", "learning_rate", "command", "stage_seconds"} <= set(by_name[stage].data.params)
        assert "model.pt" in {a.path for a in client.list_artifacts(by_name[stage].info.run_id)}  # best checkpoint
    for stage in ("score_model", "score_baseline"):
        assert {"Brats21/dice", "MSLUB/dice", "Brats21/auprc", "IXI/l1"} <= set(by_name[stage].data.metrics)
    assert by_name["score_model"].data.metrics["Brats21/dice"] == pytest.approx(
        summary["datasets"]["Brats21"]["model"]["dice"])
    assert {"mAP_30", "mAP_50"} <= set(by_name["nova_metrics"].data.metrics)
    assert "Brats21_grid.png" in {a.path for a in client.list_artifacts(by_name["score_model"].info.run_id)}
    assert "maps.json" in {a.path for a in client.list_artifacts(by_name["maps"].info.run_id)}

    model_time = (work / "cond_ddpm" / "model.pt").stat().st_mtime_ns
    second = _demo(work)
    for stage in STAGES:
        assert f"[{stage}] done earlier" in second.stdout and f"[{stage}] finished" not in second.stdout
    assert (work / "cond_ddpm" / "model.pt").stat().st_mtime_ns == model_time
    assert len(client.search_runs([experiment.experiment_id])) == len(STAGES)

    # the same seed on the same machine, in another folder: the same numbers, byte for byte
    _demo(tmp_path / "again")
    assert (tmp_path / "again" / "summary.json").read_text() == (work / "summary.json").read_text()


class ScoringRunner(FakeRunner):
    """Writes each stage's outputs; the score and NOVA stages write metrics that depend on the seed folder."""

    VALUES = {"seed0": (0.5, 0.25, 0.75), "seed1": (0.3, 0.2, 0.25)}  # model dice, baseline dice, NOVA mAP@30

    def __call__(self, stage, log_file, verbose):
        super().__call__(stage, log_file, verbose)
        model, baseline, nova = self.VALUES[log_file.parent.parent.name]
        for path in stage.outputs:
            if path.name == "metrics.json" and path.parent.parent.name == "eval":
                dice = model if path.parent.name == "model" else baseline
                path.write_text(json.dumps({"Brats21": {"test_split": "Brats21_test", "n_test_volumes": 2,
                                                        "metrics": {"dice": {"mean": dice}, "best_dice": dice + 0.1,
                                                                    "auprc": 0.1}}}))
            elif path.name == "metrics.json":
                path.write_text(json.dumps({"reference": {"mAP@30": nova if path.parent.name == "nova" else 1.0}}))


def test_several_seeds_give_mean_and_std_of_each_seeds_numbers(tmp_path):
    D.run_seeds(tmp_path / "w", [0, 1], size="tiny", runner=ScoringRunner())
    for seed in (0, 1):
        assert (tmp_path / "w" / f"seed{seed}" / "summary.json").is_file()
    metrics = json.loads((tmp_path / "w" / "seeds.json").read_text())["metrics"]
    dice = metrics["Brats21 dice (model)"]
    assert dice["per_seed"] == {"0": 0.5, "1": 0.3}
    assert dice["mean"] == pytest.approx(0.4) and dice["std"] == pytest.approx(0.1)  # population std
    assert metrics["Brats21 dice (baseline)"]["mean"] == pytest.approx(0.225)
    assert metrics["Brats21 best_dice (model)"]["mean"] == pytest.approx(0.5)  # beside the val-threshold Dice
    assert metrics["NOVA mAP@30 (reference)"]["std"] == pytest.approx(0.25)
    assert metrics["NOVA mAP@30 (project)"]["std"] == 0.0
    report = (tmp_path / "w" / "report.md").read_text()
    assert "| Brats21 dice (model) | 0.400 ± 0.100 | 0.500 | 0.300 |" in report
    assert "[seed 1](seed1/report.md)" in report
    with pytest.raises(D.DemoError, match="distinct"):
        D.run_seeds(tmp_path / "x", [1, 1], size="tiny", runner=ScoringRunner())


def test_stage_runs_its_command_in_a_process_of_its_own(tmp_path):
    log = tmp_path / "logs" / "stage.log"
    ok = D.Stage("ok", [sys.executable, "-m", "platform"], outputs=[], folder=tmp_path / "ok")
    cpu = D.run_stage(ok, log)
    import platform

    assert platform.platform() in log.read_text() and "$ python -m platform" in log.read_text()
    assert cpu > 0
    bad = D.Stage("bad", [sys.executable, "-m", "custom_components", "demo_data", "--out", str(tmp_path / "d"),
                          "--n_ixi=1"], outputs=[], folder=tmp_path / "d")
    with pytest.raises(D.DemoError, match=r"(?s)stage bad failed \(exit code 1\).*n_ixi must be at least"):
        D.run_stage(bad, log)
    missing = D.Stage("missing", [sys.executable, "-m", "platform"], outputs=[tmp_path / "never.json"],
                      folder=tmp_path / "m")
    with pytest.raises(D.DemoError, match="did not write"):
        D.run_stage(missing, log)
