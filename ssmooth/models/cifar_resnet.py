"""CIFAR ResNet of He et al. (2016, section 4.2) as used by Cohen et al. and MACER (``cifar_resnet110``).

Three stages of basic blocks (two 3x3 convs) with 16, 32, 64 channels, n blocks each, depth = 6n + 2. Like the
reference code (bearpaw/pytorch-classification via locuslab/smoothing), depth 110 also uses BASIC blocks
(n = 18, about 1.7M parameters), shortcuts change shape with a strided 1x1 conv + BN, and convs start from
He-normal weights (fan_out). Global average pooling instead of a fixed 8x8 pool keeps other image sizes working.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ssmooth.models import register_model

DEPTHS = (20, 56, 110)


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"cifar_resnet depth must be one of {DEPTHS}, got {depth}")
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True)
        )
        stages, channels = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, width, stride))
                channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))  # flatten, not view: also valid for channels_last tensors


@register_model("cifar_resnet")
def cifar_resnet(*, num_classes: int, input_shape: Sequence[int], depth: int = 110) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(f"cifar_resnet takes images [C, H, W], got input_shape {tuple(input_shape)}")
    return CifarResNet(int(depth), num_classes, in_channels=int(input_shape[0]))
