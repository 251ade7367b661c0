"""LeNet of the MNIST smoothing papers (Salman et al. 2019, MACER, Consistency), and a tiny
conv net registered for fast tests only."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ssmooth.models import register_model


@register_model("lenet")
def lenet(*, num_classes: int, input_shape: Sequence[int]) -> nn.Module:
    """conv 20@5x5, max-pool 2, conv 50@5x5, max-pool 2, fc 500, fc num_classes; ReLU, no padding.

    On 1x28x28 MNIST the flattened features are 50x4x4 = 800, as in the reference code; other sizes get the
    matching fc input.
    """
    channels, height, width = _image_shape("lenet", input_shape)
    # each stage: 5x5 valid convolution (-4), then 2x2 max-pool (floor halving)
    out_h, out_w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
    if out_h < 1 or out_w < 1:
        raise ValueError(f"lenet needs images of at least 16x16, got input_shape {tuple(input_shape)}")
    return nn.Sequential(
        nn.Conv2d(channels, 20, kernel_size=5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(20, 50, kernel_size=5),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * out_h * out_w, 500),
        nn.ReLU(inplace=True),
        nn.Linear(500, num_classes),
    )


@register_model("tiny")
def tiny(*, num_classes: int, input_shape: Sequence[int], width: int = 8) -> nn.Module:
    """Test-only: one 3x3 conv and a linear layer on 2x2 average-pooled features; any image size."""
    channels, _, _ = _image_shape("tiny", input_shape)
    return nn.Sequential(
        nn.Conv2d(channels, width, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(width * 4, num_classes),
    )


def _image_shape(model: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(f"{model} takes images [C, H, W], got input_shape {tuple(input_shape)}")
    channels, height, width = (int(s) for s in input_shape)
    return channels, height, width
