"""Engine helpers the bundle configs share: resuming an interrupted training run from its last checkpoint,
and what ``--tracking mlflow`` records beyond MONAI's default handler (params, the best checkpoint)."""

from __future__ import annotations

import glob
import logging
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver, MLFlowHandler

from custom_components.utils import atomic_path, mlflow_metric_name

CHECKPOINT_PATTERN = re.compile(r"checkpoint.*?epoch=(\d+)\.pt$")


def latest_checkpoint(directory) -> str | None:
    """The epoch checkpoint with the highest epoch number in ``directory`` (None when there is none)."""
    directory = Path(directory)
    found = [(int(m.group(1)), p) for p in directory.glob("*.pt") if (m := CHECKPOINT_PATTERN.search(p.name))]
    return str(max(found)[1]) if found else None


class ResumableCheckpoint:
    """Save the training state every ``save_interval`` epochs and, at the start of training, load the latest
    one from ``checkpoint_dir`` (if any), so an interrupted run continues where it stopped.

    ``save_dict`` holds what must survive (network, optimizer, best-model saver state); the trainer's own state
    (epoch, iteration) is added at attach time, which a config cannot do without a circular reference.
    ``resume=False`` starts from scratch (and overwrites the old checkpoints).
    """

    def __init__(self, checkpoint_dir, save_dict: dict, resume: bool = True, save_interval: int = 1,
                 map_location=None):
        self.checkpoint_dir, self.save_dict, self.resume = str(checkpoint_dir), save_dict, resume
        self.save_interval, self.map_location = save_interval, map_location
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        self.save_dict = {**self.save_dict, "trainer": engine}
        engine.add_event_handler(Events.STARTED, self)  # every process resumes
        if idist.get_rank() == 0:  # one process writes (and prunes) the checkpoints
            CheckpointSaver(self.checkpoint_dir, self.save_dict, save_interval=self.save_interval,
                            n_saved=1).attach(engine)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.prune)

    def prune(self, engine: Engine) -> None:
        """Delete epoch checkpoints older than the latest (those a previous, interrupted run left)."""
        latest = latest_checkpoint(self.checkpoint_dir)
        for path in Path(self.checkpoint_dir).glob("*.pt"):
            if CHECKPOINT_PATTERN.search(path.name) and str(path) != latest:
                path.unlink(missing_ok=True)

    def __call__(self, engine: Engine) -> None:
        path = latest_checkpoint(self.checkpoint_dir) if self.resume else None
        if path is None:
            return
        map_location = self.map_location or ("cpu" if not torch.cuda.is_available() else None)
        CheckpointLoader(load_path=path, load_dict=self.save_dict, map_location=map_location)(engine)
        self.logger.info(f"Resumed from {path} at epoch {engine.state.epoch}.")


