"""Fully connected classifier: flatten, ``hidden`` ReLU layers, linear to the classes (the digits default)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from ssmooth.models import register_model


@register_model("mlp")
def mlp(*, num_classes: int, input_shape: Sequence[int], hidden: Sequence[int] = (256, 256)) -> nn.Module:
    widths = [math.prod(input_shape), *(int(h) for h in hidden)]
    if any(w < 1 for w in widths[1:]):
        raise ValueError(f"mlp hidden sizes must be positive, got {list(hidden)}")
    layers: list[nn.Module] = [nn.Flatten()]
    for width_in, width_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(width_in, width_out), nn.ReLU(inplace=True)]
    layers.append(nn.Linear(widths[-1], num_classes))
    return nn.Sequential(*layers)
