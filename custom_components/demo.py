"""The one-command demo: demo data -> encoder -> cond_ddpm -> evaluation (model and intensity baseline)
-> NOVA boxes and metrics, each stage run through its bundle config exactly as a user would run it by hand.

``python -m custom_components demo --workdir DIR [--force] [--seed 0] [--size default|tiny]``

Every stage is a command (printed before it runs, its output in ``DIR/logs/<stage>.log``) whose output file
marks it done; a done stage is skipped unless ``--force``, and an interrupted demo continues with the first
unfinished stage (training resumes from its own epoch checkpoints). All stages log to one MLflow experiment
in ``DIR/mlruns.db``. At the end ``DIR/summary.json`` and ``DIR/report.md`` are (re)written.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from custom_components.utils import write_json_atomic, write_text_atomic

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "demo"
STATE_FILE = "demo_state.json"

# ------------------------------------------------------------------------------------------------------
# The demo profiles. The default demo's network and training settings live in the bundles' ``demo.yaml``
# (which a user can merge by hand); a profile adds the data sizes and, for ``tiny``, overrides of those
# settings. Training is budgeted in epochs (each epoch draws ``slices_per_volume`` random axial slices per
# training volume), never in wall-clock time. ``network`` holds cond_ddpm's network ids, shared by training,
# evaluation and NOVA inference.
# ------------------------------------------------------------------------------------------------------
PROFILES: dict[str, dict] = {
    "default": {
        "data": {"n_ixi": 32, "n_brats": 12, "n_mslub": 10, "n_nova": 24},
        "encoder": {}, "network": {}, "cond_ddpm": {}, "evaluate": {}, "score": {}, "nova": {},
    },
    "tiny": {  # for tests: minutes on two cores, not meant to find lesions
        "data": {"n_ixi": 10, "n_brats": 4, "n_mslub": 4, "n_nova": 6},
        "encoder": {"epochs": 1, "batch_size": 8, "slices_per_volume": 2, "val_interval": 1},
        "network": {"channels": [8, 16, 16]},
        "cond_ddpm": {"epochs": 2, "batch_size": 16, "slices_per_volume": 8, "learning_rate": 0.002,
                      "val_interval": 1},
        "evaluate": {},
        "score": {"grid_slices": 3},
        "nova": {},
    },
}


# the config files training runs with in the paper setting and in the demo profile (demo.yaml merged on top)
TRAIN_CONFIGS = {"paper": ("common.yaml", "train.yaml"), "demo": ("common.yaml", "train.yaml", "demo.yaml")}


def network_settings(size: str) -> dict:
    """The networks a demo profile trains, read from the bundle configs it runs (plus the profile's overrides)."""
    encoder = bundle_config("contrastive_encoder", TRAIN_CONFIGS["demo"], **PROFILES[size]["encoder"])
    ddpm = bundle_config("cond_ddpm", TRAIN_CONFIGS["demo"], **PROFILES[size]["network"])
    paper = bundle_config("cond_ddpm", TRAIN_CONFIGS["paper"])
    return {
        "contrastive_encoder": f"ResNet-{encoder['depth']}",
        "conditioning_encoder": f"ResNet-{ddpm['encoder_depth']}",
        "unet": {k: ddpm[k] for k in ("channels", "num_res_blocks", "cond_dim", "pixel_unshuffle")},
        "note": "the demo profiles use lighter networks than the paper configs (train.yaml: "
                f"ResNet-{paper['encoder_depth']} encoders, U-Net channels {paper['channels']}, "
                f"{paper['num_res_blocks']} res blocks, no pixel unshuffle)",
    }


# metrics shown side by side in summary.json and report.md (means over the test volumes)
MAIN_METRICS = ("dice", "best_dice", "auprc", "auroc", "slice_auroc", "slice_auprc", "precision", "recall",
                "specificity", "fpr", "hausdorff", "l1")
BEST_DICE_NOTE = ("best_dice: each test volume at its own Dice-optimal threshold, what the maps allow whatever "
                  "threshold is chosen.")
NOVA_METRICS = ("mAP@30", "mAP@50", "mAP@50:95", "ACC@50", "TP@30", "FP@30", "GT@30")


class DemoError(RuntimeError):
    """A stage that failed or a work folder that cannot be used, with what to do about it."""


@dataclass
class Stage:
    """One step of the demo: a command run from the repository root and the files that mark it done."""

    name: str
    command: list[str]
    outputs: list[Path]  # all present (and the stage recorded as finished) = done
    folder: Path  # cleared before a fresh start (``--force``, or an earlier stage ran again)
    description: str = ""
    resumable: bool = False  # an interrupted run continues from its own checkpoints (training)


# ------------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------------
def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _cli_value(value) -> str:
    """A config override as ``python -m monai.bundle run`` parses it (lists as ``[8,16,16]``)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_cli_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _overrides(pairs: dict) -> list[str]:
    return [item for key, value in pairs.items() for item in (f"--{key}", _cli_value(value))]


def bundle_command(bundle: str, configs: list[str], overrides: dict) -> list[str]:
    """``python -m monai.bundle run`` for merged ``configs`` of ``bundles/<bundle>``, from the repository root."""
    files = [f"bundles/{bundle}/configs/{c}" for c in configs]
    config_file = files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file,
            "--bundle_root", f"bundles/{bundle}", *_overrides(overrides)]


def bundle_config(bundle: str, configs=("common.yaml",), **overrides):
    """``bundles/<bundle>/configs/<configs>`` merged and parsed as ``monai.bundle run`` would, with ``overrides``
    as ids: for scripts that reuse a bundle's objects (its preprocessing list, its training transforms)."""
    from monai.bundle import ConfigParser

    folder = REPO / "bundles" / bundle
    parser = ConfigParser()
    parser.read_config([str(folder / "configs" / name) for name in configs])
    parser.update({"bundle_root": str(folder), **overrides})
    return parser


def _quote(arg: str) -> str:
    """Shell quoting that keeps ``"['a.yaml','b.yaml']"`` readable."""
    if shlex.quote(arg) == arg:
        return arg
    if not any(c in arg for c in '"$`\\!'):
        return f'"{arg}"'
    return shlex.quote(arg)


def _display(command: list[str]) -> str:
    """The command as a user would type it in a shell at the repository root."""
    return " ".join(_quote("python" if c == sys.executable else c) for c in command)


# ------------------------------------------------------------------------------------------------------
# the plan
# ------------------------------------------------------------------------------------------------------
def plan(workdir, size: str = "default", seed: int = 0, tracking_uri: str | None = None) -> list[Stage]:
    """The demo's stages for ``workdir``, in order, with their commands and done-marking outputs."""
    if size not in PROFILES:
        raise DemoError(f"size must be one of {sorted(PROFILES)}, got {size!r}.")
    profile, w = PROFILES[size], Path(workdir).absolute()
    data, cache = w / "data", w / "cache"
    tracking_uri = tracking_uri or default_tracking_uri(w)

    def tracking(stage: str) -> dict:
        return {"tracking": "mlflow", "tracking_uri": tracking_uri, "experiment_name": EXPERIMENT, "run_name": stage}

    common = {"dataset_dir": data, "cache_dir": cache, "seed": seed}
    ddpm = w / "cond_ddpm" / "model.pt"
    data_args = [f"--{k}={v}" for k, v in profile["data"].items()]
    stages = [
        Stage("data", [sys.executable, "-m", "custom_components", "demo_data", "--out", str(data),
                       f"--seed={seed}", *data_args],
              outputs=[data / "demo_data.json"], folder=data,
              description="synthetic IXI / BraTS21 / MSLUB volumes and NOVA images in the real layout"),
        Stage("encoder", bundle_command("contrastive_encoder", TRAIN_CONFIGS["demo"], {
                  **common, "output_dir": w / "encoder", **profile["encoder"], **tracking("encoder")}),
              outputs=[w / "encoder" / "model.pt"], folder=w / "encoder",
              description="target-invariant contrastive encoder pretraining on healthy IXI slices", resumable=True),
        Stage("cond_ddpm", bundle_command("cond_ddpm", TRAIN_CONFIGS["demo"], {
                  **common, "output_dir": w / "cond_ddpm", "encoder_ckpt": w / "encoder" / "model.pt",
                  **profile["network"], **profile["cond_ddpm"], **tracking("cond_ddpm")}),
              outputs=[ddpm], folder=w / "cond_ddpm",
              description="conditional DDPM trained on healthy IXI slices, conditioned on the encoder", resumable=True),
    ]
    maps = w / "eval" / "maps"
    stages.append(Stage("maps", bundle_command("cond_ddpm", ["common.yaml", "evaluate.yaml", "demo.yaml"], {
        **common, "output_dir": maps, "ckpt_path": ddpm, **profile["network"], **profile["evaluate"],
        **tracking("maps")}), outputs=[maps / "maps.json"], folder=maps,
        description="reconstructions and residual maps of the IXI, BraTS-like and MSLUB-like val and test splits"))
    for stage, baseline in (("score_model", False), ("score_baseline", True)):
        out = w / "eval" / stage.split("_")[1]
        stages.append(Stage(stage, bundle_command("cond_ddpm", ["score.yaml"], {
            "maps_dir": maps, "output_dir": out, "baseline": baseline, **profile["score"], **tracking(stage)}),
            outputs=[out / "metrics.json"], folder=out,
            description=("the model's residual maps" if not baseline else "the intensity baseline")
            + " scored: thresholds from the val splits and healthy IXI, metrics on the test splits"))
    for suffix, protocol in (("", "reference"), ("_project", "project")):  # the published recipe, then ours
        nova = w / f"nova{suffix}"
        stages += [
            Stage(f"nova_predict{suffix}", bundle_command("nova_eval", ["common.yaml", "inference.yaml", "demo.yaml"], {
                      "dataset_dir": data, "ckpt_path": ddpm, "output_dir": nova, "protocol": protocol,
                      "cache_dir": cache, "fold": 0, "predictions_file": nova / "predictions.json",
                      "save_overlays": True, "seed": seed, **profile["network"], **profile["nova"],
                      **tracking(f"nova_predict{suffix}")}),
                  outputs=[nova / "predictions.json"], folder=nova,
                  description=f"anomaly boxes on the NOVA-like images from the model's residuals, {protocol} protocol"),
            Stage(f"nova_metrics{suffix}", bundle_command("nova_eval", ["evaluate.yaml"], {
                      "dataset_dir": data, "output_dir": nova, "predictions_file": nova / "predictions.json",
                      "metadata_file": data / "NOVA" / "metadata.csv", "output_file": nova / "metrics.json",
                      **tracking(f"nova_metrics{suffix}")}),
                  outputs=[nova / "metrics.json"], folder=nova / "metrics.json",
                  description=f"NOVA localisation metrics of the {protocol}-protocol boxes"),
        ]
    return stages


def default_tracking_uri(workdir) -> str:
    return "sqlite:///" + str(Path(workdir).absolute() / "mlruns.db")


# ------------------------------------------------------------------------------------------------------
# running
# ------------------------------------------------------------------------------------------------------
# The stages' commands run in processes forked from a server that has imported torch, MONAI, ignite and MLflow
# once (multiprocessing's forkserver): each stage skips those imports, several CPU-seconds apiece, and is still
# exactly its printed command (``runpy`` runs the same module with the same arguments) in a process of its own.
PRELOAD = ["torch", "monai", "monai.bundle", "ignite.engine", "mlflow", "custom_components.data",
           "custom_components.networks.diffusion_unet"]
_SERVER = None


def _stage_server():
    global _SERVER
    if _SERVER is None:
        import multiprocessing

        _SERVER = multiprocessing.get_context("forkserver")
        _SERVER.set_forkserver_preload(PRELOAD)
    return _SERVER


def _run_command(command: list[str], log_file: str, cpu) -> None:
    """Stage process: ``python -m <module> <args>`` of ``command``, run in place, output appended to ``log_file``;
    sends its CPU seconds (its own and its children's) through ``cpu`` at the end, whatever the outcome."""
    import io
    import runpy

    fd = os.open(log_file, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", 0), write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", 0), write_through=True)
    os.chdir(REPO)
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # it would take priority over the demo's --tracking_uri
    sys.path.insert(0, str(REPO))
    sys.argv = [command[2], *command[3:]]
    try:
        runpy.run_module(command[2], run_name="__main__", alter_sys=True)
    finally:
        usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
        cpu.send(sum(u.ru_utime + u.ru_stime for u in usage))


