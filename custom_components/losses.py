"""Losses of the target-invariant encoder: epsilon-InfoNCE and SparK reconstruction + contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .networks.sparse_encoder import upsample_mask


class EpsilonInfoNCE(nn.Module):
    """epsilon-InfoNCE (Barbano et al., arXiv 2211.05568) between two views (N, d) of the same N samples.

    Both views are L2-normalised; each of the 2N embeddings is an anchor whose positive is the other view
    of its sample and whose negatives are the 2N-2 embeddings of the other samples. With s = cosine / T,
    loss_i = -log( exp(s+) / (exp(s+ - epsilon) + sum_neg exp(s-)) ), averaged over the 2N anchors
    (computed with logsumexp). ``epsilon=0`` gives the standard NT-Xent loss.
    """

    def __init__(self, temperature: float = 0.07, epsilon: float = 0.5):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"EpsilonInfoNCE temperature must be positive, got {temperature}.")
        self.temperature = temperature
        self.epsilon = epsilon

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
        if z_a.dim() != 2 or z_a.shape != z_b.shape:
            raise ValueError(f"EpsilonInfoNCE expects two (N, d) tensors of equal shape, got {tuple(z_a.shape)} "
                             f"and {tuple(z_b.shape)}.")
        n = z_a.shape[0]
        dtype = torch.promote_types(z_a.dtype, torch.float32)  # at least float32, also under autocast
        with torch.autocast(device_type=z_a.device.type, enabled=False):
            z = torch.cat([F.normalize(z_a.to(dtype), dim=1), F.normalize(z_b.to(dtype), dim=1)], dim=0)
            sim = z @ z.t() / self.temperature  # (2N, 2N)
        idx = torch.arange(2 * n, device=z.device)
        positive = (idx + n) % (2 * n)
        is_self = idx.unsqueeze(1) == idx.unsqueeze(0)
        is_positive = positive.unsqueeze(1) == idx.unsqueeze(0)
        # denominator terms: the positive shifted by -epsilon, every other sample's embeddings as they are
        logits = (sim - self.epsilon * is_positive.to(sim.dtype)).masked_fill(is_self, float("-inf"))
        loss = torch.logsumexp(logits, dim=1) - sim[idx, positive]
        return loss.mean()


class SparKContrastiveLoss(nn.Module):
    """L2 reconstruction of the hidden patches + weighted epsilon-InfoNCE between masked and intact view.

    ``forward(pred, target)``: ``pred`` is the dict of ``TargetInvariantEncoder``, ``target`` the intact image
    (B, C, H, W). The reconstruction term is the squared error averaged over hidden pixels only. The two
    unweighted parts of the last call are kept, detached, in ``last_parts`` for logging.
    """

    def __init__(self, temperature: float = 0.07, epsilon: float = 0.5, contrastive_weight: float = 1.0,
                 reconstruction_weight: float = 1.0):
        super().__init__()
        self.contrastive = EpsilonInfoNCE(temperature=temperature, epsilon=epsilon)
        self.contrastive_weight = contrastive_weight
        self.reconstruction_weight = reconstruction_weight
        self.last_parts: dict[str, torch.Tensor] = {}

    def forward(self, pred: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        target = target.as_tensor() if hasattr(target, "as_tensor") else target
        reconstruction = pred["reconstruction"]
        hidden = ~upsample_mask(pred["patch_mask"].bool(), tuple(target.shape[-2:]))  # (B, 1, H, W)
        hidden = hidden.to(reconstruction.dtype).expand_as(reconstruction)
        squared = (reconstruction.float() - target.float()) ** 2
        parts = {
            "reconstruction": (squared * hidden).sum() / hidden.sum().clamp(min=1),
            "contrastive": self.contrastive(pred["z_masked"], pred["z_intact"]),
        }
        self.last_parts = {k: v.detach() for k, v in parts.items()}
        return self.reconstruction_weight * parts["reconstruction"] + self.contrastive_weight * parts["contrastive"]
