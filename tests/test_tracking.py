"""What ``--tracking mlflow`` records beyond MONAI's default handler: params, best checkpoint, result files."""

import json

import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

from custom_components.engines import MetricsEngine, track
from custom_components.utils import mlflow_metric_name

mlflow = pytest.importorskip("mlflow")


def test_metric_names():
    assert mlflow_metric_name("mAP@50:95") == "mAP_50-95"
    assert mlflow_metric_name("fpr5%/dice") == "fpr5pct/dice"


def _tracked_run(tmp_path, params, artifacts=(), output_dir=None, run_name="run") -> str:
    """An engine with the handler ``--tracking mlflow`` appends (last, after the config's own), set up by ``track``."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    engine = Engine(lambda e, b: 0.0)
    tracker = MLFlowHandler(tracking_uri=uri, run_name=run_name, iteration_log=False, close_on_complete=True,
                            artifacts=str(tmp_path / "absent_config.json"))  # MONAI's path when it finds none
    for handler in track([tracker], params, artifacts, output_dir):
        handler.attach(engine)
    engine.run([0, 1], max_epochs=2)
    return uri


def test_track_logs_params_checkpoint_and_files(tmp_path):
    checkpoint = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, checkpoint)
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "config_20260101_000000.json").write_text("{}")
    uri = _tracked_run(tmp_path, {"learning_rate": 0.001, "channels": [8, 16]},
                       [checkpoint, tmp_path / "metrics.json", tmp_path / "absent.csv"], output_dir=tmp_path)
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["channels"] == "[8, 16]"
    assert run.data.params["max_epochs"] == "2"  # MONAI's own params are still there
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert files == {"model.pt", "metrics.json", "config_20260101_000000.json"}


def test_track_resumed_run_with_the_same_settings(tmp_path):
    _tracked_run(tmp_path, {"epochs": 2})
    uri = _tracked_run(tmp_path, {"epochs": 2, "extra": "x"})  # a run of that name that MLflow still has open
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.data.params["epochs"] for r in runs} == {"2"}


def test_track_without_tracking_changes_nothing():
    handlers = [object()]
    assert track(handlers, {"a": 1}, ["model.pt"]) is handlers


def test_metrics_engine_publishes_numbers_to_handlers(tmp_path):
    seen = {}

    class Spy:
        def attach(self, engine):
            engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.update(e.state.metrics))

    calls = []
    engine = MetricsEngine(lambda: calls.append(1) or {"reference": {"mAP@30": 0.5}, "per_image": {"x": 1}},
                           metrics_transform=lambda r: r["reference"], val_handlers=[Spy()])
    engine.run()
    assert calls == [1] and seen == {"mAP_30": 0.5}
    assert engine.state.output["per_image"] == {"x": 1}
    json.dumps(engine.state.output)  # the result itself stays as computed
