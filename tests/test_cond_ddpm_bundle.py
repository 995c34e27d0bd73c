"""The cond_ddpm bundle's training run as users run it: demo profile, encoder checkpoint, resume, properties."""

import re

import pytest
import torch
from monai.bundle import ConfigWorkflow

from custom_components.networks.backbone import resnet_backbone
from custom_components.networks.diffusion_unet import ConditionalDDPM
from tests.conftest import REPO, run_bundle

BUNDLE = "cond_ddpm"
DEMO = ["common.yaml", "train.yaml", "demo.yaml"]
TINY = ["--channels", "[8,16,16]", "--slices_per_volume", "8", "--batch_size", "16", "--learning_rate", "0.002",
        "--num_workers", "0", "--val_interval", "1",
        "--encoder_depth", "18"]


def _val_losses(log: str) -> dict[int, float]:
    return {int(e): float(v) for e, v in re.findall(r"Epoch\[(\d+)\] Metrics -- val_loss: ([\d.]+)", log)}


def test_train_lowers_val_loss_and_resumes(demo_root, cache_dir, tmp_path):
    encoder = tmp_path / "encoder.pt"
    backbone = resnet_backbone(18)
    torch.save(backbone.state_dict(), encoder)
    out = tmp_path / "ddpm"
    common = ["--dataset_dir", str(demo_root), "--cache_dir", str(cache_dir), "--output_dir", str(out),
              "--encoder_ckpt", str(encoder), "--lr_schedule", "cosine", *TINY]
    first = run_bundle(DEMO, BUNDLE, *common, "--epochs", "2", "--tracking", "mlflow")
    assert (out / "checkpoint_epoch=2.pt").is_file() and (out / "model.pt").is_file()
    import mlflow  # --tracking mlflow: losses, settings and the best checkpoint in one run

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'mlruns.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {"train_loss", "val_loss"} <= set(run.data.metrics)
    assert run.data.params["learning_rate"] == "0.002" and run.data.params["encoder_ckpt"] == str(encoder)
    assert "model.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    losses = _val_losses(first.stdout + first.stderr)
    assert sorted(losses) == [1, 2]
    state = torch.load(out / "checkpoint_epoch=2.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine's end

    # started again with more epochs, it continues from epoch 2 instead of starting over
    second = run_bundle(DEMO, BUNDLE, *common, "--epochs", "3")
    log = second.stdout + second.stderr
    assert re.search(r"Resumed from .*checkpoint_epoch=2\.pt at epoch 2", log)
    losses.update(_val_losses(log))
    assert sorted(losses) == [1, 2, 3]
    assert losses[3] < losses[1], losses
    # the schedule resumed at its step count and followed the 3-epoch cosine down to 0
    state = torch.load(out / "checkpoint_epoch=3.pt", weights_only=False)
    assert state["lr_scheduler"]["last_epoch"] == state["trainer"]["iteration"] > 0
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.0, abs=1e-12)

    # model.pt is the whole conditional network, and its encoder started from the given backbone
    model = ConditionalDDPM(channels=(8, 16, 16), num_res_blocks=1, encoder_depth=18, pixel_unshuffle=2)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))


def test_bad_encoder_checkpoint_names_the_file(demo_root, tmp_path):
    bad = tmp_path / "not_an_encoder.pt"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(AssertionError, match="not_an_encoder.pt"):
        run_bundle(DEMO, BUNDLE, "--dataset_dir", str(demo_root), "--encoder_ckpt", str(bad),
                   "--output_dir", str(tmp_path / "out"))


def test_train_properties(demo_root, cache_dir):
    configs = REPO / "bundles" / BUNDLE / "configs"
    workflow = ConfigWorkflow(config_file=[str(configs / c) for c in DEMO], meta_file=str(configs / "metadata.json"),
                              logging_file=str(configs / "logging.conf"), workflow_type="train",
                              bundle_root=str(REPO / "bundles" / BUNDLE), dataset_dir=str(demo_root),
                              cache_dir=str(cache_dir))
    workflow.initialize()
    assert workflow.check_properties() == []