def _echo(stream) -> None:
    if chunk := stream.read():
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()


def run_stage(stage: Stage, log_file: Path, verbose: bool = False) -> float:
    """Run the stage's command (``python -m module args``) from the repository root, output appended to
    ``log_file`` (and shown on the console if verbose); returns the CPU seconds it took."""
    if stage.command[:2] != [sys.executable, "-m"]:
        raise DemoError(f"stage {stage.name}: not a `python -m` command: {_display(stage.command)}")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        log.write(f"\n$ {_display(stage.command)}\n".encode())
    server = _stage_server()
    receive, send = server.Pipe(duplex=False)
    process = server.Process(target=_run_command, args=(stage.command, str(log_file), send), name=stage.name)
    with open(log_file, "rb") as shown:
        shown.seek(0, os.SEEK_END)
        try:
            process.start()
            while process.is_alive():
                process.join(0.2)
                if verbose:
                    _echo(shown)
            if verbose:
                _echo(shown)
        except BaseException:
            process.kill()
            process.join()
            raise
    cpu_seconds = receive.recv() if receive.poll() else 0.0
    if process.exitcode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
        raise DemoError(f"stage {stage.name} failed (exit code {process.exitcode}); full log: {log_file}\n"
                        f"command: {_display(stage.command)}\n--- last lines ---\n{tail}")
    missing = [str(p) for p in stage.outputs if not p.exists()]
    if missing:
        raise DemoError(f"stage {stage.name} finished but did not write {missing}; log: {log_file}")
    return cpu_seconds


