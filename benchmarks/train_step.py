"""Time per training step of every objective, at a constant noise level and with a per-sample level table.

One step is what ``SmoothingModule.training_step`` does plus the optimizer: ``sigma = policy(index)``, the
objective, backward, SGD step, on a fixed random batch of MNIST (LeNet) or CIFAR-10 (ResNet) shapes. The
constant policy (``ConstantSigma``) and the per-sample one (``SampleWiseSigma``, a table over the whole training
set looked up by the batch's dataset indices) alternate step by step (ABBA order), warm-up steps are excluded,
and medians are reported; the overhead is the median of the paired differences. The table's lookup is also
timed on its own, which is the precise number when the step times are noisy.

A sample-wise run also re-estimates the table every ``noise.update_every`` epochs
(``SigmaFinetuneModule.update_sigma_table``: ``grid levels x num_draws`` forward passes per training sample);
the last table gives that cost per step, amortized over the epochs between updates.

    .venv/bin/python benchmarks/train_step.py --threads 2                               # LeNet, batch 64
    .venv/bin/python benchmarks/train_step.py --threads 2 --model cifar_resnet20 --batch-size 32
    .venv/bin/python benchmarks/train_step.py --device cuda --batch-size 256
    .venv/bin/python benchmarks/train_step.py --quick                                   # smoke run, < 1 min
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from ssmooth.attacks import SmoothAdvPGD
from ssmooth.models import create_model
from ssmooth.noise import ConstantSigma, SampleWiseSigma, sigma_grid
from ssmooth.objectives import MACER, GaussianAugmentation, SmoothAdv

REPO = Path(__file__).resolve().parents[1]
# name: (registry name, options, input shape, mean, std, training-set size)
MODELS = {
    "lenet": ("lenet", {}, (1, 28, 28), None, None, 60_000),
    "mlp": ("mlp", {}, (1, 28, 28), (0.1307,), (0.3081,), 60_000),
    "cifar_resnet20": ("cifar_resnet", {"depth": 20}, (3, 32, 32), (0.4914, 0.4822, 0.4465),
                       (0.2023, 0.1994, 0.2010), 50_000),
    "cifar_resnet110": ("cifar_resnet", {"depth": 110}, (3, 32, 32), (0.4914, 0.4822, 0.4465),
                        (0.2023, 0.1994, 0.2010), 50_000),
}
SIGMA, EPS = 0.25, 0.5


def objectives(quick: bool) -> dict[str, object]:
    out = {"gaussian": GaussianAugmentation()}
    for m in (1, 4) if quick else (1, 4, 8):
        for steps in (1, 4) if not quick else (1,):
            out[f"smoothadv m={m} steps={steps}"] = SmoothAdv(SmoothAdvPGD(EPS, steps, num_noise=m), num_noise=m)
    out["macer k=16"] = MACER(num_noise=16)
    return out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model, optimizer, objective, policies, x, y, index, warmup: int, repeats: int, device):
    """Seconds per step for each policy: ``repeats`` steps each, alternating ABBA after ``warmup`` steps each."""

    def step(policy) -> float:
        synchronize(device)
        began = time.perf_counter()
        sigma = policy(index)
        out = objective(model, x, y, sigma, epoch=0)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        synchronize(device)
        return time.perf_counter() - began

    for policy in policies:
        for _ in range(warmup):
            step(policy)
    times = [[] for _ in policies]
    for r in range(repeats):
        order = range(len(policies)) if r % 2 == 0 else reversed(range(len(policies)))
        for k in order:
            times[k].append(step(policies[k]))
    return times


def lookup_seconds(policy, index, device, calls: int = 2000) -> float:
    """Seconds per ``policy(index)`` call on its own."""
    for _ in range(10):
        policy(index)
    synchronize(device)
    began = time.perf_counter()
    for _ in range(calls):
        policy(index)
    synchronize(device)
    return (time.perf_counter() - began) / calls


def table_update_seconds(model, x, y, grid, num_draws, batch_size, device) -> float:
    """Seconds to re-select the levels of the batch's samples (what update_sigma_table does per sample)."""
    from ssmooth.selection import select_sigma

    generator = torch.Generator(device=device).manual_seed(0)
    select_sigma(model, x, grid, num_samples=num_draws, labels=y, generator=generator, batch_size=batch_size)
    synchronize(device)
    began = time.perf_counter()
    select_sigma(model, x, grid, num_samples=num_draws, labels=y, generator=generator, batch_size=batch_size)
    synchronize(device)
    return time.perf_counter() - began


