"""What ``--tracking mlflow`` records beyond MONAI's default handler: params, best checkpoint, result files."""

import json

import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

from custom_components.engines import MetricsEngine, MLflowRunDetails, flat_numbers
from custom_components.utils import mlflow_metric_name

mlflow = pytest.importorskip("mlflow")


def test_metric_names_and_flat_numbers():
    assert mlflow_metric_name("mAP@50:95") == "mAP_50-95"
    assert mlflow_metric_name("fpr5%/dice") == "fpr5pct/dice"
    nested = {"a": {"b": 1, "c": float("nan"), "d": True, "e": {"f": 2.5}}, "g": "text", "h": 3}
    assert flat_numbers(nested) == {"a/b": 1.0, "a/e/f": 2.5, "h": 3.0}


def _tracked_engine(tmp_path, details: MLflowRunDetails, run_name="run") -> tuple[Engine, str]:
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    engine = Engine(lambda e, b: 0.0)
    details.attach(engine)  # the config's handlers come first, MONAI appends its tracking handler
    MLFlowHandler(tracking_uri=uri, run_name=run_name, iteration_log=False, close_on_complete=True).attach(engine)
    return engine, uri


def test_run_details_params_checkpoint_and_files(tmp_path):
    checkpoint = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, checkpoint)
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "a_grid.png").write_bytes(b"png")
    (tmp_path / "config_20260101_000000.json").write_text("{}")
    details = MLflowRunDetails({"learning_rate": 0.001, "channels": [8, 16]}, checkpoint=checkpoint,
                               artifacts=[tmp_path / "metrics.json", str(tmp_path / "*_grid.png"),
                                          tmp_path / "absent.csv"], output_dir=tmp_path)
    engine, uri = _tracked_engine(tmp_path, details)
    engine.run([0, 1], max_epochs=2)

    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["channels"] == "[8, 16]"
    assert run.data.params["max_epochs"] == "2"  # MONAI's own params are still there
    assert run.data.tags["best_checkpoint"] == str(checkpoint)
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert files == {"checkpoint", "metrics.json", "a_grid.png", "config_20260101_000000.json"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/model.pt"]


def test_run_details_keeps_params_of_a_resumed_run(tmp_path):
    engine, uri = _tracked_engine(tmp_path, MLflowRunDetails({"epochs": 2}))
    engine.run([0], max_epochs=1)
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    client.set_terminated(run.info.run_id, "KILLED")  # an interrupted run is picked up again by name

    engine, _ = _tracked_engine(tmp_path, MLflowRunDetails({"epochs": 3, "extra": "x"}))
    engine.run([0], max_epochs=1)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].data.params["epochs"] == "2" and runs[0].data.params["extra"] == "x"


def test_run_details_without_tracking_does_nothing(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"x")
    engine = Engine(lambda e, b: 0.0)
    MLflowRunDetails({"a": 1}, checkpoint=checkpoint, artifacts=[checkpoint]).attach(engine)
    engine.run([0], max_epochs=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


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
