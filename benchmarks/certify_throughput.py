"""Certification throughput: ``ssmooth.certify`` against the forward-pass limit and the 2019 per-image loop.

Noisy samples per second of
  (a) the model's forward pass alone, on noisy inputs generated beforehand, at --batch-size (the limit);
  (b) ``ssmooth.certify.certify`` on --points points, n0 + n draws each;
  (c) a per-image loop written like the 2019 reference code: one point at a time, the point repeated,
      fresh noise, forward under no_grad, argmax, votes counted on the host in Python, fp32.
The three are interleaved --repeats times and the median is reported, so a change in machine load hits all of
them alike. Then: what inference mode, channels-last, torch.compile (and bf16 on a GPU) buy over a plain
forward; the peak memory of certify at two values of n, each in a fresh process (it must not grow with n);
and the share of forward passes that test-time sigma selection adds to certification with the default configs.

The output is markdown, to paste into docs/PERFORMANCE.md. Commands (benchmarks/README.md has all of them):

    .venv/bin/python benchmarks/certify_throughput.py --model lenet --threads 2 --compile
    .venv/bin/python benchmarks/certify_throughput.py --model cifar_resnet20 --threads 2 --compile
    .venv/bin/python benchmarks/certify_throughput.py --model cifar_resnet110 --device cuda   # bf16 on a GPU
    .venv/bin/python benchmarks/certify_throughput.py --model lenet --quick                   # smoke run, ~1 min

``--channels-last`` converts the model's weights AND passes ``channels_last=True`` to certify: converting only
the inputs (all that certify can do without touching the caller's model) buys nothing on its own.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssmooth.certify import certify, lower_confidence_bound
from ssmooth.models import create_model

REPO = Path(__file__).resolve().parents[1]
MNIST_SHAPE, CIFAR_SHAPE = (1, 28, 28), (3, 32, 32)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
# name: (registry name, options, input shape, mean, std); LeNet sees raw pixels as in the reference code
MODELS = {
    "mlp": ("mlp", {}, MNIST_SHAPE, (0.1307,), (0.3081,)),
    "lenet": ("lenet", {}, MNIST_SHAPE, None, None),
    "cifar_resnet20": ("cifar_resnet", {"depth": 20}, CIFAR_SHAPE, CIFAR_MEAN, CIFAR_STD),
    "cifar_resnet56": ("cifar_resnet", {"depth": 56}, CIFAR_SHAPE, CIFAR_MEAN, CIFAR_STD),
    "cifar_resnet110": ("cifar_resnet", {"depth": 110}, CIFAR_SHAPE, CIFAR_MEAN, CIFAR_STD),
}
# Default n per point on a CPU, so that one repeat of (a)-(c) takes seconds, not hours (a GPU gets 10,000).
CPU_DEFAULT_N = {"mlp": 10_000, "lenet": 5_000, "cifar_resnet20": 1_000, "cifar_resnet56": 500,
                 "cifar_resnet110": 200}
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
NUM_CLASSES, SIGMA, ALPHA = 10, 0.25, 0.001


@dataclass(frozen=True)
class Mode:
    """How a forward pass runs: grad mode, memory format of inputs (and weights), compilation, autocast."""

    inference: bool = True  # torch.inference_mode, else torch.no_grad
    channels_last: bool = False
    compile: bool = False
    autocast: torch.dtype | None = None
    weights_too: bool = True  # channels-last weights as well as inputs (False: inputs only, as certify alone does)

    def label(self) -> str:
        parts = ["inference_mode" if self.inference else "no_grad"]
        if self.channels_last:
            parts.append("channels-last" if self.weights_too else "channels-last inputs only")
        if self.compile:
            parts.append("compile")
        parts.append({None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast])
        return " + ".join(parts)


def build_model(name: str, device: torch.device) -> nn.Module:
    registry_name, options, shape, mean, std = MODELS[name]
    torch.manual_seed(0)  # throughput does not depend on the weights; fixed anyway
    return create_model(registry_name, num_classes=NUM_CLASSES, input_shape=shape, mean=mean, std=std,
                        **options).to(device).eval()


_compiled: dict[tuple[int, bool], nn.Module] = {}


def prepare(model: nn.Module, mode: Mode) -> nn.Module:
    """The model as ``mode`` runs it: channels-last weights for conv nets, compiled when asked (cached)."""
    convert = mode.channels_last and mode.weights_too
    key = (id(model), convert, mode.compile)
    if key not in _compiled:
        prepared = model
        if convert:
            prepared = copy.deepcopy(model).to(memory_format=torch.channels_last)
        if mode.compile:
            # dynamic=False: one specialised graph per batch shape (full chunks and the last, shorter one)
            prepared = torch.compile(prepared, dynamic=False)
        _compiled[key] = prepared
    return _compiled[key]


def grad_context(mode: Mode):
    return torch.inference_mode() if mode.inference else torch.no_grad()


def amp_context(mode: Mode, device: torch.device):
    return torch.autocast(device.type, dtype=mode.autocast) if mode.autocast is not None else nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    began = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - began


# ---------------------------------------------------------------------------------------------------------------
# The three ways to spend noisy forward passes


def forward_only(model: nn.Module, inputs: list[torch.Tensor], mode: Mode, device: torch.device):
    """(a): the forward pass on noisy inputs that already exist; nothing else happens per batch."""
    net = prepare(model, mode)
    if mode.channels_last:
        inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]

    def run():
        with grad_context(mode), amp_context(mode, device):
            for x in inputs:
                net(x)

    return run


def ssmooth_certify(model, x, n0, n, batch_size, mode: Mode, device: torch.device, seed: int = 0,
                    streams: bool = True):
    """(b): ``ssmooth.certify.certify`` on all points at once (copies of several points share a batch), each
    point drawing from its own noise streams as the pipeline does; (b1) with ``streams=False``: every draw from
    one shared generator, as before per-point streams."""
    net = prepare(model, mode)
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = {"seed": seed, "indices": list(range(x.shape[0]))} if streams else {"generator": generator}

    def run():
        return certify(net, x, SIGMA, n0=n0, n=n, alpha=ALPHA, batch_size=batch_size, num_classes=NUM_CLASSES,
                       autocast_dtype=mode.autocast, channels_last=mode.channels_last, **noise)

    return run


def _count_arr(arr: np.ndarray, length: int) -> np.ndarray:
    # as in the 2019 reference code: a Python loop over the predictions
    counts = np.zeros(length, dtype=int)
    for idx in arr:
        counts[idx] += 1
    return counts


def _reference_sample(net, x1, num, batch_size, mode: Mode, device) -> np.ndarray:
    counts = np.zeros(NUM_CLASSES, dtype=int)
    remaining = num
    with grad_context(mode), amp_context(mode, device):
        while remaining > 0:
            this_batch = min(batch_size, remaining)
            remaining -= this_batch
            batch = x1.repeat((this_batch, *[1] * (x1.dim() - 1)))
            noise = torch.randn_like(batch) * SIGMA
            noisy = batch + noise
            if mode.channels_last:
                noisy = noisy.contiguous(memory_format=torch.channels_last)
            predictions = net(noisy).argmax(1)
            counts += _count_arr(predictions.cpu().numpy(), NUM_CLASSES)  # a host sync every batch
    return counts


def reference_loop(model, x, n0, n, batch_size, mode: Mode, device: torch.device, seed: int = 0):
    """(c): one point at a time, like ``Smooth.certify`` of the 2019 code (no_grad, fp32 when ``mode`` is plain)."""
    net = prepare(model, mode)

    def run():
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        for point in x:
            counts0 = _reference_sample(net, point[None], n0, batch_size, mode, device)
            cA = int(counts0.argmax())
            counts = _reference_sample(net, point[None], n, batch_size, mode, device)
            lower_confidence_bound(counts[cA], n, ALPHA)

    return run


def count_host_syncs(run, device: torch.device) -> int | None:
    """CUDA only: how many calls in ``run`` made the host wait for the device."""
    if device.type != "cuda":
        return None
    import warnings

    try:
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    except RuntimeError:
        return None
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def noisy_inputs(x: torch.Tensor, batch_size: int, num_batches: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator(device=x.device).manual_seed(seed)
    out = []
    for k in range(num_batches):
        point = (torch.arange(batch_size, device=x.device) + k * batch_size) % x.shape[0]
        eps = torch.randn((batch_size, *x.shape[1:]), generator=generator, device=x.device)
        out.append(x[point] + SIGMA * eps)
    return out


def warm_n(n: int, batch_size: int) -> int:
    """A smaller n that makes certify run the same chunk shapes as n (what a compiled model needs warmed)."""
    return n if n <= 2 * batch_size else batch_size + n % batch_size


def measure(runs: dict[str, tuple], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """``runs``: name -> (callable, samples per call, warm-up callable). Interleaved; samples/s per repeat."""
    for run, _, warm in runs.values():
        (warm or run)()
    rates = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (run, samples, _) in runs.items():
            rates[name].append(samples / timed(run, device))
    return rates


# ---------------------------------------------------------------------------------------------------------------
# Sections of the report


def fmt_rate(rates: list[float]) -> tuple[str, str]:
    med = statistics.median(rates)
    spread = f"{min(rates):,.0f}-{max(rates):,.0f}" if len(rates) > 1 else "-"
    return f"{med:,.0f}", spread


def machine_header(args, device: torch.device) -> str:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    lines = [
        "## Machine",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- CPU: {cpu}, {cores} cores usable by this process",
        f"- device: {device_name}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} intra-op threads",
        f"- load average at start: {load} (above the thread count means other work shared the CPU)",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        "",
    ]
    return "\n".join(lines)


def throughput_section(args, model, device, mode: Mode) -> str:
    shape = MODELS[args.model][2]
    generator = torch.Generator(device=device).manual_seed(1)
    x = torch.rand((args.points, *shape), generator=generator, device=device)
    ref_batch = args.ref_batch_size or args.batch_size
    samples = args.points * (args.n0 + args.n)
    plain = Mode(inference=False)
    fwd_batches = max(1, min(args.forward_batches, samples // args.batch_size or 1))
    inputs = noisy_inputs(x, args.batch_size, fwd_batches)
    small_n = warm_n(args.n, args.batch_size)
    runs = {
        "a": (forward_only(model, inputs, mode, device), fwd_batches * args.batch_size, None),
        "b": (ssmooth_certify(model, x, args.n0, args.n, args.batch_size, mode, device),
              samples, ssmooth_certify(model, x, args.n0, small_n, args.batch_size, mode, device)),
        "b1": (ssmooth_certify(model, x, args.n0, args.n, args.batch_size, mode, device, streams=False), samples,
               ssmooth_certify(model, x, args.n0, small_n, args.batch_size, mode, device, streams=False)),
        "c": (reference_loop(model, x, args.n0, args.n, ref_batch, plain, device), samples,
              reference_loop(model, x[:1], args.n0, warm_n(args.n, ref_batch), ref_batch, plain, device)),
    }
    if mode != plain:  # the same loop with this run's options: separates batching from the options
        runs["c_opt"] = (reference_loop(model, x, args.n0, args.n, ref_batch, mode, device), samples,
                         reference_loop(model, x[:1], args.n0, warm_n(args.n, ref_batch), ref_batch, mode, device))
    rates = measure(runs, args.repeats, device)
    med = {k: statistics.median(v) for k, v in rates.items()}
    syncs = count_host_syncs(runs["b"][0], device)

    names = {
        "a": f"(a) forward alone, {mode.label()} (the limit)",
        "b": f"(b) ssmooth.certify, per-point noise streams, {mode.label()}",
        "b1": f"(b1) ssmooth.certify, one shared generator (before per-point streams), {mode.label()}",
        "c": f"(c) per-image loop (2019 reference), {plain.label()}",
        "c_opt": f"(c') per-image loop, {mode.label()}",
    }
    title = (f"### Certification throughput: {args.model}, {device.type}, batch {args.batch_size}"
             f"{'' if ref_batch == args.batch_size else f' (loop: {ref_batch})'}, n0 = {args.n0}, n = {args.n:,}, "
             f"{args.points} points, median of {args.repeats}")
    out = [title, "", "| what | noisy samples/s | range over repeats | vs (a) | s per point at n = 100,000 |",
           "|---|---|---|---|---|"]
    for key, rate in rates.items():
        median, spread = fmt_rate(rate)
        out.append(f"| {names[key]} | {median} | {spread} | {med[key] / med['a']:.2f} | "
                   f"{(args.n0 + 100_000) / med[key]:,.1f} |")
    if device.type == "cpu":
        targets = {"b/a": 0.95, "b/c": 1.0}
    else:
        targets = {"b/a": 0.95, "b/c": {"lenet": 3.0, "cifar_resnet110": 1.5}.get(args.model, 1.0)}
    targets["b/b1"] = 0.97  # per-point streams may cost at most 3% of throughput
    out += ["", "| ratio | value | target | met |", "|---|---|---|---|"]
    ratios = {"b/a": med["b"] / med["a"], "b/c": med["b"] / med["c"], "b/b1": med["b"] / med["b1"]}
    if "c_opt" in med:
        ratios["b/c'"] = med["b"] / med["c_opt"]
    for key, value in ratios.items():
        target = targets.get(key)
        met = "-" if target is None else ("yes" if value >= target else "NO")
        out.append(f"| {key} | {value:.2f} | {'-' if target is None else f'>= {target:.2f}'} | {met} |")
    if syncs is not None:
        chunks = -(-args.points * args.n0 // args.batch_size) + -(-args.points * args.n // args.batch_size)
        out += ["", f"Host synchronizations in one (b) call: {syncs} for {chunks} chunks "
                "(`torch.cuda.set_sync_debug_mode`; one per chunk stalls the launch queue)."]
    out.append("")
    return "\n".join(out)


def streams_section(args, model, device, mode: Mode) -> str:
    """What per-point noise streams cost: (b) against (b1), the same certify call drawing from one generator."""
    shape = MODELS[args.model][2]
    x = torch.rand((args.points, *shape), generator=torch.Generator(device=device).manual_seed(1), device=device)
    samples = args.points * (args.n0 + args.n)
    small_n = warm_n(args.n, args.batch_size)
    runs = {key: (ssmooth_certify(model, x, args.n0, args.n, args.batch_size, mode, device, streams=streams),
                  samples, ssmooth_certify(model, x, args.n0, small_n, args.batch_size, mode, device, streams=streams))
            for key, streams in (("b", True), ("b1", False))}
    # CPU seconds of this process as well as wall time: on a shared CPU, other processes' load inflates wall time
    # but hardly the CPU time one thread spends (on a GPU only wall time means anything).
    for run, _, warm in runs.values():
        (warm or run)()
    rates = {k: [] for k in runs}
    cpu_rates = {k: [] for k in runs}
    for _ in range(args.repeats):
        for key, (run, count, _) in runs.items():
            cpu_began = time.process_time()
            rates[key].append(count / timed(run, device))
            cpu_rates[key].append(count / (time.process_time() - cpu_began))
    out = [f"### Per-point noise streams: {args.model}, {device.type}, batch {args.batch_size}, n0 = {args.n0}, "
           f"n = {args.n:,}, {args.points} points, {args.repeats} interleaved repeats", "",
           "| what | best samples/s (wall) | median (wall) | best samples per CPU second | median (CPU) |",
           "|---|---|---|---|---|"]
    for key, label in (("b", "(b) per-point streams"), ("b1", "(b1) one shared generator (before)")):
        out.append(f"| {label} | {max(rates[key]):,.0f} | {statistics.median(rates[key]):,.0f} | "
                   f"{max(cpu_rates[key]):,.0f} | {statistics.median(cpu_rates[key]):,.0f} |")
    out.append("")
    for name, r in (("wall", rates), ("CPU", cpu_rates)):
        out.append(f"b/b1 ({name}): best {max(r['b']) / max(r['b1']):.3f}, median "
                   f"{statistics.median(r['b']) / statistics.median(r['b1']):.3f}, per repeat "
                   + ", ".join(f"{b / b1:.3f}" for b, b1 in zip(r["b"], r["b1"])) + " (target >= 0.97)")
    out.append("")
    return "\n".join(out)


def forward_modes_section(args, model, device) -> str:
    """What each option buys over a plain forward (no_grad, fp32, contiguous), at --batch-size."""
    shape = MODELS[args.model][2]
    conv = args.model != "mlp"
    modes = [Mode(inference=False), Mode()]
    if conv:
        modes += [Mode(channels_last=True, weights_too=False), Mode(channels_last=True)]
    if args.compile:
        modes += [Mode(compile=True)] + ([Mode(channels_last=True, compile=True)] if conv else [])
    # a GPU always gets the half-precision rows; a CPU only when --autocast names a dtype
    if device.type == "cuda" or args.autocast not in ("none", "auto"):
        half = AUTOCAST[args.autocast] if args.autocast not in ("none", "auto") else torch.bfloat16
        modes += [replace(m, autocast=half) for m in modes[1:]]
    generator = torch.Generator(device=device).manual_seed(2)
    x = torch.rand((args.points, *shape), generator=generator, device=device)
    inputs = noisy_inputs(x, args.batch_size, args.forward_batches)
    samples = args.forward_batches * args.batch_size
    runs = {m.label(): (forward_only(model, inputs, m, device), samples, None) for m in modes}
    rates = measure(runs, args.repeats, device)
    base = statistics.median(rates[modes[0].label()])
    out = [f"### Forward pass options: {args.model}, {device.type}, batch {args.batch_size}, "
           f"{args.forward_batches} batches, median of {args.repeats}", "",
           "| forward | noisy samples/s | range over repeats | vs no_grad fp32 |", "|---|---|---|---|"]
    for label, rate in rates.items():
        median, spread = fmt_rate(rate)
        out.append(f"| {label} | {median} | {spread} | {statistics.median(rate) / base:.2f} |")
    if conv:
        out.append("")
        out.append("channels-last: the weights (`model.to(memory_format=torch.channels_last)`) and the inputs; "
                   "`certify(channels_last=True)` on its own converts only the inputs.")
    out.append("")
    return "\n".join(out)


def memory_probe(args) -> dict:
    """Runs in a fresh process: peak memory of certify on one point at n = args.memory_probe."""
    device = torch.device(args.device)
    model = build_model(args.model, device)
    mode = run_mode(args, device)
    shape = MODELS[args.model][2]
    x = torch.rand((1, *shape), device=device)
    for _ in range(2):  # warm-up: the allocator reaches its steady state
        ssmooth_certify(model, x, args.n0, 3 * args.batch_size, args.batch_size, mode, device)()
    n = args.memory_probe
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        seconds = timed(ssmooth_certify(model, x, args.n0, n, args.batch_size, mode, device), device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"n": n, "kind": "CUDA max_memory_allocated", "peak_mib": peak / 2**20,
                "growth_mib": (peak - before) / 2**20, "seconds": seconds}
    # ru_maxrss is the high-water mark of the process: its growth over the warm-up (same chunk shapes) is what
    # n itself costs; a few MiB of it is the C allocator's fragmentation, not a buffer that scales with n.
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    seconds = timed(ssmooth_certify(model, x, args.n0, n, args.batch_size, mode, device), device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return {"n": n, "kind": "peak RSS (ru_maxrss)", "peak_mib": peak / 2**20, "growth_mib": (peak - before) / 2**20,
            "seconds": seconds}


def memory_section(args, device) -> str:
    shape = MODELS[args.model][2]
    rows = []
    for n in args.memory_n:
        command = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", str(n), "--model", args.model,
                   "--device", str(device), "--batch-size", str(args.batch_size), "--n0", str(args.n0),
                   "--autocast", args.autocast, "--threads", str(torch.get_num_threads())]
        if args.channels_last:
            command.append("--channels-last")
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
        if done.returncode != 0 or not lines:
            rows.append(f"| {n:,} | probe failed: {done.stderr.strip().splitlines()[-1:]} | | | |")
            continue
        probe = json.loads(lines[-1])
        all_noise = n * int(np.prod(shape)) * 4 / 2**20
        rows.append(f"| {n:,} | {probe['peak_mib']:,.0f} | {probe['growth_mib']:+,.1f} | {all_noise:,.0f} | "
                    f"{probe['seconds']:.1f} |")
    if device.type == "cuda":
        how = ("CUDA max_memory_allocated during the call; growth: that peak minus what was allocated before it "
               "(one chunk's working set)")
    else:
        how = ("peak RSS of a fresh process (ru_maxrss); growth: over two warm-up certify calls at n = 3 x batch "
               "size in that process")
    return "\n".join([
        f"### Peak memory of certify: {args.model}, {device.type}, batch {args.batch_size}, one point", "",
        f"Measured: {how}.", "",
        "| n | peak MiB | growth MiB | all n noise draws at once would need, MiB | seconds |",
        "|---|---|---|---|---|", *rows, ""])


def selection_section(model, shape, device) -> str:
    """Forward passes of test-time sigma selection per point, relative to certification's n0 + n (defaults)."""
    from omegaconf import OmegaConf

    from ssmooth.noise import sigma_grid

    cert = OmegaConf.load(REPO / "conf" / "certify" / "default.yaml")
    noise = OmegaConf.load(REPO / "conf" / "noise" / "samplewise.yaml")
    factors = cert.grid_factors if cert.grid_factors is not None else noise.grid_factors
    levels = len(sigma_grid(noise.sigma, list(factors)))
    selection = levels * cert.selection_samples
    certification = cert.n0 + cert.n
    share = selection / certification
    out = ["### Test-time sigma selection cost (defaults from conf/certify/default.yaml, conf/noise/samplewise.yaml)",
           "",
           "| grid levels | selection draws per level | selection forwards per point | certification n0 + n | "
           "share | target |", "|---|---|---|---|---|---|",
           f"| {levels} | {cert.selection_samples} | {selection:,} | {certification:,} | {share:.2%} | <= 2% "
           f"({'met' if share <= 0.02 else 'NOT met'}) |", ""]
    counted = _count_selection_forwards(model, shape, device, noise.sigma, list(factors), cert.selection_samples,
                                        cert.batch_size)
    if counted is not None:
        out += [f"Counted by running `select_sigma` on one point: {counted:,} noisy inputs went through the model.",
                ""]
    else:
        out += ["(`ssmooth.selection.select_sigma` not importable here: the count above is from the configs only.)",
                ""]
    out.append("A sample-wise run also certifies every point at the constant level, the baseline always reported: "
               "that is a second n0 + n, not part of the selection cost.")
    out.append("")
    return "\n".join(out)


