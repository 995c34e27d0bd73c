"""Diffusion training batches and the test-time reconstruction of the conditional DDPM.

``shared_noise``: one noise field per batch (per ``t`` at test time) repeated over its slices, as the reference
draws it, instead of one per slice. Like the reference, ``t`` counts noising steps (1..T); the scheduler and the
network see the 0-based index ``t - 1`` (what MONAI's training batches draw, uniformly in [0, T)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines.utils import DiffusionPrepareBatch
from monai.inferers import Inferer
from monai.networks.schedulers import DDPMScheduler, Scheduler
from monai.transforms import DivisiblePad

from .noise import NOISE_TYPES, make_noise
from .utils import as_bool, check_choice


def ddpm_scheduler(num_train_timesteps: int = 1000, schedule: str = "cosine") -> DDPMScheduler:
    """MONAI's DDPM scheduler as the reference uses it: cosine beta schedule, x0 ("sample") prediction."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule=schedule, prediction_type="sample")


class ReconstructionPrepareBatch(DiffusionPrepareBatch):
    """Training batches for x0-predicting diffusion: ``(images, images, (), {noise, timesteps, condition})``, for
    MONAI's ``SupervisedTrainer`` + ``DiffusionInferer`` (mode ``"crossattn"``); the loss compares the prediction
    with the clean images. ``condition_name``: batch key of the conditioning image (None: unconditioned);
    ``noise_type``: ``"simplex"`` or ``"gaussian"``."""

    def __init__(self, num_train_timesteps: int = 1000, condition_name: str | None = "image",
                 noise_type: str = "simplex", shared_noise: bool = False) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_name)
        self.noise_type = check_choice("noise_type", noise_type, NOISE_TYPES, lower=True)
        self.shared_noise = as_bool(shared_noise, "shared_noise")

    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        return make_noise(images, self.noise_type, shared=self.shared_noise)

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return images


class ReconstructionInferer(Inferer):
    """Noise-ensemble reconstruction of (B, C, H, W) slices in [-1, 1]: for each ``t`` in ``timesteps`` (steps 1..T)
    noise the input to step ``t`` with fresh noise, predict x0 in one network call with the clean input as
    ``context``, and average the predictions (``return_members``: also return them).

    A network with an ``encode`` method (``ConditionalDDPM``) encodes the condition once and gets it as ``cond=``.
    Any H, W works: MONAI's ``DivisiblePad`` pads (replicating the border) to a multiple of the network's
    ``size_divisor`` and its inverse crops the predictions back.
    """

    def __init__(self, scheduler: Scheduler, timesteps: Sequence[int] = (250, 500, 750), noise_type: str = "simplex",
                 return_members: bool = False, generator: torch.Generator | None = None,
                 shared_noise: bool = False) -> None:
        super().__init__()
        self.scheduler, self.timesteps = scheduler, tuple(int(t) for t in timesteps)
        num_steps = int(scheduler.num_train_timesteps)
        if not self.timesteps or any(not 1 <= t <= num_steps for t in self.timesteps):
            raise ValueError(f"timesteps must be one or more steps in [1, {num_steps}], got {self.timesteps}.")
        self.noise_type = check_choice("noise_type", noise_type, NOISE_TYPES, lower=True)
        self.return_members, self.generator = return_members, generator
        self.shared_noise = as_bool(shared_noise, "shared_noise")

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        module = getattr(network, "module", network)  # look through DataParallel / DistributedDataParallel
        k = int(getattr(module, "size_divisor", 1))
        # (B, C, H, W) read as one channel-first volume: H and W padded, the batch axis left alone; the pad is
        # recorded on the MetaTensor for its inverse, the network sees plain tensors
        padder = DivisiblePad((1, k, k), mode="replicate")
        padded = padder(MetaTensor(inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs))
        padding, padded = list(padded.applied_operations), padded.as_tensor()
        encode = getattr(module, "encode", None)
        if callable(encode) and "cond" not in kwargs:
            kwargs["cond"] = encode(inputs)  # the condition does not depend on t: encode the slices once
        members = []
        for t in self.timesteps:
            index = torch.full((inputs.shape[0],), t - 1, dtype=torch.long, device=inputs.device)
            noise = make_noise(padded, self.noise_type, generator=self.generator, shared=self.shared_noise)
            noisy = self.scheduler.add_noise(original_samples=padded, noise=noise, timesteps=index)
            pred = network(noisy, index, *args, context=inputs, **kwargs)
            members.append(padder.inverse(MetaTensor(pred, applied_operations=list(padding))).as_tensor())
        recon = torch.stack(members).mean(0)
        return (recon, members) if self.return_members else recon
