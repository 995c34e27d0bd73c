"""The feature-conditioned denoiser of the conditional DDPM, built on MONAI's ``DiffusionModelUNet``.

The reference denoiser (cDDPM) is the OpenAI U-Net with ``use_scale_shift_norm=True``; the encoder's 128-d vector
goes through a 2-layer MLP (128 -> 512 -> 512) and is CONCATENATED to the 512-d timestep embedding, which every
residual block projects to a per-channel (scale, shift) applied after its second GroupNorm (FiLM). MONAI has
neither option, so ``FiLMDiffusionUNet`` builds MONAI's network (attention in the middle block only, residual
up/down sampling), swaps its residual blocks for ``ScaleShiftResnetBlock`` and adds the conditioning MLP.

Parameter parity at the paper setting (channels (128, 256, 256), 3 blocks): MONAI's plain network has 34,493,313;
each of the 27 residual blocks (output channels summing to 5,888) grows its embedding projection from 512 -> C to
1024 -> 2C (+9,049,856), the MLP adds 328,704: 43,871,873, the reference's count (attention blocks match too).
GroupNorm eps 1e-5 and 64-channel heads as in the reference; 446 GFLOP forward+backward per 96x96 slice
(benchmarks/diffusion.py). ``ConditionalDDPM.forward(x, timesteps, context)`` takes the clean conditioning image as
``context``, so MONAI's ``DiffusionInferer`` (mode ``"crossattn"``) and ``DiffusionPrepareBatch`` drive it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock, get_timestep_embedding
from torch import nn

from ..utils import as_bool, from_diffusion_range
from .backbone import backbone_channels, resnet_backbone


class ScaleShiftResnetBlock(DiffusionUNetResnetBlock):
    """MONAI's diffusion residual block with scale-shift (FiLM) embedding conditioning, as OpenAI's
    ``use_scale_shift_norm``: ``h = norm2(h) * (1 + scale) + shift`` with (scale, shift) from the embedding."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.time_emb_proj = nn.Linear(self.emb_channels, 2 * self.out_channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.nonlinearity(self.norm1(x))
        if self.upsample is not None:
            x, h = self.upsample(x), self.upsample(h)
        elif self.downsample is not None:
            x, h = self.downsample(x), self.downsample(h)
        h = self.conv1(h)
        film = self.time_emb_proj(self.nonlinearity(emb))
        scale, shift = film.reshape(*film.shape, *([1] * self.spatial_dims)).chunk(2, dim=1)
        h = self.conv2(self.nonlinearity(self.norm2(h) * (1 + scale) + shift))
        return self.skip_connection(x) + h


def _swap_resnet_blocks(module: nn.Module, temb_channels: int) -> None:
    """Replace every ``DiffusionUNetResnetBlock`` under ``module`` by a ``ScaleShiftResnetBlock`` of the same shape."""
    for name, child in list(module.named_children()):
        if isinstance(child, DiffusionUNetResnetBlock):
            norm = child.norm1
            block = ScaleShiftResnetBlock(child.spatial_dims, child.channels, temb_channels, child.out_channels,
                                          child.up, child.down, norm.num_groups, norm.eps)
            setattr(module, name, block)
        else:
            _swap_resnet_blocks(child, temb_channels)


