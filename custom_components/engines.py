"""Engine helpers the bundle configs share: resuming an interrupted training run from its last checkpoint."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

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
        self.output_dir.mkdir(parents=True, exist_ok=True)
        names = engine.state.batch[self.name_key]
        if len(set(names)) != 1:
            raise ValueError(f"One volume per batch expected, got slices of {sorted(set(names))}.")
        path = self.output_dir / f"{names[0]}.pt"
        tmp = path.with_suffix(".pt.tmp")
        pred = engine.state.output["pred"]
        torch.save(torch.Tensor(pred.as_tensor() if hasattr(pred, "as_tensor") else pred).detach().cpu(), tmp)
        tmp.replace(path)
