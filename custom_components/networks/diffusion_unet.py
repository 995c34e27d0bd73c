"""The feature-conditioned denoiser of the conditional DDPM, built on MONAI's ``DiffusionModelUNet``.

The reference denoiser (cDDPM) is the OpenAI U-Net with ``use_scale_shift_norm=True`` and a continuous
"class" input: the encoder's 128-d vector goes through a 2-layer MLP (128 -> 512 -> 512) and is
CONCATENATED to the 512-d timestep embedding, so every residual block receives a 1024-d embedding and
projects it to a per-channel (scale, shift) pair applied after its second GroupNorm (FiLM).

MONAI's network has neither option (it adds a class embedding and adds a per-channel bias), so:

* ``ScaleShiftResnetBlock`` subclasses MONAI's ``DiffusionUNetResnetBlock``: same layers, but its
  embedding projection outputs ``2 * out_channels`` and ``forward`` applies ``norm2(h) * (1 + scale) + shift``.
* ``FiLMDiffusionUNet`` subclasses ``DiffusionModelUNet``: it builds MONAI's network (no attention at the
  levels, self-attention in the middle block, residual up/down sampling), swaps every residual block for
  a ``ScaleShiftResnetBlock`` reading the widened embedding, adds the conditioning MLP, and overrides
  ``forward`` only to concatenate the projected condition to the timestep embedding before running
  MONAI's down / middle / up blocks unchanged.

Parameter parity: MONAI's plain network at the paper setting (channels (128, 256, 256), 3 residual
blocks) has 34,493,313 parameters. Each of its 27 residual blocks (sum of output channels 5,888) grows
its embedding projection from 512 -> C to 1024 -> 2C, i.e. by 1,537 * C: +9,049,856. The conditioning
MLP adds 128*512+512 + 512*512+512 = 328,704. Total 43,871,873 = the reference's count (its attention
block, GroupNorm + qkv + output projection, has the same 4C^2 + 6C parameters as MONAI's). GroupNorm eps is
1e-5 and the middle block uses 64-channel heads as in the reference. The compute matches as well: 446 GFLOP
forward+backward per 96x96 slice (``torch.utils.flop_counter``; benchmarks/diffusion.py).

``ConditionalDDPM`` joins that denoiser with the conditioning encoder (``ConditioningEncoder``: the
project's ResNet backbone + a 128-d linear head) and optionally works on a pixel-unshuffled image (the
CPU demo profile). ``forward(x, timesteps, context)`` takes the clean conditioning image as ``context``,
so MONAI's ``DiffusionInferer`` (mode ``"crossattn"``) and ``DiffusionPrepareBatch(condition_name="image")``
drive it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock, get_timestep_embedding
from torch import nn

from ..utils import from_diffusion_range
from .backbone import backbone_channels, resnet_backbone

__all__ = [
    "ScaleShiftResnetBlock",
    "FiLMDiffusionUNet",
    "ConditioningEncoder",
    "ConditionalDDPM",
    "load_backbone_state",
]


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
        film = film.reshape(*film.shape, *([1] * self.spatial_dims))
        scale, shift = film.chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.nonlinearity(h))
        return self.skip_connection(x) + h


def _swap_resnet_blocks(module: nn.Module, temb_channels: int, norm_num_groups: int, norm_eps: float) -> None:
    """Replace every ``DiffusionUNetResnetBlock`` under ``module`` by a ``ScaleShiftResnetBlock`` of the same shape."""
    for name, child in list(module.named_children()):
        if isinstance(child, DiffusionUNetResnetBlock) and not isinstance(child, ScaleShiftResnetBlock):
            block = ScaleShiftResnetBlock(
                spatial_dims=child.spatial_dims,
                in_channels=child.channels,
                temb_channels=temb_channels,
                out_channels=child.out_channels,
                up=child.up,
                down=child.down,
                norm_num_groups=norm_num_groups,
                norm_eps=norm_eps,
            )
            setattr(module, name, block)
        else:
            _swap_resnet_blocks(child, temb_channels, norm_num_groups, norm_eps)


def _default_groups(channels: Sequence[int]) -> int:
    """The largest of 32, 16, 8, 4, 2, 1 that divides every channel count."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in channels))


