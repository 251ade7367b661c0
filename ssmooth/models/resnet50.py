"""ResNet-50 of He et al. (2016) as torchvision builds it: the ImageNet network of Cohen et al., SmoothAdv and
Consistency. Using torchvision's module keeps its parameter names, so published ImageNet weights load by name."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ssmooth.models import register_model


@register_model("resnet50")
def resnet50(*, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """torchvision's ``resnet50(weights=None)``: random initial weights, nothing downloaded. Global average
    pooling makes any image size of at least 32x32 work; the ImageNet protocol uses 224x224 crops."""
    from torchvision.models import resnet50 as torchvision_resnet50

    if len(input_shape) != 3 or int(input_shape[0]) != 3:
        raise ValueError(f"resnet50 takes RGB images [3, H, W], got input_shape {tuple(input_shape)}")
    return torchvision_resnet50(weights=None, num_classes=num_classes)