def _clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def open_workdir(workdir: Path, settings: dict, force: bool, state_file: str = STATE_FILE) -> dict:
    """The recorded stage states of ``workdir`` (written back at once, so the folder is ours before anything else
    lands in it); an error when it holds a run of other settings (unless forced) or is another folder."""
    state = _check_workdir(workdir, settings, force, state_file)
    workdir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(workdir / state_file, state)
    return state


def _check_workdir(workdir: Path, settings: dict, force: bool, state_file: str) -> dict:
    state = _read_json(workdir / state_file)
    if state is None:
        if workdir.is_dir() and any(workdir.iterdir()):
            raise DemoError(f"{workdir} exists, is not empty and holds no {state_file}: it is not a work folder "
                            "of this command, which would replace folders in it. Choose another --workdir.")
        return {"settings": settings, "stages": {}}
    if state.get("settings") != settings and not force:
        raise DemoError(f"{workdir} holds a run with other settings ({state.get('settings')}); "
                        f"pass --force to start it again with {settings}, or choose another --workdir.")
    if force:
        return {"settings": settings, "stages": {}}
    return state


def run_stages(workdir: Path, stages: list[Stage], state: dict, force: bool = False, verbose: bool = False,
               runner: Callable[[Stage, Path, bool], float | None] = run_stage, tracker: Tracker | None = None,
               state_file: str = STATE_FILE) -> dict:
    """Run every unfinished stage in order, recording each in ``state`` (``open_workdir``); returns ``state``.

    ``runner(stage, log_file, verbose)`` executes one stage and returns its CPU seconds (the default runs its
    command); a stage counts as done when its outputs exist and it was recorded as finished; once a stage runs,
    every later stage runs again from a clean folder, since its inputs changed; an interrupted resumable stage
    continues.
    """
    upstream_ran = False
    for stage in stages:
        record = state["stages"].get(stage.name, {})
        done = record.get("finished") and all(p.exists() for p in stage.outputs)
        if done and not force and not upstream_ran:
            print(f"[{stage.name}] done earlier ({record.get('seconds', 0):.0f} s), skipped")
            continue
        resume = stage.resumable and record and not (force or upstream_ran or record.get("finished"))
        if resume:
            print(f"[{stage.name}] continuing an interrupted run")
        else:  # start over: nothing of an earlier run (checkpoints, MLflow run) may be reused
            _clear(stage.folder)
            if stage.name == "data":
                _clear(workdir / "cache")  # the cache is keyed on file paths, not on their content
            if tracker:
                tracker.end_unfinished(stage.name)
        print(f"[{stage.name}] {stage.description}\n  $ {_display(stage.command)}", flush=True)
        earlier = record.get("partial_seconds", 0.0) if resume else 0.0  # time of the interrupted attempts
        start = time.perf_counter()
        state["stages"][stage.name] = {"finished": False, "command": _display(stage.command),
                                       "partial_seconds": earlier}
        write_json_atomic(workdir / state_file, state)
        try:
            cpu_seconds = runner(stage, workdir / "logs" / f"{stage.name}.log", verbose)
        except BaseException:
            state["stages"][stage.name]["partial_seconds"] = round(earlier + time.perf_counter() - start, 1)
            write_json_atomic(workdir / state_file, state)
            raise
        seconds = earlier + time.perf_counter() - start
        if tracker:
            tracker.after_stage(stage, workdir, seconds)
        state["stages"][stage.name] = {"finished": True, "seconds": round(seconds, 1),
                                       "cpu_seconds": round(cpu_seconds or 0.0, 1),
                                       "command": _display(stage.command)}
        write_json_atomic(workdir / state_file, state)
        upstream_ran = True
        print(f"[{stage.name}] finished in {seconds:.0f} s", flush=True)
    return state