class _Counting(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.inputs = model, 0

    def forward(self, x):
        self.inputs += x.shape[0]
        return self.model(x)


def _count_selection_forwards(model, shape, device, sigma, factors, num_samples, batch_size) -> int | None:
    try:
        from ssmooth.selection import select_sigma
    except ImportError:
        return None
    from ssmooth.noise import sigma_grid

    counting = _Counting(model)
    x = torch.rand((1, *shape), device=device)
    generator = torch.Generator(device=device).manual_seed(3)
    try:
        select_sigma(counting, x, sigma_grid(sigma, factors), num_samples=num_samples, labels=None,
                     generator=generator, batch_size=batch_size)
    except TypeError:  # the signature moved on: say so rather than guess
        return None
    return counting.inputs


# ---------------------------------------------------------------------------------------------------------------


def run_mode(args, device: torch.device) -> Mode:
    autocast = args.autocast
    if autocast == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        autocast = "bf16" if cuda_bf16 else "none"
    channels_last = args.channels_last and args.model != "mlp"  # channels-last means nothing to an MLP
    return Mode(inference=True, channels_last=channels_last, compile=args.compile, autocast=AUTOCAST[autocast])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="lenet")
    p.add_argument("--batch-size", type=int, default=1000, help="noisy inputs per forward pass (default 1000)")
    p.add_argument("--ref-batch-size", type=int, default=None, help="batch of the per-image loop (default: same)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:1 ...")
    p.add_argument("--n", type=int, default=None, help="draws per point (default: 10,000 on a GPU, per model on a "
                   f"CPU: {CPU_DEFAULT_N})")
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--points", type=int, default=4, help="points certified per measurement")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    p.add_argument("--forward-batches", type=int, default=5, help="batches per forward-only measurement")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--autocast", choices=["auto", *AUTOCAST], default="auto",
                   help="auto: bf16 on a GPU that has it, none on a CPU")
    p.add_argument("--channels-last", action="store_true", help="channels-last weights and inputs for (a)-(c')")
    p.add_argument("--compile", action="store_true", help="torch.compile for (a)-(c') and the options table")
    p.add_argument("--memory-n", type=int, nargs="*", default=None,
                   help="n values for the memory table (default 10^4 10^5, a ResNet on a CPU 10^3 10^4; "
                   "empty: skip)")
    p.add_argument("--skip", nargs="*", default=[], choices=["throughput", "forward", "memory", "selection"])
    p.add_argument("--streams-only", action="store_true",
                   help="only (b) per-point noise streams against (b1) one shared generator, interleaved")
    p.add_argument("--quick", action="store_true", help="tiny settings to check the script runs (~1 min on a CPU)")
    p.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.n is None:
        args.n = 10_000 if device.type == "cuda" else CPU_DEFAULT_N[args.model]
    if args.memory_n is None:  # a ResNet on a CPU would take minutes per 10^4 draws: one decade lower there
        slow = device.type == "cpu" and args.model.startswith("cifar_resnet")
        args.memory_n = [1_000, 10_000] if slow else [10_000, 100_000]
    if args.quick:
        args.n, args.points, args.repeats, args.forward_batches = min(args.n, 1_000), 2, 1, 2
        args.memory_n = [n // 50 for n in args.memory_n]
        args.batch_size = min(args.batch_size, 250) if args.model.startswith("cifar_resnet") else args.batch_size
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile:
        # every (mode, batch shape) pair is its own graph; the default limit of 8 would silently fall back to eager
        from torch._dynamo import config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, 64)
    if args.memory_probe is not None:
        print(json.dumps(memory_probe(args)))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    model = build_model(args.model, device)
    mode = run_mode(args, device)
    print(machine_header(args, device))
    if args.quick:
        print("**--quick: settings too small for the numbers to mean anything; use it to check the script runs.**\n")
    if args.streams_only:
        print(streams_section(args, model, device, mode))
        print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
        return
    sections = [
        ("throughput", lambda: throughput_section(args, model, device, mode)),
        ("forward", lambda: forward_modes_section(args, model, device)),
        ("memory", lambda: memory_section(args, device) if args.memory_n else ""),
        ("selection", lambda: selection_section(model, MODELS[args.model][2], device)),
    ]
    for name, section in sections:
        if name not in args.skip:
            print(section(), flush=True)
    print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
