"""Engine helpers the bundle configs share: resuming an interrupted training run from its last checkpoint,
and what ``--tracking mlflow`` records beyond MONAI's default handler (params, the best checkpoint, results)."""

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
from monai.data import MetaTensor
from monai.handlers import CheckpointLoader, CheckpointSaver, MLFlowHandler

from custom_components.utils import as_bool, atomic_path, check_choice, mlflow_metric_name

CHECKPOINT_PATTERN = re.compile(r"checkpoint.*?epoch=(\d+)\.pt$")
LR_SCHEDULES = ("constant", "cosine")  # cond_ddpm's lr_schedule id: as the reference, or decayed to 0


def latest_checkpoint(directory) -> str | None:
    """The epoch checkpoint with the highest epoch number in ``directory`` (None when there is none)."""
    found = [(int(m.group(1)), p) for p in Path(directory).glob("*.pt") if (m := CHECKPOINT_PATTERN.search(p.name))]
    return str(max(found)[1]) if found else None


class ResumableCheckpoint:
    """Save the training state every epoch and, at the start of training, load the latest one from ``checkpoint_dir``
    (unless ``resume=False``), so an interrupted run continues where it stopped. The trainer's own state (epoch,
    iteration) joins ``save_dict`` at attach time, which a config cannot do without a circular reference."""

    def __init__(self, checkpoint_dir, save_dict: dict, resume: bool = True):
        self.checkpoint_dir, self.save_dict = str(checkpoint_dir), save_dict
        self.resume = as_bool(resume, "resume")
        self.logger = logging.getLogger(self.__class__.__name__)

    def attach(self, engine: Engine) -> None:
        self.save_dict = {**self.save_dict, "trainer": engine}
        engine.add_event_handler(Events.STARTED, self)  # every process resumes
        if idist.get_rank() == 0:  # one process writes (and prunes) the checkpoints
            CheckpointSaver(self.checkpoint_dir, self.save_dict, save_interval=1, n_saved=1).attach(engine)
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
        # a checkpoint of an older version may lack an entry (0.2.0 saved no lr_scheduler): resume the rest
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True).keys()
        missing = sorted(set(self.save_dict) - set(saved))
        if missing:
            self.logger.warning(f"{path} has no {', '.join(missing)}: those start afresh, the rest resumes.")
        load_dict = {k: v for k, v in self.save_dict.items() if k in saved}
        map_location = "cpu" if not torch.cuda.is_available() else None
        CheckpointLoader(load_path=path, load_dict=load_dict, map_location=map_location)(engine)
        self.logger.info(f"Resumed from {path} at epoch {engine.state.epoch}.")


def lr_factor(schedule: str, steps: int) -> Callable[[int], float]:
    """The learning-rate factor per optimiser step, for ``LambdaLR``: 1 throughout (``constant``) or a cosine from
    1 down to 0 at step ``steps`` (``cosine``). A closed form of the step count, so a run resumed with more epochs
    follows the longer schedule instead of the one it started with."""
    if check_choice("lr_schedule", schedule, LR_SCHEDULES) == "constant":
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(steps, 1)))


def prepare_image_as_target(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """Batch preparation for self-supervised training: the input image is also the target."""
    image = batchdata["image"].to(device=device, non_blocking=non_blocking)
    return image, image


class BestModelState:
    """The best validation loss as ``state_dict`` / ``load_state_dict``, so it travels in the resume checkpoint: on
    load it restores the validator's ``best_metric`` and primes the key-metric ``CheckpointSaver`` of ``model.pt``
    (ranking ``-loss``) in ignite's ``Checkpoint`` state format, so a resumed run never replaces a better model."""

    def __init__(self, validator, saver):
        self.validator, self.saver = validator, saver

    def state_dict(self) -> dict:
        return {"best_metric": float(self.validator.state.best_metric),
                "best_metric_epoch": int(self.validator.state.best_metric_epoch)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.validator.state.best_metric = state_dict["best_metric"]
        self.validator.state.best_metric_epoch = state_dict["best_metric_epoch"]
        if state_dict["best_metric_epoch"] >= 0:  # a model.pt was written
            self.saver.load_state_dict({"_saved": [(-state_dict["best_metric"], "model.pt")]})


class SaveVolumeEmbeddings:
    """Write the evaluator's per-volume output (all slices of one volume per iteration) to
    ``output_dir/<name>.pt`` as a (slices, features) tensor, atomically."""

    def __init__(self, output_dir):
        self.output_dir = Path(output_dir)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        names = engine.state.batch["name"]
        if len(set(names)) != 1:  # a batch_size above 1 would mix volumes
            raise ValueError(f"One volume per batch expected, got slices of {sorted(set(names))}.")
        pred = engine.state.output["pred"]
        with atomic_path(self.output_dir / f"{names[0]}.pt") as tmp:
            torch.save(torch.Tensor(pred.as_tensor() if isinstance(pred, MetaTensor) else pred).detach().cpu(), tmp)


def track(handlers: list, params: Mapping, artifacts=(), output_dir=None) -> list:
    """``handlers`` with the ``MLFlowHandler`` that ``--tracking mlflow`` appended (if any) set to log ``params`` when
    its run opens and the ``artifacts`` that exist when the engine completes, plus the executed config MONAI wrote
    to ``output_dir`` when MONAI's own path to it is no file (``--output_dir`` a plain path, not an expression)."""
    for handler in handlers or []:
        if isinstance(handler, MLFlowHandler):
            configs = sorted(glob.glob(str(Path(output_dir) / "config_*.json"))) if output_dir else []
            if any(a and Path(a).is_file() for a in handler.artifacts):
                configs = []
            handler.experiment_param = {**(handler.experiment_param or {}), **params}
            handler.artifacts = (*(a for a in handler.artifacts if a), *map(str, artifacts), *configs[-1:])
    return handlers


class MetricsEngine(Engine):
    """An engine of one iteration that calls ``compute()`` and publishes the numbers ``metrics_transform`` picks from
    its result in ``state.metrics`` (the result itself is ``state.output``), so that engine handlers (``--tracking
    mlflow``, ``StatsHandler``) serve a workflow that is one computation over files, not a loop over a data loader."""

    def __init__(self, compute: Callable[[], Mapping], metrics_transform: Callable[[Mapping], Mapping],
                 val_handlers=None):
        super().__init__(self._iteration)
        self.compute, self.metrics_transform = compute, metrics_transform
        for handler in val_handlers or []:
            handler.attach(self)

    def _iteration(self, engine: Engine, _batch) -> Mapping:
        result = self.compute()
        self.state.metrics.update({mlflow_metric_name(k): v for k, v in self.metrics_transform(result).items()})
        return result

    def run(self, data=None, max_epochs: int | None = None, epoch_length: int | None = None):  # type: ignore[override]
        return super().run([None] if data is None else data, max_epochs=max_epochs or 1, epoch_length=epoch_length)
