"""Sparse masked encoder (SparK-style) and the target-invariant encoder built on it.

A slice is cut into 32x32 patches (the backbone's downsample ratio), most of them are hidden, and the
wrapped ResNet (``resnet_backbone``, unchanged parameter names) is run so that hidden positions stay
exactly zero after every conv / norm / pool and batch-norm statistics come from visible positions only.
The backbone module itself is used as is, so its ``state_dict`` is the plain backbone's (``models/model.pt``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..utils import check_choice
from .backbone import backbone_channels, resnet_backbone

DOWNSAMPLE_RATIO = 32  # output stride of the backbone = side of one mask patch in pixels

# keys of the dict returned by ``TargetInvariantEncoder.forward`` (read by ``SparKContrastiveLoss``)
RECONSTRUCTION = "reconstruction"
PATCH_MASK = "patch_mask"
Z_MASKED = "z_masked"
Z_INTACT = "z_intact"


def num_visible_patches(num_patches: int, mask_ratio: float) -> int:
    """Patches kept visible per sample: ``round(num_patches * (1 - mask_ratio))``, at least one."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
    return max(1, round(num_patches * (1.0 - mask_ratio)))


def patch_grid(height: int, width: int) -> tuple[int, int]:
    """The patch grid of an image of ``height`` x ``width`` pixels; both must be divisible by 32."""
    if height % DOWNSAMPLE_RATIO or width % DOWNSAMPLE_RATIO or height <= 0 or width <= 0:
        raise ValueError(
            f"Sparse encoder input height and width must be positive multiples of {DOWNSAMPLE_RATIO}, "
            f"got {height}x{width}."
        )
    return height // DOWNSAMPLE_RATIO, width // DOWNSAMPLE_RATIO


