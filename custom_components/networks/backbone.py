"""The 2D ResNet backbone shared by the contrastive encoder and the DDPM's conditioning encoder.

MONAI's ResNet is used with the standard ImageNet stem (7x7 conv, stride 2, then max-pool), so the
output stride is 32 like the reference's ResNet-50; MONAI's default stem (stride 1) costs ~4x the FLOPs.
The backbone's ``state_dict`` is the exchange format between the two bundles (``models/model.pt``).
Optional stochastic depth (``drop_path``, the reference's 0.05) adds parameter-free ``DropPath`` modules only,
so the ``state_dict`` keys do not depend on it.
"""

from __future__ import annotations

import torch
from monai.networks.layers import DropPath
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn


class DropPathBlock(ResNetBlock):
    """MONAI's basic residual block with stochastic depth on the residual branch (``drop_path``, set by
    ``resnet_backbone``; Identity = off)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        residual = x if self.downsample is None else self.downsample(x)
        return self.act(self.drop_path(out) + residual)


class DropPathBottleneck(ResNetBottleneck):
    """MONAI's bottleneck block with stochastic depth on the residual branch (as ``DropPathBlock``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.act(self.bn2(self.conv2(out)))))
        residual = x if self.downsample is None else self.downsample(x)
        return self.act(self.drop_path(out) + residual)


RESNET_LAYERS = {
    10: (DropPathBlock, [1, 1, 1, 1]),
    18: (DropPathBlock, [2, 2, 2, 2]),
    34: (DropPathBlock, [3, 4, 6, 3]),
    50: (DropPathBottleneck, [3, 4, 6, 3]),
}
BLOCK_INPLANES = [64, 128, 256, 512]


def resnet_backbone(depth: int = 50, in_channels: int = 1, drop_path: float = 0.0) -> ResNet:
    """A 2D ResNet-{10,18,34,50} without classification head (``feed_forward=False``), output stride 32.

    ``drop_path`` is the stochastic-depth rate of the last residual block; earlier blocks get rates rising
    linearly from 0 (timm's rule, which the reference ResNet-50 uses); 0 puts no ``DropPath`` anywhere.
    """
    if depth not in RESNET_LAYERS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYERS)}, got {depth}.")
    if not 0.0 <= drop_path < 1.0:
        raise ValueError(f"drop_path must be in [0, 1), got {drop_path}.")
    block, layers = RESNET_LAYERS[depth]
    net = ResNet(block=block, layers=layers, block_inplanes=BLOCK_INPLANES, n_input_channels=in_channels,
                 spatial_dims=2, conv1_t_size=7, conv1_t_stride=2, feed_forward=False, bias_downsample=False)
    blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
    for index, b in enumerate(blocks):
        rate = drop_path * index / (len(blocks) - 1)
        b.drop_path = DropPath(rate) if rate > 0 else nn.Identity()
    return net


def backbone_channels(depth: int = 50) -> list[int]:
    """Channels of the four pyramid levels (strides 4, 8, 16, 32) of ``resnet_backbone(depth)``."""
    expansion = RESNET_LAYERS[depth][0].expansion
    return [c * expansion for c in BLOCK_INPLANES]


def backbone_pyramid(backbone: ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The four feature maps of ``backbone`` for ``x`` (B, C, H, W), at strides 4, 8, 16 and 32."""
    x = backbone.maxpool(backbone.act(backbone.bn1(backbone.conv1(x))))
    features = []
    for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        x = layer(x)
        features.append(x)
    return features