class FiLMDiffusionUNet(DiffusionModelUNet):
    """MONAI's 2D diffusion U-Net with scale-shift residual blocks and an optional continuous condition.

    The condition (B, cond_dim) goes through a 2-layer MLP to the timestep-embedding width and is
    concatenated to the timestep embedding (so the blocks read a ``2 * 4 * channels[0]`` embedding).
    GroupNorm: 32 groups, or the largest power of two dividing every channel count.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, channels: Sequence[int] = (128, 256, 256),
                 num_res_blocks: Sequence[int] | int = 3, cond_dim: int | None = 128) -> None:
        channels = tuple(int(c) for c in channels)
        super().__init__(spatial_dims=2, in_channels=in_channels, out_channels=out_channels, channels=channels,
                         num_res_blocks=num_res_blocks, attention_levels=(False,) * len(channels), norm_eps=1e-5,
                         norm_num_groups=next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in channels)),
                         resblock_updown=True, num_head_channels=min(64, channels[-1]), use_flash_attention=True)
        dim = channels[0] * 4  # the timestep-embedding width
        self.cond_embed = nn.Sequential(nn.Linear(cond_dim, dim), nn.SiLU(), nn.Linear(dim, dim)) if cond_dim else None
        _swap_resnet_blocks(self, 2 * dim if cond_dim else dim)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor,  # type: ignore[override]
                cond: torch.Tensor | None = None) -> torch.Tensor:
        """Predict from ``x`` (B, C, *spatial) at ``timesteps`` (B,), conditioned on ``cond`` (B, cond_dim)."""
        t_emb = get_timestep_embedding(timesteps, self.block_out_channels[0]).to(dtype=x.dtype)
        emb = self.time_embed(t_emb)
        if self.cond_embed is not None:
            if cond is None:
                raise ValueError("This U-Net is conditioned: pass a condition vector of shape (B, cond_dim).")
            emb = torch.cat([emb, self.cond_embed(cond.to(dtype=emb.dtype))], dim=1)
        h = self.conv_in(x)
        skips: list[torch.Tensor] = [h]
        for block in self.down_blocks:
            h, res = block(hidden_states=h, temb=emb, context=None)
            skips.extend(res)
        h = self.middle_block(hidden_states=h, temb=emb, context=None)
        for block in self.up_blocks:
            n = len(block.resnets)
            h = block(hidden_states=h, res_hidden_states_list=skips[-n:], temb=emb, context=None)
            skips = skips[:-n]
        return self.out(h)


def load_backbone_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone ``state_dict`` stored at ``path`` (plain, or wrapped in one ``{"key": state_dict}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Encoder checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file or non-tensor payload
        raise ValueError(f"Could not read encoder checkpoint {path}: {e}") from e
    if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"Encoder checkpoint {path} does not hold a state_dict of tensors.")
    return state


class ConditioningEncoder(nn.Module):
    """ResNet backbone (``resnet_backbone``, optional stochastic depth ``drop_path``) + global average pooling
    + a linear head to ``cond_dim``."""

    def __init__(self, depth: int = 50, cond_dim: int = 128, in_channels: int = 1, drop_path: float = 0.0) -> None:
        super().__init__()
        self.backbone = resnet_backbone(depth=depth, in_channels=in_channels, drop_path=drop_path)
        self.head = nn.Linear(backbone_channels(depth)[-1], cond_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))  # the backbone ends with global average pooling + flatten

    def load_backbone(self, path: str | Path) -> None:
        """Load the backbone weights saved by the contrastive encoder (``models/model.pt``); head untouched."""
        state, expected = load_backbone_state(path), self.backbone.state_dict()
        wrong = sorted(set(expected) ^ set(state)) or [k for k, v in state.items() if v.shape != expected[k].shape]
        if wrong:
            raise ValueError(f"Encoder checkpoint {path} does not match the ResNet backbone: keys or tensor shapes "
                             f"differ (e.g. {wrong[:3]}); check encoder_depth.")
        self.backbone.load_state_dict(state, strict=True)


class ConditionalDDPM(nn.Module):
    """Conditional DDPM denoiser: ``FiLMDiffusionUNet`` conditioned on ``ConditioningEncoder(context)``.

    Paper setting: ``channels`` (128, 256, 256), ``num_res_blocks`` 3, ``cond_dim`` 128, ``encoder_depth`` 50;
    ``encoder_drop_path``: stochastic depth of the conditioning ResNet (reference 0.05; off in eval mode);
    ``encoder_ckpt``: backbone ``state_dict`` of the pretrained contrastive encoder to start from;
    ``conditioning``: ``False``/``"none"`` gives a plain DDPM that ignores ``context`` (no encoder);
    ``pixel_unshuffle``: factor ``r`` to run the U-Net on an ``r x r`` pixel-unshuffled image (``r**2`` channels
    at ``1/r`` resolution, the CPU demo profile) and shuffle the output back; 1 = off.
    """

    def __init__(self, channels: Sequence[int] = (128, 256, 256), num_res_blocks: Sequence[int] | int = 3,
                 cond_dim: int = 128, encoder_depth: int = 50, encoder_drop_path: float = 0.0,
                 encoder_ckpt: str | Path | None = None, conditioning: bool | str = True, pixel_unshuffle: int = 1):
        super().__init__()
        self.conditioning = as_bool(conditioning, "conditioning")  # also "false" / "none" from the command line
        self.pixel_unshuffle = int(pixel_unshuffle)
        if self.pixel_unshuffle < 1:
            raise ValueError(f"pixel_unshuffle must be >= 1, got {pixel_unshuffle}.")
        r2 = self.pixel_unshuffle**2
        self.unet = FiLMDiffusionUNet(r2, r2, channels, num_res_blocks, cond_dim if self.conditioning else None)
        self.encoder: ConditioningEncoder | None = None
        if self.conditioning:
            self.encoder = ConditioningEncoder(depth=encoder_depth, cond_dim=cond_dim, drop_path=encoder_drop_path)
            if encoder_ckpt:
                self.load_backbone(encoder_ckpt)

    def load_backbone(self, path: str | Path) -> None:
        """Load the conditioning encoder's backbone from the contrastive encoder's ``models/model.pt``."""
        if self.encoder is None:
            raise ValueError(f"Cannot load encoder checkpoint {path}: conditioning is off (no encoder).")
        self.encoder.load_backbone(path)

    @property
    def size_divisor(self) -> int:
        """Height and width must be multiples of this (U-Net downsamplings times the unshuffle factor)."""
        return 2 ** (len(self.unet.block_out_channels) - 1) * self.pixel_unshuffle

    def encode(self, context: torch.Tensor) -> torch.Tensor | None:
        """The condition vector (B, cond_dim) of the clean image ``context`` in the diffusion range [-1, 1];
        ``None`` when unconditioned. The encoder sees [0, 1], the range the contrastive encoder was trained on."""
        return self.encoder(from_diffusion_range(context)) if self.encoder is not None else None

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the clean image from ``x`` (B, 1, H, W) at ``timesteps`` (B,), conditioned on the clean image
        ``context`` or directly on its embedding ``cond`` (B, cond_dim); both are ignored when conditioning is off."""
        h, w = x.shape[-2:]
        if h % self.size_divisor or w % self.size_divisor:
            raise ValueError(f"Input size {h}x{w} must be a multiple of {self.size_divisor}; pad it "
                             "(ReconstructionInferer does this).")
        if self.encoder is None:
            cond = None
        elif cond is None:
            if context is None:
                raise ValueError("ConditionalDDPM is conditioned: pass the conditioning image as `context`.")
            cond = self.encode(context)
        r = self.pixel_unshuffle
        out = self.unet(F.pixel_unshuffle(x, r) if r > 1 else x, timesteps, cond)
        return F.pixel_shuffle(out, r) if r > 1 else out
