"""The paper's evaluation from data to table: ``python -m custom_components reproduce --data_root DATA --workdir W``.

Per fold: contrastive encoder -> cond_ddpm -> maps (``evaluate.yaml``) -> scores (``score.yaml``, under every
protocol of ``score_protocols``); then NOVA boxes and metrics with one fold's model (under the same protocols);
then the five-fold table
(``summarize_folds``) per protocol. Every stage is an ordinary command, printed and logged to ``W/logs``; finished
stages are skipped, interrupted trainings resume from their checkpoints, and all runs go to one MLflow store,
``W/mlruns.db`` (experiment ``reproduce``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from custom_components.demo import (PROFILES, DemoError, Stage, Tracker, _display, bundle_command,
                                    default_tracking_uri, open_workdir, run_stage, run_stages)
from custom_components.scoring import PROTOCOLS

EXPERIMENT = "reproduce"
STATE_FILE = "reproduce_state.json"
SIZES = ("paper", "tiny")  # tiny: the tiny demo profile's networks and epochs, two folds, for a few minutes on CPU
PAPER_NOVA_FOLD = 3  # the published NOVA numbers come from the fold-3 model


def _folds(folds, size: str) -> list[int]:
    if folds is None:
        return [0, 1] if size == "tiny" else [0, 1, 2, 3, 4]
    items = folds if isinstance(folds, (list, tuple)) else str(folds).split(",")
    out = [int(f) for f in items]
    if not out or len(set(out)) != len(out) or not all(0 <= f <= 4 for f in out):
        raise DemoError(f"--folds must list distinct folds among 0-4, got {folds!r}.")
    return out


def plan(data_root, workdir, folds=None, nova_fold: int | None = None, protocol: str = "reference",
         size: str = "paper", seed: int = 0, score_protocols=None, tracking_uri: str | None = None) -> list[Stage]:
    """The stages of ``reproduce``, in order, with their commands and done-marking outputs."""
    if size not in SIZES:
        raise DemoError(f"--size must be one of {SIZES}, got {size!r}.")
    if protocol not in PROTOCOLS:
        raise DemoError(f"--protocol must be one of {PROTOCOLS}, got {protocol!r}.")
    folds = _folds(folds, size)
    nova_fold = (PAPER_NOVA_FOLD if PAPER_NOVA_FOLD in folds else folds[-1]) if nova_fold is None else int(nova_fold)
    if nova_fold not in folds:
        raise DemoError(f"--nova_fold {nova_fold} is not among the trained folds {folds}.")
    scored = [protocol] + [p for p in (score_protocols or PROTOCOLS) if p != protocol]
    data, w = Path(data_root).absolute(), Path(workdir).absolute()
    if not (data / "splits").is_dir():
        raise DemoError(f"{data} holds no splits/ folder: --data_root must be a data root in the documented layout "
                        "(python -m custom_components check_data --data_root DIR checks one).")
    tiny = size == "tiny"
    extra = ["demo.yaml"] if tiny else []
    profile = PROFILES["tiny"] if tiny else {}  # the tiny demo profile's overrides; none at paper size
    uri = tracking_uri or default_tracking_uri(w)

    def ids(stage: str, **more) -> dict:
        return {**more, "tracking": "mlflow", "tracking_uri": uri, "experiment_name": EXPERIMENT, "run_name": stage}

    network = profile.get("network", {})
    common = {"dataset_dir": data, "cache_dir": w / "cache", "seed": seed, "protocol": protocol}
    stages: list[Stage] = []
    for k in folds:
        f = w / f"fold{k}"
        encoder, ddpm, maps = f / "encoder", f / "cond_ddpm", f / "maps"
        stages += [
            Stage(f"encoder_{k}", bundle_command("contrastive_encoder", ["common.yaml", "train.yaml", *extra], ids(
                f"encoder_{k}", **common, fold=k, output_dir=encoder, **profile.get("encoder", {}))),
                outputs=[encoder / "model.pt"], folder=encoder, resumable=True,
                description=f"fold {k}: target-invariant encoder on IXI_train_fold{k}"),
            Stage(f"cond_ddpm_{k}", bundle_command("cond_ddpm", ["common.yaml", "train.yaml", *extra], ids(
                f"cond_ddpm_{k}", **common, fold=k, output_dir=ddpm, encoder_ckpt=encoder / "model.pt", **network,
                **profile.get("cond_ddpm", {}))),
                outputs=[ddpm / "model.pt"], folder=ddpm, resumable=True,
                description=f"fold {k}: conditional DDPM conditioned on that encoder"),
            Stage(f"maps_{k}", bundle_command("cond_ddpm", ["common.yaml", "evaluate.yaml", *extra], ids(
                f"maps_{k}", **common, fold=k, output_dir=maps, ckpt_path=ddpm / "model.pt", **network,
                **profile.get("evaluate", {}))),
                outputs=[maps / "maps.json"], folder=maps,
                description=f"fold {k}: reconstructions and residuals of IXI, BraTS21 and MSLUB val and test"),
        ]
        for p in scored:
            out = f / f"score_{p}"
            stages.append(Stage(f"score_{k}_{p}", bundle_command("cond_ddpm", ["score.yaml"], ids(
                f"score_{k}_{p}", maps_dir=maps, output_dir=out, protocol=p, **profile.get("score", {}))),
                outputs=[out / "metrics.json"], folder=out, description=f"fold {k}: the maps scored, {p} protocol"))
    if (data / "NOVA" / "metadata.csv").is_file():
        ckpt = w / f"fold{nova_fold}" / "cond_ddpm" / "model.pt"
        for p in scored:  # the published recipe and this project's localisation, from the same model
            nova = w / "nova" / p
            stages += [
                Stage(f"nova_predict_{p}", bundle_command("nova_eval", ["common.yaml", "inference.yaml", *extra], ids(
                    f"nova_predict_{p}", dataset_dir=data, ckpt_path=ckpt, output_dir=nova, protocol=p, seed=seed,
                    fold=nova_fold, cache_dir=w / "cache", predictions_file=nova / "predictions.json", **network)),
                    outputs=[nova / "predictions.json"], folder=nova,
                    description=f"NOVA boxes from the fold-{nova_fold} model's residuals, {p} protocol"),
                Stage(f"nova_metrics_{p}", bundle_command("nova_eval", ["evaluate.yaml"], ids(
                    f"nova_metrics_{p}", dataset_dir=data, output_dir=nova, predictions_file=nova / "predictions.json",
                    metadata_file=data / "NOVA" / "metadata.csv", output_file=nova / "metrics.json")),
                    outputs=[nova / "metrics.json"], folder=nova / "metrics.json",
                    description=f"NOVA localisation metrics, {p} protocol"),
            ]
    for p in scored:
        out = w / "table" / p
        runs = "[" + ",".join(str(w / f"fold{k}" / f"score_{p}") for k in folds) + "]"
        stages.append(Stage(f"table_{p}", [sys.executable, "-m", "custom_components", "summarize_folds",
                                           "--runs", runs, "--out", str(out)],
                            outputs=[out / "table.md"], folder=out,
                            description=f"the {len(folds)}-fold table, {p} protocol"))
    return stages


def reproduce(data_root, workdir, folds=None, nova_fold: int | None = None, protocol: str = "reference",
              size: str = "paper", seed: int = 0, force: bool = False, verbose: bool = False,
              tracking_uri: str | None = None, runner=run_stage) -> Path:
    """Run every unfinished stage of ``plan`` in ``workdir``; returns the main table (``W/table/<protocol>/table.md``)."""
    workdir = Path(workdir).expanduser().absolute()
    stages = plan(data_root, workdir, folds, nova_fold, protocol, size, seed, tracking_uri=tracking_uri)
    settings = {"data_root": str(Path(data_root).absolute()), "folds": _folds(folds, size), "nova_fold": nova_fold,
                "protocol": protocol, "size": size, "seed": int(seed)}
    uri = tracking_uri or default_tracking_uri(workdir)
    print(f"Reproducing ({size}, folds {settings['folds']}, {protocol} protocol) in {workdir}; MLflow store {uri}")
    for stage in stages:
        print(f"  {stage.name}: {_display(stage.command)}")
    state = open_workdir(workdir, settings, force, STATE_FILE)
    run_stages(workdir, stages, state, force, verbose, runner, Tracker(uri, workdir, EXPERIMENT), STATE_FILE)
    table = workdir / "table" / protocol / "table.md"
    print("\n" + table.read_text())
    return table