def run_demo(workdir, force: bool = False, seed: int = 0, size: str = "default", verbose: bool = False,
             tracking_uri: str | None = None, runner: Callable[[Stage, Path, bool], float | None] = run_stage,
             report: bool = True) -> Path:
    """Run every unfinished stage of the demo in ``workdir`` (``run_stages``) and write ``summary.json`` and
    ``report.md``. Returns the summary path."""
    workdir = Path(workdir).expanduser().absolute()
    settings = {"size": size, "seed": int(seed), "profile": PROFILES.get(size)}
    stages = plan(workdir, size, seed, tracking_uri)
    state = open_workdir(workdir, settings, force)
    uri = tracking_uri or default_tracking_uri(workdir)
    tracker = Tracker(uri, workdir) if report else None
    print(f"Demo ({size}, seed {seed}) in {workdir}; commands run from {REPO}; MLflow store {uri}")
    state = run_stages(workdir, stages, state, force, verbose, runner, tracker)
    summary_path = workdir / "summary.json"
    if report:
        summary = write_report(workdir, stages, state, tracker, uri)
        write_json_atomic(summary_path, summary)
        print_summary(summary)
        print(f"\nSummary: {summary_path}\nReport:  {workdir / 'report.md'}\n"
              f"MLflow:  mlflow ui --backend-store-uri {uri}")
    return summary_path


