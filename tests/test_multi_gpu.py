"""The multi_gpu_train.yaml configs under torchrun: one demo epoch with 2 processes on CPU (gloo backend).

Only rank 0 may write checkpoints and the metric / progress logs. Every ``torch.save`` call is traced per rank
(a ``sitecustomize`` module on the processes' path records rank and target), and torchrun keeps each rank's
stdout and stderr in its own file, so both claims are checked per process rather than on merged output.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

from custom_components.networks.backbone import resnet_backbone
from custom_components.networks.diffusion_unet import ConditionalDDPM
from tests.conftest import REPO

# fold 0 of the tiny demo root has a single validation volume, fewer than the 2 processes: the validation
# sampler then pads, so both processes still validate. Batches of one volume
# (2 slices) give each process 3 iterations: DistributedDataParallel only fails on a parameter without gradient
# at the iteration after the one that left it out.
TINY = ["--fold", "0", "--epochs", "1", "--num_workers", "0", "--slices_per_volume", "2", "--batch_size", "2",
        "--val_interval", "1"]

SAVE_TRACER = '''
import os
if os.environ.get("SAVE_TRACE"):
    import torch

    _save = torch.save

    def _traced_save(obj, f, *args, **kwargs):
        with open(os.environ["SAVE_TRACE"], "a") as log:
            target = os.path.abspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "?")
            log.write(f"{os.environ.get('RANK', '-')}\\t{target}\\n")
        return _save(obj, f, *args, **kwargs)

    torch.save = _traced_save
'''


def run_torchrun(bundle: str, configs: list[str], tmp_path: Path, *args: str, nproc: int = 2, timeout: int = 600):
    """``torchrun --standalone --nnodes=1 --nproc_per_node=N -m monai.bundle run ...`` from the repository root.

    Returns (per-rank {"stdout", "stderr"} texts, list of (rank, path) of every ``torch.save`` to a file).
    """
    tracer_dir, log_dir, trace = tmp_path / "tracer", tmp_path / "torchrun_logs", tmp_path / "saves.tsv"
    tracer_dir.mkdir()
    (tracer_dir / "sitecustomize.py").write_text(SAVE_TRACER)
    config_file = "[" + ",".join(f"'bundles/{bundle}/configs/{c}'" for c in configs) + "]"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc_per_node={nproc}", "--log-dir", str(log_dir), "--redirects", "3",
               "-m", "monai.bundle", "run", "--config_file", config_file, "--bundle_root", f"bundles/{bundle}", *args]
    # CPU processes (gloo) even where GPUs are visible: the test is about the process group, not the device
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tracer_dir), str(REPO)]), "SAVE_TRACE": str(trace),
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    logs = {}
    for rank in range(nproc):
        files = {p.stem: p for p in log_dir.glob(f"*/attempt_*/{rank}/std*.log")}
        logs[rank] = {k: files[k].read_text(errors="replace") if k in files else "" for k in ("stdout", "stderr")}
    if result.returncode != 0:
        ranks = "\n".join(f"--- rank {r} ---\n{v['stdout'][-2000:]}\n{v['stderr'][-4000:]}" for r, v in logs.items())
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}\n{ranks}")
    saves = [line.split("\t") for line in trace.read_text().splitlines()] if trace.is_file() else []
    return logs, [(rank, Path(name)) for rank, name in saves]


def check_rank_zero_only(logs: dict, saves: list, out: Path) -> None:
    """Checkpoints and metric logs from rank 0 alone, one epoch checkpoint and model.pt, rank 1 silent on errors."""
    # both ranks may fill the preprocessing cache; the output folder is rank 0's alone
    saves = [(rank, path.name) for rank, path in saves if path.parent == out]
    assert {rank for rank, _ in saves} == {"0"}, saves
    assert sorted(name for _, name in saves) == ["checkpoint_epoch=1.pt", "model.pt"], saves
    # (with --tracking, MONAI's workflow writes the executed config_<time>.json on every rank before training)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("config_")) == \
        ["checkpoint_epoch=1.pt", "model.pt"]

    rank0, rank1 = (logs[r]["stdout"] + logs[r]["stderr"] for r in (0, 1))
    for line in ("Epoch[1] Metrics -- val_loss", "Key metric: val_loss best value"):
        assert rank0.count(line) == 1, (line, rank0[-3000:])
        assert line not in rank1, (line, rank1[-3000:])
    assert "Iteration:" in rank0 and "Iteration:" not in rank1  # progress bar on rank 0 only
    # rank 1 trained and validated too, without errors
    assert "SupervisedTrainer - INFO - Engine run finished" in rank1
    for marker in ("Traceback", " - ERROR - ", "Error:"):
        assert marker not in rank1 and marker not in rank0, (marker, rank1[-3000:])


def test_encoder_two_processes(demo_root, cache_dir, tmp_path):
    out = tmp_path / "enc"
    logs, saves = run_torchrun("contrastive_encoder", ["common.yaml", "train.yaml", "demo.yaml", "multi_gpu_train.yaml"],
                               tmp_path,
                               "--dataset_dir", str(demo_root), "--cache_dir", str(cache_dir),
                               "--output_dir", str(out), "--depth", "18", *TINY)
    check_rank_zero_only(logs, saves, out)
    # the artefacts hold the bare network, not the DistributedDataParallel wrapper ("module." keys)
    resnet_backbone(18).load_state_dict(torch.load(out / "model.pt", weights_only=True))
    state = torch.load(out / "checkpoint_epoch=1.pt", weights_only=True)
    assert state["trainer"]["iteration"] == state["trainer"]["epoch_length"] >= 2  # one epoch, several steps
    assert not any(k.startswith("module.") for k in state["network"])


def test_cond_ddpm_two_processes(demo_root, cache_dir, tmp_path):
    out = tmp_path / "ddpm"
    logs, saves = run_torchrun("cond_ddpm", ["common.yaml", "train.yaml", "demo.yaml", "multi_gpu_train.yaml"],
                               tmp_path,
                               "--dataset_dir", str(demo_root), "--cache_dir", str(cache_dir),
                               "--output_dir", str(out), "--channels", "[8,16,16]", "--encoder_depth", "18", *TINY,
                               "--tracking", "mlflow", "--tracking_uri", f"sqlite:///{tmp_path / 'mlruns.db'}")
    check_rank_zero_only(logs, saves, out)
    # MLflow: one run, written by rank 0 alone (one validation loss, the settings, the best checkpoint)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 1
    assert run.data.params["channels"] == "[8, 16, 16]"
    assert "model.pt" in {a.path for a in client.list_artifacts(run.info.run_id)}
    model = ConditionalDDPM(channels=(8, 16, 16), num_res_blocks=1, encoder_depth=18, pixel_unshuffle=2)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    state = torch.load(out / "checkpoint_epoch=1.pt", weights_only=True)
    assert state["trainer"]["iteration"] == state["trainer"]["epoch_length"] >= 2  # one epoch, several steps
    assert not any(k.startswith("module.") for k in state["network"])
