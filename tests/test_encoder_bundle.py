"""The contrastive_encoder bundle run as users run it: demo training, resume, inference, MONAI properties."""

import re

import pytest
import torch
from monai.bundle import ConfigWorkflow

from custom_components.networks.backbone import resnet_backbone
from tests.conftest import REPO, run_bundle

BUNDLE = "contrastive_encoder"
DEMO = ["common.yaml", "train.yaml", "demo.yaml"]
SMALL = ["--epochs", "1", "--batch_size", "8", "--slices_per_volume", "2", "--num_workers", "0", "--val_interval", "1",
         "--depth", "18"]


def test_train_writes_model_then_resumes(demo_root, cache_dir, tmp_path):
    out = tmp_path / "enc"
    common = ["--dataset_dir", str(demo_root), "--cache_dir", str(cache_dir), "--output_dir", str(out)]
    first = run_bundle(DEMO, BUNDLE, *common, *SMALL)
    assert (out / "checkpoint_epoch=1.pt").is_file() and (out / "model.pt").is_file()
    assert "Resumed" not in first.stdout + first.stderr
    # the artefact cond_ddpm loads: the plain backbone's state dict, safe to load with weights_only
    state = torch.load(out / "model.pt", weights_only=True)
    resnet_backbone(18).load_state_dict(state)

    # an interrupted run (here: one that stopped after epoch 1) continues at epoch 2 when started again
    second = run_bundle(DEMO, BUNDLE, *common, *SMALL[2:], "--epochs", "2")
    log = second.stdout + second.stderr
    assert re.search(r"Resumed from .*checkpoint_epoch=1\.pt at epoch 1", log)
    assert "Epoch[1]" not in log and "Epoch[2] Metrics -- val_loss" in log
    assert (out / "checkpoint_epoch=2.pt").is_file() and not (out / "checkpoint_epoch=1.pt").exists()


def test_missing_dataset_or_fold_gives_clear_error(demo_root, tmp_path):
    with pytest.raises(AssertionError, match=r"dataset_dir .*nowhere does not exist"):
        run_bundle(DEMO, BUNDLE, "--dataset_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path))
    with pytest.raises(AssertionError, match=r"No split file .*IXI_(train|val)_fold7\.csv"):
        run_bundle(DEMO, BUNDLE, "--dataset_dir", str(demo_root), "--fold", "7", "--output_dir", str(tmp_path))


@pytest.mark.parametrize("config, workflow_type", [("train.yaml", "train"), ("inference.yaml", "infer")])
def test_bundle_properties(config, workflow_type, demo_root, cache_dir):
    configs = REPO / "bundles" / BUNDLE / "configs"
    workflow = ConfigWorkflow(config_file=[str(configs / "common.yaml"), str(configs / config)], meta_file=str(configs / "metadata.json"),
                              logging_file=str(configs / "logging.conf"), workflow_type=workflow_type,
                              bundle_root=str(REPO / "bundles" / BUNDLE), dataset_dir=str(demo_root),
                              cache_dir=str(cache_dir))
    workflow.initialize()
    assert workflow.check_properties() == []