def prepare_image_as_target(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """Batch preparation for self-supervised training: the input image is also the target."""
    image = batchdata["image"].to(device=device, non_blocking=non_blocking)
    return image, image


class BestModelState:
    """The best-metric bookkeeping of a key-metric ``CheckpointSaver`` as ``state_dict``/``load_state_dict``,
    so it travels in the resume checkpoint and a resumed run never replaces a better best model."""

    def __init__(self, saver):
        self.saver = saver

    def state_dict(self) -> dict:
        return self.saver._key_metric_checkpoint.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.saver.load_state_dict(state_dict)


class SaveVolumeEmbeddings:
    """Write the evaluator's per-volume output (all slices of one volume per iteration) to
    ``output_dir/<name>.pt`` as a (slices, features) tensor, atomically."""

    def __init__(self, output_dir, name_key: str = "name"):
        self.output_dir, self.name_key = Path(output_dir), name_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        names = engine.state.batch[self.name_key]
        if len(set(names)) != 1:
            raise ValueError(f"One volume per batch expected, got slices of {sorted(set(names))}.")
        pred = engine.state.output["pred"]
        with atomic_path(self.output_dir / f"{names[0]}.pt") as tmp:
            torch.save(torch.Tensor(pred.as_tensor() if hasattr(pred, "as_tensor") else pred).detach().cpu(), tmp)


# ------------------------------------------------------------------------------------------------------
# experiment tracking (``python -m monai.bundle run ... --tracking mlflow``)
# ------------------------------------------------------------------------------------------------------
def tracking_handler(engine: Engine) -> MLFlowHandler | None:
    """The ``MLFlowHandler`` that ``--tracking mlflow`` attached to ``engine`` (None without tracking, and on
    ranks other than 0, where MONAI disables it)."""
    for handler, *_ in engine._event_handlers.get(Events.STARTED, []):
        owner = getattr(handler, "__self__", None)
        if isinstance(owner, MLFlowHandler):
            return owner
    return None


class MLflowRunDetails:
    """Completes the MLflow run of ``--tracking mlflow``: the workflow's settings as params (once the run is
    open) and, when the engine completes, the best checkpoint as an artefact with its path as the tag
    ``best_checkpoint``, and the ``artifacts`` (files or glob patterns: metrics, tables, figures) that exist.
    Does nothing when tracking is off. Params already in the run (a resumed run) are kept.

    ``output_dir``: where MONAI wrote the executed config (``config_<time>.json``); logged here when MONAI's
    handler cannot find it, which happens when ``--output_dir`` is a plain path rather than an expression."""

    def __init__(self, params: Mapping, checkpoint=None, artifacts=(), output_dir=None):
        self.params, self.checkpoint, self.output_dir = dict(params), checkpoint, output_dir
        self.artifacts = [str(a) for a in artifacts]
        self._logged = False

    def attach(self, engine: Engine) -> None:
        # MONAI appends its tracking handler after the config's handlers: its run opens at STARTED, before this
        engine.add_event_handler(Events.ITERATION_STARTED, self.log_params)
        engine.add_event_handler(Events.COMPLETED, self.log_files)

    def log_params(self, engine: Engine) -> None:
        tracker = None if self._logged else tracking_handler(engine)
        self._logged = True
        if tracker is None or tracker.cur_run is None:
            return
        from mlflow.entities import Param

        run_id = tracker.cur_run.info.run_id
        existing = tracker.client.get_run(run_id).data.params
        params = [Param(key, str(value)[:6000]) for key, value in self.params.items() if key not in existing]
        if params:
            tracker.client.log_batch(run_id, params=params)

    def log_files(self, engine: Engine) -> None:
        tracker = tracking_handler(engine)
        if tracker is None or tracker.cur_run is None:
            return
        run_id = tracker.cur_run.info.run_id
        if self.checkpoint and Path(self.checkpoint).is_file():
            path = Path(self.checkpoint).absolute()
            tracker.client.set_tag(run_id, "best_checkpoint", str(path))
            tracker.client.log_artifact(run_id, str(path), artifact_path="checkpoint")
        for pattern in self.artifacts:
            for path in sorted(glob.glob(pattern)):
                if Path(path).is_file():
                    tracker.client.log_artifact(run_id, path)
        found = any(a and Path(a).exists() for a in (tracker.artifacts or ()))
        configs = sorted(Path(self.output_dir).glob("config_*.json")) if self.output_dir and not found else []
        if configs:
            tracker.client.log_artifact(run_id, str(configs[-1]))


class MetricsEngine(Engine):
    """An engine of one iteration that calls ``compute()`` and publishes its numbers in ``state.metrics``, so
    that engine handlers (``--tracking mlflow``, ``StatsHandler``) serve a workflow that is one computation over
    files rather than a loop over a data loader. ``metrics_transform`` picks the numbers to publish (default:
    every finite number of the nested result, keys joined with ``/``); the result itself is ``state.output``."""

    def __init__(self, compute: Callable[[], Mapping], metrics_transform: Callable[[Mapping], Mapping] | None = None,
                 val_handlers=None):
        super().__init__(self._iteration)
        self.compute, self.metrics_transform = compute, metrics_transform or flat_numbers
        for handler in val_handlers or []:
            handler.attach(self)

    def _iteration(self, engine: Engine, _batch) -> Mapping:
        result = self.compute()
        self.state.metrics.update({mlflow_metric_name(k): v for k, v in self.metrics_transform(result).items()})
        return result

    def run(self, data=None, max_epochs: int | None = None, epoch_length: int | None = None):  # type: ignore[override]
        return super().run([None] if data is None else data, max_epochs=max_epochs or 1, epoch_length=epoch_length)


def flat_numbers(result: Mapping, prefix: str = "") -> dict[str, float]:
    """Every finite int / float of a nested mapping, keyed by its path (``reference/mAP@30``)."""
    out: dict[str, float] = {}
    for key, value in result.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_numbers(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out