# ------------------------------------------------------------------------------------------------------
# several seeds: one demo per seed, then mean ± std of the headline numbers
# ------------------------------------------------------------------------------------------------------
def headline(summary: dict, timings: dict | None = None) -> dict[str, float | None]:
    """The numbers a seed is judged by: test-split Dice, best Dice and AUPRC of model and baseline, IXI_test L1, NOVA
    mAP@30 under both protocols, and the stages' total wall time."""
    row: dict[str, float | None] = {}
    for dataset, entry in summary.get("datasets", {}).items():
        if dataset == "IXI":
            row["IXI_test l1 (model)"] = (entry.get("model") or {}).get("l1")
            continue
        for kind in ("model", "baseline"):
            for metric in ("dice", "best_dice", "auprc"):
                row[f"{dataset} {metric} ({kind})"] = (entry.get(kind) or {}).get(metric)
    for key, label in (("nova", "reference"), ("nova_project", "project")):
        row[f"NOVA mAP@30 ({label})"] = _number(((summary.get(key) or {}).get("reference") or {}).get("mAP@30"))
    if timings is not None:
        row["stages' wall seconds"] = timings.get("total_seconds")
    return row


def over_seeds(rows: dict[int, dict]) -> dict[str, dict]:
    """Per column the mean and population std (ddof 0) over the seeds that have a value, and the values."""
    import numpy as np

    out = {}
    for column in dict.fromkeys(c for row in rows.values() for c in row):
        values = {seed: row.get(column) for seed, row in rows.items()}
        finite = [v for v in values.values() if _number(v) is not None]
        out[column] = {"mean": float(np.mean(finite)) if finite else None,
                       "std": float(np.std(finite)) if finite else None, "per_seed": values}
    return out


