"""Sparse masked encoder (SparK-style) and the target-invariant encoder built on it.

A slice is cut into 32x32 patches, most of them hidden; the wrapped ``resnet_backbone`` (used as is, so its
``state_dict`` is the plain backbone's) runs so that hidden positions stay exactly zero at every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..utils import check_choice
from .backbone import backbone_channels, resnet_backbone

DOWNSAMPLE_RATIO = 32  # output stride of the backbone = side of one mask patch in pixels


def patch_grid(height: int, width: int) -> tuple[int, int]:
    """The patch grid of an image of ``height`` x ``width`` pixels; both must be divisible by 32."""
    if height % DOWNSAMPLE_RATIO or width % DOWNSAMPLE_RATIO or height <= 0 or width <= 0:
        raise ValueError(f"Sparse encoder input height and width must be positive multiples of {DOWNSAMPLE_RATIO}, "
                         f"got {height}x{width}.")
    return height // DOWNSAMPLE_RATIO, width // DOWNSAMPLE_RATIO


def random_patch_mask(batch_size: int, grid_size: tuple[int, int], mask_ratio: float = 0.65,
                      generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Random patch mask (B, 1, gh, gw), True = visible: ``round(gh * gw * (1 - mask_ratio))`` patches (at least
    one) per sample. The noise is drawn on ``generator``'s device when one is given (seedable), then moved."""
    grid_h, grid_w = grid_size
    keep = max(1, round(grid_h * grid_w * (1.0 - mask_ratio)))
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, grid_h * grid_w, generator=generator, device=noise_device)
    active = torch.zeros(batch_size, grid_h * grid_w, dtype=torch.bool, device=noise.device)
    active.scatter_(1, noise.argsort(dim=1)[:, :keep], True)
    return active.view(batch_size, 1, grid_h, grid_w).to(device if device is not None else noise.device)


def upsample_mask(active: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling of a patch mask (B, 1, gh, gw) to ``size``, an integer multiple of the grid."""
    return active.repeat_interleave(size[0] // active.shape[-2], -2).repeat_interleave(size[1] // active.shape[-1], -1)


class _MaskPyramid:
    """The visible-position mask of one forward pass at each feature resolution, cached per (dtype, size)."""

    def __init__(self, active: torch.Tensor):
        self.active = active
        counts = active.flatten(1).sum(dim=1)
        self.same_count = bool((counts == counts[0]).all())  # always so for ``random_patch_mask``
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def at(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mask (B, 1, H, W) at x's resolution in x's dtype, and the flat indices (B, K) of its visible
        positions when every sample has K of them (so batch norm can gather them), else None."""
        key = (x.dtype, tuple(x.shape[-2:]))
        if key not in self._cache:
            visible = upsample_mask(self.active, key[1])
            indices = None
            if self.same_count:
                flat = visible.flatten(1).to(torch.uint8)
                indices = flat.argsort(dim=1, descending=True, stable=True)[:, : int(flat[0].sum())]
            self._cache[key] = (visible.to(x.dtype), indices)
        return self._cache[key]


def masked_batch_norm(bn: _BatchNorm, x: torch.Tensor, mask: torch.Tensor,
                      indices: torch.Tensor | None = None) -> torch.Tensor:
    """``bn`` applied (and its statistics updated) as on the visible positions of ``x`` alone, zero at hidden ones.
    ``mask`` (B, 1, H, W) is in x's dtype; with ``indices`` (B, K) the visible values are gathered for the fused
    kernel, without them masked sums are used."""
    if not (bn.training or bn.running_mean is None):  # eval: a per-channel affine map, as the dense layer
        out = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return out.mul_(mask)
    update = bn.training and bn.track_running_stats  # as nn.BatchNorm2d: count the batch, pick the factor
    if update:
        bn.num_batches_tracked.add_(1)
    factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked) if update else 0.0
    running_mean, running_var = (bn.running_mean, bn.running_var) if update else (None, None)
    if indices is not None:
        flat = x.flatten(2)
        idx = indices.unsqueeze(1).expand(-1, x.shape[1], -1)
        visible = torch.gather(flat, 2, idx)  # (B, C, K): batch norm over B and K = visible positions
        normed = F.batch_norm(visible, running_mean, running_var, bn.weight, bn.bias, True, factor, bn.eps)
        return torch.zeros_like(flat, dtype=normed.dtype).scatter_(2, idx, normed).view_as(x)
    count = mask.sum()  # visible positions over batch and space, the same for every channel
    mean = (x * mask).sum((0, 2, 3)) / count
    centred = (x - mean.view(1, -1, 1, 1)) * mask
    var = (centred * centred).sum((0, 2, 3)) / count
    inv_std = torch.rsqrt(var + bn.eps)
    scale = inv_std if bn.weight is None else inv_std * bn.weight
    out = centred * scale.view(1, -1, 1, 1)
    if bn.bias is not None:
        out = out + bn.bias.view(1, -1, 1, 1) * mask
    if update:
        with torch.no_grad():
            unbiased = var * (count / (count - 1).clamp(min=1))
            running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)
    return out