def random_patch_mask(
    batch_size: int,
    grid_size: tuple[int, int],
    mask_ratio: float = 0.65,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random patch mask (B, 1, gh, gw), True = visible, with the same number of visible patches per sample.

    The noise is drawn on ``generator``'s device when a generator is given (seedable), then moved to ``device``.
    """
    grid_h, grid_w = grid_size
    num_patches = grid_h * grid_w
    keep = num_visible_patches(num_patches, mask_ratio)
    noise_device = generator.device if generator is not None else device
    noise = torch.rand(batch_size, num_patches, generator=generator, device=noise_device)
    visible_idx = noise.argsort(dim=1)[:, :keep]
    active = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=noise.device)
    active.scatter_(1, visible_idx, True)
    return active.view(batch_size, 1, grid_h, grid_w).to(device if device is not None else noise.device)


def upsample_mask(active: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling of a patch mask (B, 1, gh, gw) to ``size``, an integer multiple of the grid."""
    grid_h, grid_w = active.shape[-2:]
    height, width = size
    if height % grid_h or width % grid_w:
        raise ValueError(f"Mask of grid {grid_h}x{grid_w} cannot be upsampled to {height}x{width}.")
    return active.repeat_interleave(height // grid_h, dim=-2).repeat_interleave(width // grid_w, dim=-1)


def _as_patch_mask(active: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Check a patch mask against the input ``x`` and return it as bool (B, 1, gh, gw) on x's device."""
    grid = patch_grid(*x.shape[-2:])
    if active.dim() == 3:
        active = active.unsqueeze(1)
    if active.dim() != 4 or active.shape[0] != x.shape[0] or active.shape[1] != 1 or tuple(active.shape[-2:]) != grid:
        raise ValueError(
            f"Patch mask must have shape ({x.shape[0]}, 1, {grid[0]}, {grid[1]}) for input {tuple(x.shape)}, "
            f"got {tuple(active.shape)}."
        )
    return active.to(device=x.device, dtype=torch.bool)


class _MaskPyramid:
    """The visible-position mask of one forward pass, upsampled on demand to each feature resolution.

    When every sample has the same number of visible patches (always so for ``random_patch_mask``), it
    also gives the flat indices (B, K) of the visible positions, so batch norm can gather them.
    """

    def __init__(self, active: torch.Tensor):
        self.active = active
        counts = active.flatten(1).sum(dim=1)
        self.visible_patches = int(counts[0]) if bool((counts == counts[0]).all()) else None
        self._cache: dict[tuple, torch.Tensor | None] = {}

    def bool_at(self, size: tuple[int, int]) -> torch.Tensor:
        key = ("bool", tuple(size))
        if key not in self._cache:
            self._cache[key] = upsample_mask(self.active, tuple(size))
        return self._cache[key]

    def like(self, x: torch.Tensor) -> torch.Tensor:
        """The mask (B, 1, H, W) at the resolution of ``x``, in x's dtype, for multiplication."""
        key = (x.dtype, tuple(x.shape[-2:]))
        if key not in self._cache:
            self._cache[key] = self.bool_at(tuple(x.shape[-2:])).to(x.dtype)
        return self._cache[key]

    def indices(self, x: torch.Tensor) -> torch.Tensor | None:
        """Flat indices (B, K) of the visible positions at x's resolution; None if counts differ per sample."""
        if self.visible_patches is None:
            return None
        size = tuple(x.shape[-2:])
        key = ("indices", size)
        if key not in self._cache:
            grid_h, grid_w = self.active.shape[-2:]
            k = self.visible_patches * (size[0] // grid_h) * (size[1] // grid_w)
            flat = self.bool_at(size).flatten(1).to(torch.uint8)
            self._cache[key] = flat.argsort(dim=1, descending=True, stable=True)[:, :k]
        return self._cache[key]


def _momentum_and_count(bn: _BatchNorm) -> float:
    """Advance ``bn``'s batch counter and return the running-average factor, as ``nn.BatchNorm2d`` does."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    return factor


def masked_batch_norm(
    bn: _BatchNorm, x: torch.Tensor, mask: torch.Tensor, indices: torch.Tensor | None = None
) -> torch.Tensor:
    """Batch norm of ``x`` (B, C, H, W) with statistics over visible positions only; zero at hidden ones.

    Uses and updates ``bn``'s own weight, bias, running statistics and counter exactly like
    ``nn.BatchNorm2d`` would on the visible positions alone. ``mask`` is the visible mask (B, 1, H, W)
    in x's dtype. ``indices`` (B, K), the flat visible positions when every sample has K of them, lets the
    visible values be gathered and normalised by the fused kernel; without it masked sums are used.
    """
    if not (bn.training or bn.running_mean is None):  # eval: a per-channel affine map, as the dense layer
        out = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        return out.mul_(mask)
    factor = _momentum_and_count(bn)
    update = bn.training and bn.track_running_stats
    running_mean = bn.running_mean if update else None
    running_var = bn.running_var if update else None
    if indices is not None:
        batch, channels = x.shape[:2]
        flat = x.reshape(batch, channels, -1)
        idx = indices.unsqueeze(1).expand(-1, channels, -1)
        visible = torch.gather(flat, 2, idx)  # (B, C, K): batch norm over B and K = visible positions
        normed = F.batch_norm(visible, running_mean, running_var, bn.weight, bn.bias, True, factor, bn.eps)
        return torch.zeros_like(flat, dtype=normed.dtype).scatter_(2, idx, normed).view_as(x)
    dims = (0, 2, 3)
    count = mask.sum()  # visible positions over batch and space, the same for every channel
    mean = (x * mask).sum(dims) / count
    centred = (x - mean.view(1, -1, 1, 1)) * mask
    var = (centred * centred).sum(dims) / count
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
    """``resnet_backbone(depth, drop_path=...)`` run sparsely: hidden 32x32 patches stay exactly zero at every layer.

    ``forward(x, active)`` returns the four pyramid levels (strides 4, 8, 16, 32); ``active`` is the
    patch mask (B, 1, H/32, W/32), True = visible. Batch-norm statistics are taken over visible
    positions only, with the backbone's own batch-norm parameters and running statistics.
    """

    def __init__(self, depth: int = 50, in_channels: int = 1, drop_path: float = 0.0):
        super().__init__()
        self.depth = depth
        self.in_channels = in_channels
        self.backbone = resnet_backbone(depth, in_channels=in_channels, drop_path=drop_path)
        self.out_channels = backbone_channels(depth)

    def forward(self, x: torch.Tensor, active: torch.Tensor, mask_input: bool = True) -> list[torch.Tensor]:
        """Pyramid of ``x`` (B, C, H, W) under patch mask ``active``.

        ``mask_input=True`` zeroes the hidden patches of the input first (the masked view);
        ``mask_input=False`` feeds the intact slice, so hidden content can reach visible positions only
        through the first convolution's receptive field (the intact view).
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseEncoder expects input (B, {self.in_channels}, H, W), got {tuple(x.shape)}.")
        masks = _MaskPyramid(_as_patch_mask(active, x))
        if mask_input:
            x = torch.where(masks.bool_at(tuple(x.shape[-2:])), x, x.new_zeros(()))
        net = self.backbone
        x = self._conv(net.conv1, x, masks)
        x = net.act(masked_batch_norm(net.bn1, x, masks.like(x), masks.indices(x)))
        if not net.no_max_pool:
            x = net.maxpool(x)
            x = x.mul_(masks.like(x))
        features = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in layer:
                x = self._block(block, x, masks)
            features.append(x)
        return features

    @staticmethod
    def _conv(conv: nn.Module, x: torch.Tensor, masks: _MaskPyramid) -> torch.Tensor:
        out = conv(x)  # in place is safe: a convolution's backward needs its input, not its output
        return out.mul_(masks.like(out))

    def _conv_bn(self, conv: nn.Module, bn: _BatchNorm, x: torch.Tensor, masks: _MaskPyramid) -> torch.Tensor:
        out = self._conv(conv, x, masks)
        return masked_batch_norm(bn, out, masks.like(out), masks.indices(out))

    def _block(self, block: nn.Module, x: torch.Tensor, masks: _MaskPyramid) -> torch.Tensor:
        """One residual block of MONAI's ResNet, with the sparse conv / norm in place of the dense ones."""
        if isinstance(block, ResNetBottleneck):
            out = block.act(self._conv_bn(block.conv1, block.bn1, x, masks))
            out = block.act(self._conv_bn(block.conv2, block.bn2, out, masks))
            out = self._conv_bn(block.conv3, block.bn3, out, masks)
        elif isinstance(block, ResNetBlock):
            out = block.act(self._conv_bn(block.conv1, block.bn1, x, masks))
            out = self._conv_bn(block.conv2, block.bn2, out, masks)
        else:
            raise TypeError(f"SparseEncoder cannot run block type {type(block).__name__}.")
        residual = x
        if block.downsample is not None:
            if not (isinstance(block.downsample, nn.Sequential) and len(block.downsample) == 2):
                raise TypeError("SparseEncoder supports only the conv + batch-norm shortcut (shortcut_type 'B').")
            conv, bn = block.downsample
            residual = self._conv_bn(conv, bn, x, masks)
        return block.act(block.drop_path(out) + residual)

    @staticmethod
    def pool(deepest: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Global average of the deepest level (B, C, gh, gw) over its visible positions only -> (B, C)."""
        active = active.to(deepest.dtype)
        count = active.sum(dim=(1, 2, 3)).clamp(min=1).unsqueeze(1)
        return (deepest * active).sum(dim=(2, 3)) / count


class UpBlock(nn.Sequential):
    """2x transposed-conv upsampling followed by 3x3 conv, batch norm and ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class LightDecoder(nn.Module):
    """U-Net-like decoder of a sparse pyramid: mask tokens fill hidden positions, skips are added per level.

    Widths halve from ``width`` at stride 32 down to ``width / 32`` at full resolution.
    """

    def __init__(self, encoder_channels: list[int], width: int = 512, out_channels: int = 1):
        super().__init__()
        if width < 32 or width % 32:
            raise ValueError(f"Decoder width must be a positive multiple of 32, got {width}.")
        widths = [width // 2**i for i in range(6)]  # strides 32, 16, 8, 4, 2, 1
        self.mask_tokens = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in encoder_channels])
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02, a=-0.02, b=0.02)
        # pyramid level l (stride 4 * 2**l) is projected to the decoder width at that stride
        self.projections = nn.ModuleList(
            [nn.Conv2d(c, widths[3 - level], kernel_size=1) for level, c in enumerate(encoder_channels)]
        )
        self.up_blocks = nn.ModuleList([UpBlock(widths[i], widths[i + 1]) for i in range(5)])
        self.head = nn.Conv2d(widths[5], out_channels, kernel_size=1)

    def forward(self, features: list[torch.Tensor], visible: list[torch.Tensor]) -> torch.Tensor:
        """Decode the pyramid; ``visible[l]`` is the bool mask (B, 1, h_l, w_l) of level l."""
        dense = [
            torch.where(mask, feat, token.to(feat.dtype))
            for feat, mask, token in zip(features, visible, self.mask_tokens)
        ]
        x = self.projections[3](dense[3])
        for i, block in enumerate(self.up_blocks):
            x = block(x)
            level = 2 - i
            if level >= 0:
                x = x + self.projections[level](dense[level])
        return self.head(x)


class SparKUpBlock(nn.Sequential):
    """SparK's decoder block: 2x transposed conv (kernel 4), 3x3 conv + BN + ReLU6, 3x3 conv + BN."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.ConvTranspose2d(in_channels, in_channels, kernel_size=4, stride=2, padding=1),
            nn.Conv2d(in_channels, in_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU6(inplace=True),
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )


class SparKDecoder(nn.Module):
    """The reference (SparK) decoder: each pyramid level is batch-normalised over its visible positions, its
    hidden positions are filled with a mask token, and it is projected (1x1 at the deepest level, 3x3 elsewhere)
    to the decoder width of its stride and added before the up block of that stride. Widths halve from ``width``
    at stride 32 to ``width / 32``; SparK's initialisation (truncated normal convs, Kaiming transposed convs).
    """

    def __init__(self, encoder_channels: list[int], width: int = 512, out_channels: int = 1):
        super().__init__()
        if width < 32 or width % 32:
            raise ValueError(f"Decoder width must be a positive multiple of 32, got {width}.")
        widths = [width // 2**i for i in range(6)]  # strides 32, 16, 8, 4, 2, 1
        self.norms = nn.ModuleList([nn.BatchNorm2d(c) for c in encoder_channels])
        self.mask_tokens = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in encoder_channels])
        self.projections = nn.ModuleList(
            [
                nn.Conv2d(c, widths[3 - level], kernel_size=1 if level == 3 else 3, padding=0 if level == 3 else 1)
                for level, c in enumerate(encoder_channels)
            ]
        )
        self.up_blocks = nn.ModuleList([SparKUpBlock(widths[i], widths[i + 1]) for i in range(5)])
        self.head = nn.Conv2d(widths[5], out_channels, kernel_size=1)
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02, a=-0.02, b=0.02)
        for m in [*self.up_blocks.modules(), self.head]:
            if isinstance(m, nn.Conv2d):
                nn.init.trunc_normal_(m.weight, std=0.02)
            elif isinstance(m, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, features: list[torch.Tensor], visible: list[torch.Tensor]) -> torch.Tensor:
        """Decode the pyramid; ``visible[l]`` is the bool mask (B, 1, h_l, w_l) of level l."""
        x = 0
        for i, block in enumerate(self.up_blocks):
            level = 3 - i
            if level >= 0:
                feat, mask = features[level], visible[level]
                normed = masked_batch_norm(self.norms[level], feat, mask.to(feat.dtype))
                dense = torch.where(mask, normed, self.mask_tokens[level].to(feat.dtype))
                x = x + self.projections[level](dense)
            x = block(x)
        return self.head(x)


DECODERS = {"light": LightDecoder, "spark": SparKDecoder}


class TargetInvariantEncoder(nn.Module):
    """Sparse masked encoder + decoder, with pooled embeddings of the masked and of the intact view.

    ``decoder``: ``"light"`` (``LightDecoder``) or ``"spark"`` (``SparKDecoder``, the reference's);
    ``drop_path``: stochastic depth of the ResNet (reference 0.05), inactive in eval mode.

    ``forward(x, generator=None)`` draws a patch mask (mask ratio 0.65: 3 of 9 patches visible at 96x96),
    encodes the masked view and the intact view with the same sparse encoder and the same mask, decodes
    the masked view to a full-resolution reconstruction and returns a dict with keys
    ``reconstruction`` (B, 1, H, W), ``patch_mask`` (B, 1, H/32, W/32, True = visible),
    ``z_masked`` and ``z_intact`` (B, C): the deepest features averaged over visible positions only.
    """

    def __init__(self, depth: int = 50, in_channels: int = 1, mask_ratio: float = 0.65, decoder_width: int = 512,
                 decoder: str = "light", drop_path: float = 0.0):
        super().__init__()
        num_visible_patches(1, mask_ratio)  # validates the ratio
        decoder_class = DECODERS[check_choice("decoder", decoder, tuple(DECODERS))]
        self.mask_ratio = mask_ratio
        self.encoder = SparseEncoder(depth, in_channels=in_channels, drop_path=drop_path)
        self.decoder = decoder_class(self.encoder.out_channels, width=decoder_width, out_channels=in_channels)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, active: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        x = x.as_tensor() if hasattr(x, "as_tensor") else x  # MetaTensor -> plain tensor
        if active is None:
            active = random_patch_mask(x.shape[0], patch_grid(*x.shape[-2:]), self.mask_ratio, generator, x.device)
        active = _as_patch_mask(active, x)
        masked = self.encoder(x, active, mask_input=True)
        intact = self.encoder(x, active, mask_input=False)
        visible = [upsample_mask(active, tuple(f.shape[-2:])) for f in masked]
        return {
            RECONSTRUCTION: self.decoder(masked, visible),
            PATCH_MASK: active,
            Z_MASKED: SparseEncoder.pool(masked[-1], active),
            Z_INTACT: SparseEncoder.pool(intact[-1], active),
        }

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Dense embedding (B, C) of whole slices: every patch visible, i.e. the plain backbone's pooled output."""
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        active = torch.ones(x.shape[0], 1, *patch_grid(*x.shape[-2:]), dtype=torch.bool, device=x.device)
        return SparseEncoder.pool(self.encoder(x, active)[-1], active)

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict of the plain ``resnet_backbone`` (what ``models/model.pt`` holds)."""
        return self.encoder.backbone.state_dict()

    def load_backbone_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Load a plain ``resnet_backbone`` state dict into the wrapped backbone."""
        return self.encoder.backbone.load_state_dict(state_dict, strict=strict)