def run_seeds(workdir, seeds, force: bool = False, size: str = "default", verbose: bool = False,
              runner: Callable[[Stage, Path, bool], float | None] = run_stage) -> Path:
    """The demo once per seed in ``workdir/seed<N>`` (data, training and evaluation all seeded), then
    ``workdir/seeds.json`` and ``workdir/report.md``: every seed's headline numbers and their mean ± std."""
    workdir, seeds = Path(workdir).expanduser().absolute(), [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise DemoError(f"seeds must be distinct integers, got {seeds}.")
    open_workdir(workdir, {"size": size, "seeds": seeds}, force, state_file="seeds_state.json")
    rows = {}
    for seed in seeds:
        print(f"\n=== seed {seed} ===", flush=True)
        folder = workdir / f"seed{seed}"
        run_demo(folder, force=force, seed=seed, size=size, verbose=verbose, runner=runner)
        rows[seed] = headline(_read_json(folder / "summary.json") or {}, _read_json(folder / "timings.json"))
    table = over_seeds(rows)
    write_json_atomic(workdir / "seeds.json", {"size": size, "seeds": seeds, "metrics": table})
    lines = [f"# Demo over seeds {', '.join(map(str, seeds))} ({size} size)", "",
             "Each seed generates its own data and trains its own networks; means and population standard "
             "deviations over the seeds. Dice at the threshold found on each data set's val split; "
             + BEST_DICE_NOTE, "",
             "| | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|---|" + "---|" * len(seeds)]
    for column, stats in table.items():
        digits = 0 if "seconds" in column else 4 if "l1" in column else 3
        mean = "–" if stats["mean"] is None else f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
        lines.append(f"| {column} | {mean} | " + " | ".join(_fmt(v, digits) for v in stats["per_seed"].values()) + " |")
    lines += ["", "Each seed's report: " + ", ".join(f"[seed {s}](seed{s}/report.md)" for s in seeds), ""]
    write_text_atomic(workdir / "report.md", "\n".join(lines))
    print("\n" + "\n".join(lines[4:-2]) + f"\n\nReport: {workdir / 'report.md'}")
    return workdir / "seeds.json"


def print_summary(summary: dict) -> None:
    """The model-vs-baseline table of the summary on the console."""
    print("\n{:<10} {:<13} {:>8} {:>8}".format("dataset", "metric", "model", "baseline"))
    for dataset, entry in summary.get("datasets", {}).items():
        for metric in ("dice", "auprc", "auroc"):
            values = [entry.get(k, {}).get(metric) for k in ("model", "baseline")]
            if any(v is not None for v in values):
                print("{:<10} {:<13} {:>8} {:>8}".format(dataset, metric,
                                                         *("-" if v is None else f"{v:.3f}" for v in values)))
    for key, label in (("nova", "NOVA reference protocol"), ("nova_project", "NOVA project protocol")):
        metrics = (summary.get(key) or {}).get("reference") or {}
        if metrics:
            print(f"{label}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in metrics.items()))


# ------------------------------------------------------------------------------------------------------
# MLflow: the bundles log their own runs (``--tracking mlflow``: params, metrics, checkpoints, results);
# the demo adds the command and duration of each stage, and a run for the data stage, which has no engine
# ------------------------------------------------------------------------------------------------------
class Tracker:
    """Completes each stage's run in the demo's MLflow experiment: the stage's command and duration as params,
    numbers and figures its bundle does not log, and a run for the data stage (no bundle, no engine)."""

    def __init__(self, tracking_uri: str, workdir: Path, experiment: str = EXPERIMENT):
        import mlflow

        self.mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:  # artefacts beside the database, as MONAI's MLFlowHandler keeps them
            location = (Path(workdir) / "mlruns").absolute().as_uri() if tracking_uri.startswith("sqlite:") else None
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            self.experiment_id = found.experiment_id

    def runs(self, name: str):
        """Runs of the experiment named ``name``, newest first."""
        return self.client.search_runs([self.experiment_id], filter_string=f"attributes.run_name = '{name}'",
                                       order_by=["attributes.start_time DESC"])

    def end_unfinished(self, name: str) -> None:
        """Mark runs left RUNNING by an interrupted stage as KILLED, so a fresh start gets a new run."""
        for run in self.runs(name):
            if run.info.status == "RUNNING":
                self.client.set_terminated(run.info.run_id, "KILLED")

    def after_stage(self, stage: Stage, workdir: Path, seconds: float) -> None:
        runs = self.runs(stage.name)
        if runs:
            run_id, created = runs[0].info.run_id, False
        else:
            run_id, created = self.client.create_run(self.experiment_id, run_name=stage.name).info.run_id, True
        params = {"command": _display(stage.command)[:6000], "stage_seconds": f"{seconds:.1f}"}
        existing = self.client.get_run(run_id).data.params
        for key, value in params.items():
            if key not in existing:
                self.client.log_param(run_id, key, value)
        for key, value in stage_metrics(stage.name, workdir).items():
            self.client.log_metric(run_id, key, value)
        if created:
            self.client.set_terminated(run_id, "FINISHED")

    def log_files(self, name: str, files: list[Path]) -> None:
        """Add files to the newest run ``name`` unless it has them already."""
        runs = self.runs(name)
        if runs:
            have = {a.path for a in self.client.list_artifacts(runs[0].info.run_id)}
            for file in files:
                if file.name not in have:
                    self.client.log_artifact(runs[0].info.run_id, str(file))

    def curves(self, name: str) -> dict[str, list[tuple[int, float]]]:
        """Per-epoch train loss (mean over the epoch's iterations) and validation loss of a training run."""
        runs = [r for r in self.runs(name) if "val_loss" in r.data.metrics or "train_loss" in r.data.metrics]
        if not runs:
            return {}
        run = runs[0]
        out = {}
        epoch_length = int(float(run.data.params.get("epoch_length", 0) or 0))
        train = self.client.get_metric_history(run.info.run_id, "train_loss")
        if train and epoch_length:
            per_epoch: dict[int, list[float]] = {}
            for m in train:
                per_epoch.setdefault((m.step - 1) // epoch_length + 1, []).append(m.value)
            out["train_loss"] = [(e, sum(v) / len(v)) for e, v in sorted(per_epoch.items())]
        val = self.client.get_metric_history(run.info.run_id, "val_loss")
        if val:
            out["val_loss"] = sorted({m.step: m.value for m in val}.items())
        return out


def stage_metrics(stage: str, workdir: Path) -> dict[str, float]:
    """Numbers a stage's own logging does not record: data sizes, box counts."""
    workdir = Path(workdir)
    if stage == "data":
        manifest = _read_json(workdir / "data" / "demo_data.json") or {}
        return {k: float(v) for k, v in manifest.items() if k.startswith("n_") and isinstance(v, (int, float))}
    if stage.startswith("nova_predict"):
        predictions = _read_json(workdir / stage.replace("_predict", "") / "predictions.json") or {}
        return {"n_images": float(len(predictions)), "n_boxes": float(sum(len(b) for b in predictions.values()))}
    return {}


def versions() -> dict[str, str]:
    import monai
    import numpy
    import torch

    out = {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
           "numpy": numpy.__version__, "platform": platform.platform()}
    try:
        import mlflow

        out["mlflow"] = mlflow.__version__
    except ImportError:
        pass
    return out


# ------------------------------------------------------------------------------------------------------
# summary.json and report.md
# ------------------------------------------------------------------------------------------------------
def _number(value):
    """A finite float, or None (NaN, missing, not a number)."""
    if isinstance(value, dict):
        value = value.get("mean")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def _eval_entry(metrics: dict | None, dataset: str) -> dict | None:
    entry = (metrics or {}).get(dataset)
    if not isinstance(entry, dict) or "metrics" not in entry:
        return None
    values = {m: _number(entry["metrics"].get(m)) for m in MAIN_METRICS if m in entry["metrics"]}
    values.update(threshold=_number(entry.get("threshold")), val_dice=_number(entry.get("val_dice")))
    return values


def summarize_results(workdir: Path) -> dict:
    """Per data set the main metrics of the model and of the intensity baseline side by side, and NOVA's."""
    workdir = Path(workdir)
    results = {kind: _read_json(workdir / "eval" / kind / "metrics.json") for kind in ("model", "baseline")}
    datasets: dict[str, dict] = {}
    names = [k for r in results.values() if r for k in r if k not in ("settings", "IXI")]
    for dataset in dict.fromkeys(names):
        source = next(r[dataset] for r in results.values() if r and dataset in r)
        datasets[dataset] = {
            "test_split": source.get("test_split"), "n_test_volumes": source.get("n_test_volumes"),
            "threshold_found_on": (source.get("thresholds") or {}).get("found_on"),
            "threshold_method": source.get("threshold_method"),
            **{kind: _eval_entry(results[kind], dataset) for kind in results},
        }
    healthy = next((r["IXI"] for r in results.values() if r and "IXI" in r), None)
    if healthy:
        datasets["IXI"] = {
            "split": healthy.get("split"), "n_volumes": healthy.get("n_volumes"),
            "role": "healthy reference: thresholds at 1/5/10 % voxel false-positive rate",
            "test_split": healthy.get("test_split"), "n_test_volumes": healthy.get("n_test_volumes"),
            **{kind: {"fpr_thresholds": {k: _number(v) for k, v in ((r or {}).get("IXI") or {})
                                         .get("fpr_thresholds", {}).items()},
                      "l1": _number((((r or {}).get("IXI") or {}).get("metrics") or {}).get("l1"))}
               for kind, r in results.items()},
        }
    novas = {}
    for key, folder in (("nova", "nova"), ("nova_project", "nova_project")):  # boxes of the two NOVA protocols
        nova = _read_json(workdir / folder / "metrics.json")
        novas[key] = None if not nova else {
            "reference": {k: nova.get("reference", {}).get(k) for k in NOVA_METRICS if k in nova.get("reference", {})},
            "score_ranked": nova.get("score_ranked"), "n_images": nova.get("n_images")}
    return {"datasets": datasets, **novas}


def _training_curves(tracker: Tracker | None, out: Path) -> Path | None:
    """Train / validation loss per epoch of the two training stages, read back from the MLflow store."""
    if tracker is None:
        return None
    curves = {name: tracker.curves(name) for name in ("encoder", "cond_ddpm")}
    if not any(curves.values()):
        return None
    from custom_components.figures import plt, save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (name, series) in zip(axes, curves.items()):
        for key, points in series.items():
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=key.replace("_", " "))
        ax.set_title(f"{name} (MLflow run '{name}')", fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
    return save_figure(fig, out)


def _previews(workdir: Path) -> list[Path]:
    """Data preview grids (slice with the largest lesion, outlined) of the BraTS-like and MSLUB-like test splits."""
    from custom_components.preview import preview

    manifest = workdir / "data" / "demo_data.json"
    figures = []
    for split in ("Brats21_test", "MSLUB_test"):
        out = workdir / "figures" / f"data_{split}.png"
        if (workdir / "data" / "splits" / f"{split}.csv").is_file():
            if not out.is_file() or out.stat().st_mtime < manifest.stat().st_mtime:
                preview(workdir / "data", split=split, out=out, n=6)
            figures.append(out)
    return figures


def _describe(networks: dict) -> str:
    unet = networks["unet"]
    return (f"{networks['contrastive_encoder']} contrastive encoder, {networks['conditioning_encoder']} conditioning "
            f"encoder, U-Net channels {unet['channels']} with {unet['num_res_blocks']} res block(s) on "
            f"{unet['pixel_unshuffle']}x{unet['pixel_unshuffle']} pixel-unshuffled slices; {networks['note']}")


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def write_report(workdir: Path, stages: list[Stage], state: dict, tracker: Tracker | None, uri: str) -> dict:
    """Build the summary (returned, for ``summary.json``) and write ``report.md`` with its figures."""
    workdir = Path(workdir)
    size, seed = state["settings"]["size"], state["settings"]["seed"]
    results = summarize_results(workdir)
    stage_info = {s.name: {key: state["stages"].get(s.name, {}).get(key) for key in ("seconds", "cpu_seconds")}
                  | {"command": _display(s.command)} for s in stages}
    total = sum(v["seconds"] or 0 for v in stage_info.values())
    cpu_total = sum(v["cpu_seconds"] or 0 for v in stage_info.values())
    previews = _previews(workdir)
    if tracker is not None:
        tracker.log_files("data", previews)
    curves = _training_curves(tracker, workdir / "figures" / "training_curves.png")
    grids = [p for kind in ("model", "baseline") for p in sorted((workdir / "eval" / kind).glob("*_grid.png"))]
    overlays = [p for folder in ("nova", "nova_project") for p in sorted((workdir / folder / "overlays").glob("*.png"))[:4]]
    # summary.json holds what the run computed, nothing that depends on the clock or the folder: the same seed
    # on the same machine gives the same file; durations go to timings.json
    summary = {
        "size": size, "seed": seed, "profile": PROFILES[size],
        "networks": network_settings(size),
        **results,
        "versions": versions(),
        "mlflow": {"experiment": EXPERIMENT, "runs": [s.name for s in stages]},
        "figures": [str(p.relative_to(workdir)) for p in [*previews, *grids, *overlays, *([curves] if curves else [])]],
    }
    write_json_atomic(workdir / "timings.json", {
        "stages": stage_info, "total_seconds": round(total, 1), "total_cpu_seconds": round(cpu_total, 1),
        "cpu_count": os.cpu_count(), "load_average_at_end": [round(x, 2) for x in os.getloadavg()]})

    def rel(path: Path) -> str:
        return path.relative_to(workdir).as_posix()

    lines = [f"# Demo report ({size} size, seed {seed})", "",
             f"Synthetic data; {_describe(summary['networks'])}. Total time of the stages: {total / 60:.1f} min "
             f"({cpu_total / 60:.1f} CPU-minutes) on {os.cpu_count()} CPU cores (torch {summary['versions']['torch']}, "
             f"MONAI {summary['versions']['monai']}).", "",
             "## Anomaly segmentation: model vs intensity baseline", "",
             "Means over the test volumes; the Dice threshold is chosen on each data set's val split "
             "(the intensity baseline scores the image intensity itself as the anomaly map); " + BEST_DICE_NOTE, "",
             "| data set | test split | metric | model | intensity baseline |", "|---|---|---|---|---|"]
    for dataset, entry in results["datasets"].items():
        if dataset == "IXI":
            continue
        for metric in (*MAIN_METRICS, "threshold"):
            model, base = (entry.get(k) or {} for k in ("model", "baseline"))
            if metric in model or metric in base:
                lines.append(f"| {dataset} | {entry['test_split']} ({entry['n_test_volumes']}) | {metric} | "
                             f"{_fmt(model.get(metric))} | {_fmt(base.get(metric))} |")
    if "IXI" in results["datasets"]:
        ixi = results["datasets"]["IXI"]
        lines += ["", f"Healthy reference {ixi['split']} ({ixi['n_volumes']} volumes), residual thresholds at a "
                      "voxel false-positive rate: model " + ", ".join(
                          f"{k} {_fmt(v)}" for k, v in (ixi.get("model") or {}).get("fpr_thresholds", {}).items())
                  + "; baseline " + ", ".join(
                          f"{k} {_fmt(v)}" for k, v in (ixi.get("baseline") or {}).get("fpr_thresholds", {}).items())
                  + ".", "", f"Mean L1 reconstruction error on {ixi.get('test_split')} ({ixi.get('n_test_volumes')} "
                  f"volumes, whole volume): model {_fmt((ixi.get('model') or {}).get('l1'), 4)}, intensity baseline "
                  f"(reconstruction 0) {_fmt((ixi.get('baseline') or {}).get('l1'), 4)}."]
    boxes = {label: results[key]["reference"] for key, label in
             (("nova", "reference (published recipe)"), ("nova_project", "project (head mask, training scale, "
                                                                          "calibrated threshold)")) if results.get(key)}
    if boxes:
        columns = list(next(iter(boxes.values())))
        lines += ["", "## NOVA-like images", "",
                  "Boxes from the same model's residuals under both NOVA protocols, scored with the published metric.",
                  "", "| protocol | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        lines += [f"| {label} | " + " | ".join(_fmt(values.get(c)) for c in columns) + " |"
                  for label, values in boxes.items()]
    lines += ["", "## Figures", ""]
    if previews:
        lines += ["### Data (slice with the largest lesion, lesion outlined)", ""]
        lines += [f"![{p.stem}]({rel(p)})" for p in previews] + [""]
    if grids:
        lines += ["### Reconstructions and residual maps (evaluation grids)", ""]
        lines += [f"**{p.parent.name}, {p.stem.replace('_grid', '')}**\n\n![{p.parent.name} {p.stem}]({rel(p)})\n"
                  for p in grids]
    if overlays:
        lines += ["### NOVA boxes (gold green, predicted red): reference protocol, then project", ""]
        lines += [" ".join(f"![{p.parent.parent.name} {p.stem}]({rel(p)})" for p in overlays), ""]
    if curves:
        lines += ["### Training curves (from the MLflow store)", "", f"![training curves]({rel(curves)})", ""]
    lines += ["## Stages", "", "Each stage is an ordinary command, run from the repository root; logs in `logs/`.",
              "Wall seconds grow when other jobs share the machine; CPU seconds (user + system, all cores) do not.",
              "", "| stage | seconds | CPU seconds | command |", "|---|---|---|---|"]
    lines += [f"| {name} | {_fmt(info['seconds'], 0)} | {_fmt(info['cpu_seconds'], 0)} | `{info['command']}` |"
              for name, info in stage_info.items()]
    lines += ["", "## Experiment tracking", "",
              f"All stages are runs of the MLflow experiment `{EXPERIMENT}`: `mlflow ui --backend-store-uri {uri}`.",
              "", "Numbers: `summary.json`; per-volume metrics: `eval/*/per_volume.csv`; full metrics: "
              "`eval/*/metrics.json`, `nova/metrics.json`, `nova_project/metrics.json`.", ""]
    write_text_atomic(workdir / "report.md", "\n".join(lines))
    return summary