class SparseEncoder(nn.Module):
    """``resnet_backbone(depth, drop_path=...)`` run sparsely: hidden 32x32 patches stay exactly zero at every layer
    and batch-norm statistics come from visible positions only (with the backbone's own batch-norm modules)."""

    def __init__(self, depth: int = 50, in_channels: int = 1, drop_path: float = 0.0):
        super().__init__()
        self.backbone = resnet_backbone(depth, in_channels=in_channels, drop_path=drop_path)
        self.out_channels = backbone_channels(depth)

    def forward(self, x: torch.Tensor, active: torch.Tensor, mask_input: bool = True) -> list[torch.Tensor]:
        """The four pyramid levels (strides 4, 8, 16, 32) of ``x`` under the patch mask ``active`` (B, 1, H/32, W/32),
        True = visible. ``mask_input``: zero the hidden input patches first (masked view), else the intact view."""
        grid = patch_grid(*x.shape[-2:])
        if tuple(active.shape) != (x.shape[0], 1, *grid):
            raise ValueError(f"Patch mask must have shape ({x.shape[0]}, 1, {grid[0]}, {grid[1]}) for input "
                             f"{tuple(x.shape)}, got {tuple(active.shape)}.")
        active = active.to(device=x.device, dtype=torch.bool)
        masks = _MaskPyramid(active)
        if mask_input:
            x = torch.where(upsample_mask(active, tuple(x.shape[-2:])), x, x.new_zeros(()))
        net = self.backbone
        x = net.act(self._conv_bn(net.conv1, net.bn1, x, masks))
        if not net.no_max_pool:
            x = net.maxpool(x)
            x = x.mul_(masks.at(x)[0])
        features = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in layer:
                x = self._block(block, x, masks)
            features.append(x)
        return features

    @staticmethod
    def _conv_bn(conv: nn.Module, bn: _BatchNorm, x: torch.Tensor, masks: _MaskPyramid) -> torch.Tensor:
        out = conv(x)  # in place is safe: a convolution's backward needs its input, not its output
        mask, indices = masks.at(out)
        return masked_batch_norm(bn, out.mul_(mask), mask, indices)

    def _block(self, block: nn.Module, x: torch.Tensor, masks: _MaskPyramid) -> torch.Tensor:
        """One residual block of the backbone (basic or bottleneck, conv + batch-norm shortcut), run sparsely."""
        pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
        if hasattr(block, "conv3"):
            pairs.append((block.conv3, block.bn3))
        out = x
        for conv, bn in pairs[:-1]:
            out = block.act(self._conv_bn(conv, bn, out, masks))
        out = self._conv_bn(*pairs[-1], out, masks)
        residual = x if block.downsample is None else self._conv_bn(*block.downsample, x, masks)
        return block.act(block.drop_path(out) + residual)

    @staticmethod
    def pool(deepest: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Global average of the deepest level (B, C, gh, gw) over its visible positions only -> (B, C)."""
        active = active.to(deepest.dtype)
        count = active.sum(dim=(1, 2, 3)).clamp(min=1).unsqueeze(1)
        return (deepest * active).sum(dim=(2, 3)) / count


def _up_block(cin: int, cout: int, spark: bool) -> nn.Sequential:
    """2x upsampling block. Light: transposed conv (kernel 2), 3x3 conv + BN + ReLU. SparK: transposed conv
    (kernel 4), 3x3 conv + BN + ReLU6, 3x3 conv + BN."""
    if not spark:
        up = nn.ConvTranspose2d(cin, cout, kernel_size=2, stride=2)
        return nn.Sequential(up, nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))
    return nn.Sequential(nn.ConvTranspose2d(cin, cin, kernel_size=4, stride=2, padding=1),
                         nn.Conv2d(cin, cin, 3, padding=1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(inplace=True),
                         nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))


class _PyramidDecoder(nn.Module):
    """U-Net-like decoder of a sparse pyramid: at each level the hidden positions are filled with a mask token
    and the level is projected to the decoder width of its stride and added before the up block of that stride.
    Widths halve from ``width`` at stride 32 to ``width / 32`` at full resolution."""

    spark = False

    def __init__(self, encoder_channels: list[int], width: int = 512, out_channels: int = 1):
        super().__init__()
        if width < 32 or width % 32:
            raise ValueError(f"Decoder width must be a positive multiple of 32, got {width}.")
        widths = [width // 2**i for i in range(6)]  # strides 32, 16, 8, 4, 2, 1
        self.norms = nn.ModuleList([nn.BatchNorm2d(c) for c in encoder_channels]) if self.spark else None
        self.mask_tokens = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in encoder_channels])
        if not self.spark:  # the light decoder draws its tokens first (the order fixes the seeded initialisation)
            self._init_tokens()
        self.projections = nn.ModuleList()  # level l (stride 4 * 2**l) to the decoder width at that stride
        for level, c in enumerate(encoder_channels):
            k = 3 if self.spark and level < 3 else 1
            self.projections.append(nn.Conv2d(c, widths[3 - level], kernel_size=k, padding=k // 2))
        self.up_blocks = nn.ModuleList([_up_block(widths[i], widths[i + 1], self.spark) for i in range(5)])
        self.head = nn.Conv2d(widths[5], out_channels, kernel_size=1)
        if self.spark:  # SparK's initialisation: truncated normal convs, Kaiming transposed convs
            self._init_tokens()
            for m in [*self.up_blocks.modules(), self.head]:
                if isinstance(m, nn.Conv2d):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                elif isinstance(m, nn.ConvTranspose2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _init_tokens(self) -> None:
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02, a=-0.02, b=0.02)

    def forward(self, features: list[torch.Tensor], visible: list[torch.Tensor]) -> torch.Tensor:
        """Decode the pyramid; ``visible[l]`` is the bool mask (B, 1, h_l, w_l) of level l."""
        x = None
        for i, block in enumerate(self.up_blocks):
            level = 3 - i
            if level >= 0:
                feat, mask = features[level], visible[level]
                if self.norms is not None:
                    feat = masked_batch_norm(self.norms[level], feat, mask.to(feat.dtype))
                skip = self.projections[level](torch.where(mask, feat, self.mask_tokens[level].to(feat.dtype)))
                x = skip if x is None else x + skip
            x = block(x)
        return self.head(x)


class LightDecoder(_PyramidDecoder):
    """The project's decoder: 1x1 projections, light up blocks (transposed conv kernel 2, one conv block)."""


class SparKDecoder(_PyramidDecoder):
    """The reference (SparK) decoder: each level is first batch-normalised over its visible positions; 1x1
    projection at the deepest level, 3x3 elsewhere; SparK's up blocks and initialisation."""

    spark = True


class TargetInvariantEncoder(nn.Module):
    """Sparse masked encoder + decoder (``"light"`` or the reference's ``"spark"``); ``drop_path``: the ResNet's
    stochastic depth (reference 0.05). ``forward`` draws a patch mask (0.65: 3 of 9 patches visible at 96x96),
    encodes both views with it and returns ``reconstruction`` (of the masked view), ``patch_mask`` (True = visible),
    ``z_masked`` and ``z_intact`` (B, C): the deepest features averaged over visible positions."""

    def __init__(self, depth: int = 50, in_channels: int = 1, mask_ratio: float = 0.65, decoder_width: int = 512,
                 decoder: str = "light", drop_path: float = 0.0):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        decoders = {"light": LightDecoder, "spark": SparKDecoder}
        decoder_class = decoders[check_choice("decoder", decoder, tuple(decoders))]
        self.mask_ratio = mask_ratio
        self.encoder = SparseEncoder(depth, in_channels=in_channels, drop_path=drop_path)
        self.decoder = decoder_class(self.encoder.out_channels, width=decoder_width, out_channels=in_channels)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        x = x.as_tensor() if hasattr(x, "as_tensor") else x  # MetaTensor -> plain tensor
        active = random_patch_mask(x.shape[0], patch_grid(*x.shape[-2:]), self.mask_ratio, generator, x.device)
        masked = self.encoder(x, active, mask_input=True)
        intact = self.encoder(x, active, mask_input=False)
        visible = [upsample_mask(active, tuple(f.shape[-2:])) for f in masked]
        return {"reconstruction": self.decoder(masked, visible), "patch_mask": active,
                "z_masked": SparseEncoder.pool(masked[-1], active), "z_intact": SparseEncoder.pool(intact[-1], active)}