class FiLMDiffusionUNet(DiffusionModelUNet):
    """MONAI's diffusion U-Net with scale-shift residual blocks and an optional continuous condition.

    The condition (B, cond_dim) goes through a 2-layer MLP to the timestep-embedding width and is
    concatenated to the timestep embedding (so the blocks read a ``2 * 4 * channels[0]`` embedding).
    No attention at the levels; MONAI's middle block keeps its self-attention.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (128, 256, 256),
        num_res_blocks: Sequence[int] | int = 3,
        cond_dim: int | None = 128,
        norm_num_groups: int | None = None,
        norm_eps: float = 1e-5,
        num_head_channels: int = 64,
        use_flash_attention: bool = True,
    ) -> None:
        channels = tuple(int(c) for c in channels)
        norm_num_groups = norm_num_groups or _default_groups(channels)
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            channels=channels,
            attention_levels=(False,) * len(channels),
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            resblock_updown=True,
            num_head_channels=min(num_head_channels, channels[-1]),
            use_flash_attention=use_flash_attention,
        )
        time_embed_dim = channels[0] * 4
        self.cond_dim = cond_dim
        self.cond_embed: nn.Module | None = None
        if cond_dim:
            self.cond_embed = nn.Sequential(
                nn.Linear(cond_dim, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
            )
        emb_dim = 2 * time_embed_dim if cond_dim else time_embed_dim
        _swap_resnet_blocks(self, emb_dim, norm_num_groups, norm_eps)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
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
    if isinstance(state, dict) and len(state) == 1:
        (inner,) = state.values()
        if isinstance(inner, dict):
            state = inner
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
        state = load_backbone_state(path)
        expected = self.backbone.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"Encoder checkpoint {path} does not match the ResNet backbone: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})."
            )
        wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
        if wrong:
            raise ValueError(
                f"Encoder checkpoint {path} has tensors of the wrong shape for this backbone "
                f"(e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(expected[wrong[0]].shape)}); "
                "check encoder_depth."
            )
        self.backbone.load_state_dict(state, strict=True)


class ConditionalDDPM(nn.Module):
    """Conditional DDPM denoiser: ``FiLMDiffusionUNet`` conditioned on ``ConditioningEncoder(context)``.

    Args:
        channels: U-Net channels per level (paper: (128, 256, 256)).
        num_res_blocks: residual blocks per level (paper: 3).
        cond_dim: width of the encoder's embedding (paper: 128).
        encoder_depth: ResNet depth of the conditioning encoder (paper: 50).
        encoder_drop_path: stochastic-depth rate of the conditioning ResNet (reference: 0.05; off in eval mode).
        encoder_ckpt: backbone ``state_dict`` of the pretrained contrastive encoder to start from.
        conditioning: ``False``/``"none"`` gives a plain DDPM that ignores ``context`` (no encoder).
        pixel_unshuffle: factor ``r`` to run the U-Net on an ``r x r`` pixel-unshuffled image
            (``r**2`` channels at ``1/r`` resolution) and shuffle the output back; 1 = off.
        in_channels, out_channels: image channels.
        norm_num_groups: GroupNorm groups (default: 32, or the largest power of two dividing all channels).
        num_head_channels: channels per head of the middle-block attention.
        use_flash_attention: use ``torch.nn.functional.scaled_dot_product_attention`` in the attention.
    """

    def __init__(
        self,
        channels: Sequence[int] = (128, 256, 256),
        num_res_blocks: Sequence[int] | int = 3,
        cond_dim: int = 128,
        encoder_depth: int = 50,
        encoder_drop_path: float = 0.0,
        encoder_ckpt: str | Path | None = None,
        conditioning: bool | str = True,
        pixel_unshuffle: int = 1,
        in_channels: int = 1,
        out_channels: int = 1,
        norm_num_groups: int | None = None,
        num_head_channels: int = 64,
        use_flash_attention: bool = True,
    ) -> None:
        super().__init__()
        self.conditioning = _parse_conditioning(conditioning)
        self.pixel_unshuffle = int(pixel_unshuffle)
        if self.pixel_unshuffle < 1:
            raise ValueError(f"pixel_unshuffle must be >= 1, got {pixel_unshuffle}.")
        r2 = self.pixel_unshuffle**2
        self.unet = FiLMDiffusionUNet(
            spatial_dims=2,
            in_channels=in_channels * r2,
            out_channels=out_channels * r2,
            channels=channels,
            num_res_blocks=num_res_blocks,
            cond_dim=cond_dim if self.conditioning else None,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            use_flash_attention=use_flash_attention,
        )
        self.encoder: ConditioningEncoder | None = None
        if self.conditioning:
            self.encoder = ConditioningEncoder(
                depth=encoder_depth, cond_dim=cond_dim, in_channels=in_channels, drop_path=encoder_drop_path
            )
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

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the clean image from ``x`` (B, C, H, W) at ``timesteps`` (B,).

        ``context`` is the clean conditioning image fed to the encoder; alternatively pass its
        embedding directly as ``cond`` (B, cond_dim). Both are ignored when conditioning is off.
        """
        h, w = x.shape[-2:]
        if h % self.size_divisor or w % self.size_divisor:
            raise ValueError(
                f"Input size {h}x{w} must be a multiple of {self.size_divisor}; pad it "
                "(ReconstructionInferer does this)."
            )
        if self.encoder is not None:
            if cond is None:
                if context is None:
                    raise ValueError("ConditionalDDPM is conditioned: pass the conditioning image as `context`.")
                cond = self.encode(context)
        else:
            cond = None
        r = self.pixel_unshuffle
        if r > 1:
            x = F.pixel_unshuffle(x, r)
        out = self.unet(x, timesteps, cond)
        if r > 1:
            out = F.pixel_shuffle(out, r)
        return out


def _parse_conditioning(conditioning: bool | str | None) -> bool:
    if isinstance(conditioning, str):
        value = conditioning.strip().lower()
        if value in ("none", "false", "off", "no", ""):
            return False
        if value in ("true", "encoder", "feature", "features", "on", "yes"):
            return True
        raise ValueError(f"conditioning must be True/False or 'none', got {conditioning!r}.")
    return bool(conditioning)
