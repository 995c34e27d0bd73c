"""The 2D ResNet backbone shared by the contrastive encoder and the DDPM's conditioning encoder.

MONAI's ResNet is used with the standard ImageNet stem (7x7 conv, stride 2, then max-pool), so the
output stride is 32 like the reference's ResNet-50; MONAI's default stem (stride 1) costs ~4x the FLOPs.
The backbone's ``state_dict`` is the exchange format between the two bundles (``models/model.pt``).
"""

from __future__ import annotations

import torch
from monai.networks.nets import ResNet

RESNET_LAYERS = {10: ("basic", [1, 1, 1, 1]), 18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3])}
BLOCK_INPLANES = [64, 128, 256, 512]


def resnet_backbone(depth: int = 50, in_channels: int = 1) -> ResNet:
    """A 2D ResNet-{10,18,34,50} without classification head (``feed_forward=False``), output stride 32."""
    if depth not in RESNET_LAYERS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYERS)}, got {depth}.")
    block, layers = RESNET_LAYERS[depth]
    return ResNet(
        block=block,
        layers=layers,
        block_inplanes=BLOCK_INPLANES,
        spatial_dims=2,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=2,
        feed_forward=False,
        bias_downsample=False,
    )


def backbone_channels(depth: int = 50) -> list[int]:
    """Channels of the four pyramid levels (strides 4, 8, 16, 32) of ``resnet_backbone(depth)``."""
    expansion = 4 if RESNET_LAYERS[depth][0] == "bottleneck" else 1
    return [c * expansion for c in BLOCK_INPLANES]


def backbone_pyramid(backbone: ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The four feature maps of ``backbone`` for ``x`` (B, C, H, W), at strides 4, 8, 16 and 32."""
    x = backbone.maxpool(backbone.act(backbone.bn1(backbone.conv1(x))))
    features = []
    for layer in (backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4):
        x = layer(x)
        features.append(x)
    return features
