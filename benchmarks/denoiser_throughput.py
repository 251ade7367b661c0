"""What a denoiser costs: forward passes per second of classifier o denoiser against the classifier alone.

Noisy inputs are made beforehand; each variant runs ``--batch-size`` of them per forward under inference mode,
and the variants are interleaved ``--repeats`` times (median reported), so a change in machine load hits all
alike. Variants: the classifier alone; behind DnCNNs of the sizes given with ``--dncnn DEPTHxWIDTH``; and, with
``--diffusion``, behind a small randomly initialised diffusers UNet (one-shot denoising; the cost of a real DDPM
grows with its size, so this line only shows the overhead of the step itself on small inputs).
The output is markdown for docs/PERFORMANCE.md.

    .venv/bin/python benchmarks/denoiser_throughput.py --model lenet --threads 1
    .venv/bin/python benchmarks/denoiser_throughput.py --model cifar_resnet20 --device cuda --diffusion
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from ssmooth.models import create_model
from ssmooth.models.denoisers import DenoisedClassifier, DiffusionDenoiser, DnCNN, call_model

MODELS = {  # name: (registry name, options, input shape)
    "lenet": ("lenet", {}, (1, 28, 28)),
    "cifar_resnet20": ("cifar_resnet", {"depth": 20}, (3, 32, 32)),
}


def tiny_unet(channels: int, size: int) -> DiffusionDenoiser:
    from diffusers import DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=8)
    return DiffusionDenoiser(unet, DDPMScheduler(num_train_timesteps=1000).alphas_cumprod)


def rate(model, x, sigma, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    with torch.inference_mode():
        call_model(model, x, sigma).argmax(dim=1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return x.shape[0] / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="lenet")
    parser.add_argument("--dncnn", nargs="*", default=["17x64", "5x32"], help="DnCNN sizes, DEPTHxWIDTH")
    parser.add_argument("--diffusion", action="store_true", help="add a tiny diffusers UNet (one-shot denoising)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name, options, shape = MODELS[args.model]
    classifier = create_model(name, num_classes=10, input_shape=shape, **options).to(device).eval()
    variants = {f"{args.model} alone": classifier}
    for size in args.dncnn:
        depth, width = (int(v) for v in size.split("x"))
        variants[f"DnCNN {depth}x{width} + {args.model}"] = DenoisedClassifier(classifier, DnCNN(shape[0], depth, width))
    if args.diffusion:
        variants[f"tiny DDPM UNet + {args.model}"] = DenoisedClassifier(classifier, tiny_unet(shape[0], shape[1]))
    variants = {k: v.to(device).eval() for k, v in variants.items()}
    x = torch.rand(args.batch_size, *shape, device=device)
    x = x + args.sigma * torch.randn_like(x)
    sigma = torch.full((args.batch_size,), args.sigma, device=device)
    for model in variants.values():  # warm-up
        rate(model, x[:16], sigma[:16], device)
    rates = {k: [] for k in variants}
    for _ in range(args.repeats):
        for key, model in variants.items():
            rates[key].append(rate(model, x, sigma, device))
    load = os.getloadavg()[0]
    print(f"{platform.processor() or platform.machine()}, {device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, batch {args.batch_size}, median of {args.repeats}, load {load:.2f}\n")
    alone = statistics.median(rates[f"{args.model} alone"])
    print("| base classifier | forward passes/s | relative to the classifier alone |\n|---|---:|---:|")
    for key, values in rates.items():
        median = statistics.median(values)
        print(f"| {key} | {median:,.0f} | {median / alone:.3f} |")


if __name__ == "__main__":
    main()
