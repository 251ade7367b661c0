"""What every certification function checks on its arguments, so that a call from Python refuses what the
commands refuse: each check raises ValueError naming the argument, before any noise is drawn (the model's output
on its first forward batch).

Why each matters: votes are tallied at flat position ``point * num_classes + class``, so a model wider than
``num_classes`` puts its votes into the next point's counts; a NaN input or logit votes for whatever class argmax
returns on NaN; a level that is 0, negative or infinite makes the radius meaningless; an empty point set would
give a summary of nothing.
"""
from __future__ import annotations

import math
import warnings

import torch


def check_num_classes(num_classes, name: str = "num_classes") -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{name} must be an integer >= 1 (the model's number of outputs), got {num_classes!r}")
    return num_classes


def check_inputs(x, name: str = "x") -> None:
    """A non-empty tensor of finite values; a warning when they leave [0, 1], where noise is meant to be added
    (images given as 0..255, or already normalized: normalization is the model's first layer)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor [B, *shape] (or one image [C, H, W]), got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} holds no point (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"{name} must hold floats in [0, 1], got dtype {x.dtype}")
    low, high = torch.aminmax(x)  # NaN propagates into both: one pass and one sync for all three checks
    low, high = float(low), float(high)
    if not (math.isfinite(low) and math.isfinite(high)):
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten()
        raise ValueError(f"{name} holds NaN or infinite values (in {len(bad)} of its {x.shape[0]} points, the first "
                         f"at position {int(bad[0])})")
    if low < 0 or high > 1:
        warnings.warn(f"{name} holds values in {low:g}..{high:g}, outside [0, 1]: the noise levels and radii are in "
                      "units of [0, 1] pixels (divide 0..255 images by 255; leave normalization to the model)",
                      stacklevel=3)


def as_batch(x, name: str = "x") -> tuple[torch.Tensor, bool]:
    """``x`` as a batch, and whether it was one image: a [C, H, W] tensor is a batch of one."""
    if isinstance(x, torch.Tensor) and x.dim() == 3:
        return x.unsqueeze(0), True
    return x, False


def check_levels(sigma, name: str = "sigma") -> None:
    """Noise levels (a float, a sequence or a tensor) that are all finite and > 0; empty is refused."""
    values = torch.as_tensor(sigma, dtype=torch.float64).detach().reshape(-1)
    if values.numel() == 0:
        raise ValueError(f"{name} is empty: no noise level given")
    bad = values[~(torch.isfinite(values) & (values > 0))]
    if bad.numel():
        raise ValueError(f"{name} must be finite and > 0, got {bad[0].item()}")


def check_point_set(points, name: str = "points") -> None:
    if len(points) == 0:
        raise ValueError(f"{name} is empty: there is no point to certify")


class OutputCheck:
    """The model's outputs over a sampling loop: the width on the first batch (a shape, no cost; not checked
    when ``num_classes`` is None), non-finite
    values accumulated on the device and read once at the end (no sync per batch)."""

    def __init__(self, num_classes: int | None, device, name: str = "num_classes"):
        self.num_classes, self.name = num_classes, name
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.first = True

    def __call__(self, logits: torch.Tensor) -> None:
        if self.first:
            if logits.dim() != 2 or self.num_classes not in (None, logits.shape[1]):
                raise ValueError(f"{self.name}={self.num_classes}, but the model returns outputs of shape "
                                 f"{tuple(logits.shape)}: give the number of classes the model outputs")
            self.first = False
        self.bad |= ~torch.isfinite(logits).all()

    def finish(self) -> None:
        if bool(self.bad):
            raise ValueError("the model returned NaN or infinite logits on noisy inputs; no vote can be trusted "
                             "(check its weights, its inputs, and any fp16 overflow with autocast)")


def check_call(x, sigma, num_classes, *, levels_name: str = "sigma") -> tuple[torch.Tensor, bool]:
    """The checks of a certification function's arguments, in one call: ``(x as a batch, whether it was one
    image)``."""
    x, single = as_batch(x)
    check_inputs(x)
    check_levels(sigma, levels_name)
    check_num_classes(num_classes)
    return x, single


def first_of(result):
    """A dataclass of per-point tensors [1] (or a tensor [1]) as the result of one image: 0-dim tensors."""
    if isinstance(result, torch.Tensor):
        return result[0]
    fields = {k: (v[0] if isinstance(v, torch.Tensor) else v) for k, v in vars(result).items()}
    return type(result)(**fields)


def check_run(points, **levels) -> None:
    """A certification run's points (non-empty) and its levels, by name (None: not given)."""
    check_point_set(points)
    for name, value in levels.items():
        if value is not None:
            check_levels(value, name)
