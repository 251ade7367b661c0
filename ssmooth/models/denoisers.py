"""Denoised smoothing: certify a classifier that was never trained under noise by putting a denoiser in front of it.

The smoothed classifier is ``g(x) = argmax_c P(f(D(x + sigma * eps)) = c)``: the base classifier is the
composition ``f o D``, so CERTIFY and every certificate built on it hold unchanged (the guarantee is about the
base classifier's votes, whatever it computes). Two denoisers:

- ``DnCNN``: a trained residual denoiser (Salman et al., NeurIPS 2020), 17 conv layers of 64 channels by
  default; trained by ``ssmooth.lit.denoiser``.
- ``DiffusionDenoiser``: one step of an off-the-shelf DDPM (Carlini et al., ICLR 2023). The noisy input is mapped
  to the model's [-1, 1] range (which doubles sigma), matched to the timestep whose noise level is closest, and
  the model's one-step estimate of the clean image is mapped back to [0, 1].

Both are told each noisy input's level (``forward(x, sigma)``, sigma ``[B]``), so a batch may mix levels (per-sample
noise levels). ``DenoisedClassifier`` composes them with a frozen classifier and says so with ``wants_sigma``;
``call_model`` is how the certification code calls any base classifier.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def call_model(model: nn.Module, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``model(x)``, or ``model(x, sigma)`` for a model that needs each input's noise level (``wants_sigma``)."""
    if getattr(model, "wants_sigma", False):
        return model(x, sigma)
    return model(x)


class DenoisedClassifier(nn.Module):
    """``classifier(denoiser(x, sigma))``: the base classifier of denoised smoothing.

    The classifier is frozen (no gradients; its batch-norm statistics are never updated), so training the pair
    trains the denoiser alone.
    """

    wants_sigma = True

    def __init__(self, classifier: nn.Module, denoiser: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.denoiser = denoiser
        self.classifier.requires_grad_(False)
        self.classifier.eval()

    def train(self, mode: bool = True) -> DenoisedClassifier:
        super().train(mode)
        self.classifier.eval()  # frozen: its running statistics stay those it was trained with
        return self

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoiser(x, sigma))


class DnCNN(nn.Module):
    """The DnCNN of Zhang et al. (2017) as used by Salman et al.: ``depth`` 3x3 conv layers of ``width`` channels
    (batch norm in the middle ones) predict the noise, which is subtracted from the input (residual learning).
    It is blind to the level: ``sigma`` is accepted for a common interface and not used."""

    def __init__(self, channels: int, depth: int = 17, width: int = 64):
        super().__init__()
        if depth < 2 or width < 1 or channels < 1:
            raise ValueError(f"DnCNN needs depth >= 2 and width >= 1, got depth={depth}, width={width}")
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | None = None) -> torch.Tensor:
        return x - self.net(x)


def closest_timesteps(alphas_cumprod: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per input, the timestep t whose noise-to-signal ratio ``sqrt((1 - abar_t) / abar_t)`` is closest to
    ``2 * sigma`` (sigma in [0, 1] pixel units; the model's [-1, 1] range doubles it). Long ``[B]``."""
    abar = alphas_cumprod.double()
    ratio = ((1 - abar) / abar).sqrt()
    target = 2 * sigma.double().reshape(-1, 1).to(ratio.device)
    return (ratio.unsqueeze(0) - target).abs().argmin(dim=1)


class DiffusionDenoiser(nn.Module):
    """One-shot denoising with a DDPM noise predictor ``unet(x_t, t) -> eps`` and its schedule ``alphas_cumprod``.

    For ``x_noisy = x + sigma * eps`` in [0, 1] units: ``2 x_noisy - 1 = (2x - 1) + 2 sigma eps``, and with t* the
    closest timestep, ``x_t = sqrt(abar) (2 x_noisy - 1)`` is (up to the gap between 2 sigma and t*'s level) a
    sample of the forward process at t*; the estimate ``x0 = (x_t - sqrt(1 - abar) eps_theta(x_t, t*)) / sqrt(abar)``
    is mapped back to [0, 1]. Outputs with twice the input channels (a learned variance) keep the first half.
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, clip: bool = True):
        super().__init__()
        self.unet = unet
        self.clip = clip
        self.register_buffer("alphas_cumprod", torch.as_tensor(alphas_cumprod, dtype=torch.float32).clone())

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        t = closest_timesteps(self.alphas_cumprod, sigma)
        shape = (-1,) + (1,) * (x.dim() - 1)
        abar = self.alphas_cumprod[t].to(x.dtype).view(shape)
        x_t = abar.sqrt() * (2 * x - 1)
        eps = self.unet(x_t, t)
        eps = getattr(eps, "sample", eps)  # diffusers models return an output object
        if eps.shape[1] == 2 * x.shape[1]:
            eps = eps[:, : x.shape[1]]
        x0 = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
        if self.clip:
            x0 = x0.clamp(-1, 1)
        return (x0 + 1) / 2


def load_diffusion(path: str | Path, clip: bool = True) -> DiffusionDenoiser:
    """A ``DiffusionDenoiser`` from a local folder written by diffusers' ``save_pretrained``: a DDPM pipeline folder
    (``unet/`` and ``scheduler/`` beside ``model_index.json``). Nothing is downloaded. Raises ValueError with one
    line naming the path when it is missing or not such a folder."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"denoiser.path={path}: no such folder (a diffusers save_pretrained folder with unet/ and "
                         "scheduler/)")
    missing = [name for name in ("unet", "scheduler") if not (path / name).is_dir()]
    if missing:
        raise ValueError(f"denoiser.path={path} is not a diffusers DDPM folder: it has no {' or '.join(missing)}/ "
                         "subfolder (write one with DDPMPipeline(unet, scheduler).save_pretrained(DIR))")
    try:
        from diffusers import DDPMScheduler, UNet2DModel
    except ImportError:
        raise ValueError("denoiser=diffusion needs the diffusers package: pip install 'ssmooth[denoise]'") from None
    try:
        unet = UNet2DModel.from_pretrained(path / "unet", local_files_only=True)
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler", local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"denoiser.path={path} could not be loaded: {first}") from None
    return DiffusionDenoiser(unet, scheduler.alphas_cumprod, clip=clip)


DENOISERS = ("none", "dncnn", "diffusion")


def build_denoiser(options: dict, channels: int) -> nn.Module | None:
    """The denoiser a ``denoiser`` config describes (``name``: none | dncnn | diffusion), None for none.
    Raises ValueError naming a bad value."""
    options = dict(options or {"name": "none"})
    name = options.pop("name", "none")
    if name not in DENOISERS:
        raise ValueError(f"denoiser.name={name!r} must be one of {DENOISERS}")
    if name == "none":
        return None
    if name == "dncnn":
        return DnCNN(channels, depth=int(options.get("depth", 17)), width=int(options.get("width", 64)))
    if not options.get("path"):
        raise ValueError("denoiser=diffusion needs denoiser.path=DIR (a diffusers save_pretrained folder)")
    return load_diffusion(options["path"], clip=bool(options.get("clip", True)))