def header(args, device) -> str:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return "\n".join([
        "## Machine", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- CPU: {cpu}; device: {device_name}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} intra-op threads",
        f"- load average at start: {', '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`", ""])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="lenet")
    p.add_argument("--batch-size", type=int, default=64, help="training samples per step (default 64)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3, help="steps per policy excluded from the timing")
    p.add_argument("--repeats", type=int, default=6, help="timed steps per policy; the median is reported")
    p.add_argument("--only", nargs="*", default=None, help="objective names to run (prefix match)")
    p.add_argument("--quick", action="store_true", help="batch 16, fewer objectives and repeats: checks it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.warmup, args.repeats = min(args.batch_size, 16), 2, 2
    return args


def main(argv=None) -> None:
    from omegaconf import OmegaConf

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    registry_name, options, shape, mean, std, train_size = MODELS[args.model]
    noise_cfg = OmegaConf.load(REPO / "conf" / "noise" / "samplewise.yaml")
    grid = sigma_grid(SIGMA, list(noise_cfg.grid_factors))

    torch.manual_seed(0)
    model = create_model(registry_name, num_classes=10, input_shape=shape, mean=mean, std=std, **options).to(device)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.rand((args.batch_size, *shape), device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    index = torch.randperm(train_size, device=device)[: args.batch_size]  # a shuffled loader's batch
    constant = ConstantSigma(SIGMA).to(device)
    samplewise = SampleWiseSigma(SIGMA, grid, train_size).to(device)
    samplewise.table.copy_(torch.tensor(grid, device=device)[torch.randint(0, len(grid), (train_size,), device=device)])

    print(header(args, device))
    if args.quick:
        print("**--quick: settings too small for the numbers to mean anything; use it to check the script runs.**\n")
    lookup = {name: lookup_seconds(policy, index, device) for name, policy in
              (("constant", constant), ("per-sample", samplewise))}
    extra_lookup = lookup["per-sample"] - lookup["constant"]
    print(f"### Training step: {args.model}, {device.type}, batch {args.batch_size}, sigma {SIGMA}, per-sample grid "
          f"{grid}, median of {args.repeats} steps after {args.warmup} warm-up steps")
    print()
    print("| objective | ms/step constant | ms/step per-sample | overhead (paired median) | step noise | "
          "table lookup, % of step | < 5% |")
    print("|---|---|---|---|---|---|---|")
    step_ms = {}
    for name, objective in objectives(args.quick).items():
        if args.only is not None and not any(name.startswith(o) for o in args.only):
            continue
        times = time_steps(model, optimizer, objective, [constant, samplewise], x, y, index, args.warmup,
                           args.repeats, device)
        const, per_sample = (statistics.median(t) for t in times)
        overhead = statistics.median(b - a for a, b in zip(*times)) / const
        # half the range of the constant policy's step times: a paired overhead below it is not resolved
        noise = (max(times[0]) - min(times[0])) / 2 / const
        lookup_share = extra_lookup / const
        step_ms[name] = const * 1e3
        ok = "yes" if lookup_share < 0.05 and overhead < max(0.05, noise) else "NO"
        print(f"| {name} | {const * 1e3:,.1f} | {per_sample * 1e3:,.1f} | {overhead:+.1%} | +-{noise:.1%} | "
              f"{lookup_share:+.3%} | {ok} |", flush=True)
    print()
    print(f"Lookup alone, batch {args.batch_size}: constant {lookup['constant'] * 1e6:.1f} us, per-sample table "
          f"{lookup['per-sample'] * 1e6:.1f} us per call. A paired step overhead below the step noise (half the range "
          "of the constant policy's step times) is not resolved; the lookup share is then the "
          "number to trust: the two policies run the same objective code on the same shapes.")
    print()

    try:
        seconds = table_update_seconds(model, x, y, grid, int(noise_cfg.num_draws), 4096, device)
    except ImportError:
        print("(ssmooth.selection not importable: table re-estimation not timed)")
        return
    update_every = int(noise_cfg.update_every)
    per_step = seconds / update_every
    forwards = len(grid) * int(noise_cfg.num_draws)
    print(f"### Re-estimating the per-sample table (conf/noise/samplewise.yaml: {len(grid)} levels x "
          f"{noise_cfg.num_draws} draws every {update_every} epochs = {forwards / update_every:g} forward passes per "
          "training sample per epoch)")
    print()
    print("| objective | ms/step | re-estimation amortized, ms/step | as % of the step |")
    print("|---|---|---|---|")
    for name, ms in step_ms.items():
        print(f"| {name} | {ms:,.1f} | {per_step * 1e3:,.1f} | {per_step * 1e3 / ms:.0%} |")
    print()
    print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
