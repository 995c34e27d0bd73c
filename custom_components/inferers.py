"""Diffusion training batches and the test-time reconstruction of the conditional DDPM.

* ``ddpm_scheduler``: MONAI's ``DDPMScheduler`` with the reference setting (1000 steps, cosine schedule,
  the network predicts x0).
* ``ReconstructionPrepareBatch``: MONAI's ``DiffusionPrepareBatch`` with simplex (or Gaussian) noise,
  the clean image as target (x0 prediction, L1 loss) and the image itself as condition.
* ``ReconstructionInferer``: for each t in (250, 500, 750) noise the slice to step t with fresh noise,
  predict x0 in one network call, average the predictions (cDDPM's noise ensemble).

Both take ``shared_noise``: one noise field per batch (per ``t`` at test time) repeated over its slices, as the
reference draws it, instead of one field per slice.

Timestep convention: like the reference, ``t`` counts noising steps (1..T); the scheduler and the
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
from .utils import check_choice

__all__ = ["ddpm_scheduler", "ReconstructionPrepareBatch", "ReconstructionInferer"]


def ddpm_scheduler(num_train_timesteps: int = 1000, schedule: str = "cosine") -> DDPMScheduler:
    """MONAI's DDPM scheduler as the reference uses it: cosine beta schedule, x0 ("sample") prediction."""
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule=schedule, prediction_type="sample")


class ReconstructionPrepareBatch(DiffusionPrepareBatch):
    """Training batches for x0-predicting diffusion: ``(images, images, (), {noise, timesteps, condition})``.

    Used with MONAI's ``SupervisedTrainer`` + ``DiffusionInferer`` (mode ``"crossattn"``): the inferer noises
    the images with ``noise`` at ``timesteps`` and calls ``network(x=noisy, timesteps=t, context=condition)``;
    the loss compares the prediction with the clean images.

    Args:
        num_train_timesteps: T; timesteps are drawn uniformly from [0, T).
        condition_name: batch key of the conditioning image (the image itself by default);
            ``None`` for an unconditioned DDPM.
        noise_type: ``"simplex"`` (default) or ``"gaussian"``.
        generator: optional torch generator for the noise.
        shared_noise: one noise field per batch, repeated over its samples (the reference); else one per sample.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        condition_name: str | None = "image",
        noise_type: str = "simplex",
        generator: torch.Generator | None = None,
        shared_noise: bool = False,
    ) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_name)
        self.noise_type = check_choice("noise_type", noise_type, NOISE_TYPES, lower=True)
        self.generator = generator
        self.shared_noise = bool(shared_noise)

    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        return make_noise(images, self.noise_type, generator=self.generator, shared=self.shared_noise)

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return images


class ReconstructionInferer(Inferer):
    """Noise-ensemble reconstruction: average of one-step x0 predictions from several noise levels.

    For each ``t`` in ``timesteps`` the input (B, C, H, W) in [-1, 1] is noised to step ``t`` with fresh
    noise (``scheduler.add_noise``) and the network predicts x0 in one call with the clean input as
    ``context`` (a network with an ``encode`` method, like ``ConditionalDDPM``, encodes it once and gets
    ``cond=`` as well). Any H, W works: MONAI's ``DivisiblePad`` pads the input (replicating its border) to a
    multiple of the network's ``size_divisor`` (or ``divisible_by``) and its inverse crops the predictions back.

    Args:
        scheduler: the diffusion scheduler (e.g. ``ddpm_scheduler()``).
        timesteps: noise levels, counted in steps 1..T (the network sees index ``t - 1``).
        noise_type: ``"simplex"`` or ``"gaussian"``.
        return_members: also return the list of per-timestep predictions.
        divisible_by: size multiple the network needs; default ``network.size_divisor`` or 1.
        generator: optional torch generator for reproducible noise.
        shared_noise: one noise field per ``t``, the same for every slice of the batch (the reference, whose batch
            is the axial slices of one volume); else a field per slice.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        timesteps: Sequence[int] = (250, 500, 750),
        noise_type: str = "simplex",
        return_members: bool = False,
        divisible_by: int | None = None,
        generator: torch.Generator | None = None,
        shared_noise: bool = False,
    ) -> None:
        super().__init__()
        self.scheduler = scheduler
        self.timesteps = tuple(int(t) for t in timesteps)
        if not self.timesteps:
            raise ValueError("ReconstructionInferer needs at least one timestep.")
        num_steps = int(scheduler.num_train_timesteps)
        bad = [t for t in self.timesteps if not 1 <= t <= num_steps]
        if bad:
            raise ValueError(f"timesteps must lie in [1, {num_steps}], got {bad}.")
        self.noise_type = check_choice("noise_type", noise_type, NOISE_TYPES, lower=True)
        self.return_members = return_members
        self.divisible_by = divisible_by
        self.generator = generator
        self.shared_noise = bool(shared_noise)

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        if inputs.ndim != 4:
            raise ValueError(f"ReconstructionInferer expects (B, C, H, W) slices, got shape {tuple(inputs.shape)}.")
        module = getattr(network, "module", network)  # look through DataParallel / DistributedDataParallel
        k = self.divisible_by or int(getattr(module, "size_divisor", 1))
        # (B, C, H, W) read as one channel-first volume: H and W padded symmetrically, the batch axis left alone;
        # the pad is recorded on the MetaTensor for its inverse, the network sees plain tensors
        padder = DivisiblePad((1, k, k), mode="replicate")
        padded = MetaTensor(inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs)
        padded = padder(padded)
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
