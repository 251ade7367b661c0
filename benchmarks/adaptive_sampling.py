"""Fixed n against adaptive sample sizes: forward passes, time, ACR and certified accuracy on the same points.

One run per dataset: the same model and the same test points are certified with CERTIFY at a fixed n and with
adaptive sample sizes at several ``max_radius_loss`` settings (l2 units). Forward passes are counted per point
(pilot/selection draws included), so the saving is a ratio that holds on any hardware; wall and CPU seconds are
printed beside them (the CPU may be shared: CPU seconds are the steadier of the two). ACR carries its standard
error over points; the ACR loss D carries the standard error of the paired per-point difference.

By default every arm comes from one pilot and one pool of n estimation draws per point (common random
numbers, ``run_shared``): each arm is distributed exactly as its own run would be, the paired loss is more
precise, and the whole comparison costs one fixed-n run; per-arm times are then estimated from the forward
passes. ``--independent`` runs ``certify`` and ``certify_adaptive`` themselves, one run per arm with its own
draws and measured times.

The models are trained here (Gaussian augmentation, a few minutes on a CPU) unless a saved one is in
--work-dir; finished runs are saved there too, so an interrupted benchmark resumes.

    python benchmarks/adaptive_sampling.py --dataset cifar10 --n 10000 --points 200     # CPU, about an hour
    python benchmarks/adaptive_sampling.py --dataset mnist --n 100000 --points 200      # GPU (or hours of CPU)
    python benchmarks/adaptive_sampling.py --dataset cifar10 --n 100000 --points 500 --device cuda

The last line reads ``adaptive: <R>x fewer forward passes, ACR loss <D>`` for the recommended setting: the
cheapest one whose ACR loss is at most --target-loss (else the one with the smallest loss).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from certify_throughput import machine_header  # noqa: E402

from ssmooth.certify import certify, certify_adaptive, sample_counts  # noqa: E402
from ssmooth.certify.adaptive import certificate_from_counts, choose_sample_sizes, default_sizes  # noqa: E402
from ssmooth.data import dataset_info, load_split  # noqa: E402
from ssmooth.models import Normalize, create_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# How each model is trained here. CIFAR-10 gets a very small conv net (about 0.15 M multiply-adds per image,
# 1/30 of LeNet's on 3x32x32): on a shared 2-core CPU the fixed-n arm alone is 2 M forward passes.
SETUPS = {
    "mnist": dict(model="lenet", train_points=20_000, epochs=3, sigma=0.25, lr=1e-3),
    "cifar10": dict(model="micro_conv", train_points=4_000, epochs=15, sigma=0.25, lr=3e-3),
}


def micro_conv(num_classes: int = 10) -> torch.nn.Module:
    """conv 8@3x3 stride 2, conv 16@3x3 stride 2, fc: a benchmark-only CIFAR-10 net, cheap enough for a CPU."""
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(16 * 8 * 8, num_classes),
    )


def build_model(dataset: str) -> torch.nn.Module:
    info = dataset_info(dataset)
    if SETUPS[dataset]["model"] == "micro_conv":
        # normalization as the first layer, as for every model of the project
        return torch.nn.Sequential(Normalize(info.mean, info.std), micro_conv(info.num_classes))
    return create_model(SETUPS[dataset]["model"], num_classes=info.num_classes, input_shape=info.input_shape)


def train(dataset: str, npz_dir: Path, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """Gaussian augmentation (Cohen et al.): cross-entropy on one noisy copy per image per step, Adam."""
    setup = SETUPS[dataset]
    torch.manual_seed(seed)
    data = load_split(dataset, "train", source="npz", npz_dir=npz_dir, augment=dataset == "cifar10")
    data = data.subset(slice(0, setup["train_points"]))
    model = build_model(dataset)
    optimizer = torch.optim.Adam(model.parameters(), lr=setup["lr"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, setup["epochs"])
    loader = torch.utils.data.DataLoader(data, batch_size=128, shuffle=True)
    began = time.perf_counter()
    model.train()
    for _ in range(setup["epochs"]):
        for x, y, _ in loader:
            loss = F.cross_entropy(model(x + setup["sigma"] * torch.randn_like(x)), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        scheduler.step()
    minutes = (time.perf_counter() - began) / 60
    how = (f"{setup['model']} trained here with Gaussian augmentation at sigma {setup['sigma']}: first "
           f"{len(data)} training images, {setup['epochs']} epochs, Adam lr {setup['lr']} cosine, batch 128, "
           f"{minutes:.1f} min on this machine")
    model.eval()
    return model, how


def load_or_train(dataset: str, npz_dir: Path, work_dir: Path) -> tuple[torch.nn.Module, str]:
    """The saved model of an earlier run, else one trained now (and saved)."""
    path = work_dir / f"{dataset}_{SETUPS[dataset]['model']}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        model = build_model(dataset)
        model.load_state_dict(saved["state_dict"])
        return model.eval(), saved["how"]
    model, how = train(dataset, npz_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "how": how}, path)
    return model, how


def run_arm(model, x, args, loss: float | None, device) -> dict:
    """Certify all points in groups; None: fixed n. Returns per-point arrays and the arm's time."""
    predictions, radii, samples = [], [], []
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(x), args.group):
        # A different stream per arm and group: no arm reuses another's draws.
        generator = torch.Generator(device=device).manual_seed(args.seed * 1_000 + start + (0 if loss is None else
                                                                                           int(loss * 1e6) + 1))
        kw = dict(n0=args.n0, n=args.n, alpha=args.alpha, batch_size=args.batch_size, num_classes=10,
                  generator=generator)
        xs = x[start : start + args.group].to(device)
        if loss is None:
            cert = certify(model, xs, args.sigma, **kw)
            used = torch.full((len(xs),), args.n0 + args.n)
        else:
            cert = certify_adaptive(model, xs, args.sigma, max_radius_loss=loss, **kw)
            used = cert.samples
        predictions.append(cert.prediction)
        radii.append(cert.radius)
        samples.append(used)
    return {"prediction": torch.cat(predictions).tolist(), "radius": torch.cat(radii).tolist(),
            "samples": torch.cat(samples).tolist(), "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu}


def run_shared(model, x, args, device) -> dict:
    """Every arm from ONE pilot and ONE pool of n estimation draws per point (common random numbers).

    Fixed n uses the pilot and the whole pool; adaptive at each setting uses the same pilot and the first n_i
    draws of the pool. Each arm on its own is distributed exactly as a separate run of its procedure (the
    first n_i of i.i.d. draws are i.i.d. and independent of the pilot, and n_i depends on the pilot only), so
    its forward passes and ACR are what that run would give; the arms are correlated, which makes the paired
    ACR loss more precise. Costs one fixed-n run. Per-arm times are estimated as forward passes times the
    measured time per pass.
    """
    menu = default_sizes(args.n)
    arms = {loss: {"prediction": [], "radius": [], "samples": []} for loss in [None, *args.losses]}
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(x), args.group):
        xs = x[start : start + args.group].to(device)
        generator = torch.Generator(device=device).manual_seed(args.seed * 1_000 + start)
        kw = dict(batch_size=args.batch_size, num_classes=10, generator=generator)
        pilot = sample_counts(model, xs, args.sigma, args.n0, **kw).cpu()
        cA = pilot.argmax(dim=1)
        kA = pilot.gather(1, cA[:, None]).squeeze(1).numpy()
        # votes for cA among the first s pool draws, for every size s of the menu
        prefix, total, drawn = {}, torch.zeros_like(pilot), 0
        for size in menu:
            total += sample_counts(model, xs, args.sigma, size - drawn, **kw).cpu()
            drawn = size
            prefix[size] = total.gather(1, cA[:, None]).squeeze(1)
        for loss, arm in arms.items():
            n_i = (np.full(len(xs), args.n) if loss is None else
                   choose_sample_sizes(kA, args.n0, args.sigma, menu, args.alpha, loss))
            nA = torch.stack([prefix[int(s)][j] for j, s in enumerate(n_i)])
            cert = certificate_from_counts(cA, nA, n_i, args.n0, args.alpha, args.sigma)
            arm["prediction"] += cert.prediction.tolist()
            arm["radius"] += cert.radius.tolist()
            arm["samples"] += cert.samples.tolist()
        print(f"  points {start}-{start + len(xs) - 1} done", flush=True)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    passes = len(x) * (args.n0 + args.n)
    for arm in arms.values():
        share = sum(arm["samples"]) / passes
        arm["wall_s"], arm["cpu_s"] = wall * share, cpu * share
    return arms


def sizes_only(model, x, args, device) -> None:
    """Forward passes of each adaptive setting, exactly, from the pilot draws alone (n_i depends on nothing
    else); the estimation draws are not made, so no ACR is measured."""
    generator = torch.Generator(device=device).manual_seed(args.seed)
    pilot = sample_counts(model, x.to(device), args.sigma, args.n0, batch_size=args.batch_size, num_classes=10,
                          generator=generator).cpu()
    kA = pilot.max(dim=1).values.numpy()
    fixed = len(x) * (args.n0 + args.n)
    print("| setting | forward passes | fewer | points at n | points at the smallest size |\n|---|---|---|---|---|")
    print(f"| fixed n | {fixed:,} | 1.00x | {len(x)} | 0 |")
    menu = default_sizes(args.n)
    for loss in args.losses:
        n_i = choose_sample_sizes(kA, args.n0, args.sigma, menu, args.alpha, loss)
        passes = int((args.n0 + n_i).sum())
        print(f"| adaptive, max_radius_loss {loss:g} | {passes:,} | {fixed / passes:.2f}x | "
              f"{int((n_i == args.n).sum())} | {int((n_i == menu[0]).sum())} |")


def arm_key(args, loss) -> str:
    setting = loss if isinstance(loss, str) else "fixed" if loss is None else f"adaptive_{loss:g}"
    if loss == "shared":
        setting += "_" + "_".join(f"{v:g}" for v in args.losses)
    return f"{args.dataset}_{SETUPS[args.dataset]['model']}_n{args.n}_n0{args.n0}_a{args.alpha:g}_p{args.points}_s{args.seed}_{setting}.json"


def table(arms: dict, labels: np.ndarray, radii: list[float]) -> tuple[str, dict]:
    fixed = arms[None]
    fixed_score = np.asarray(fixed["radius"]) * (np.asarray(fixed["prediction"]) == labels)
    fixed_passes = sum(fixed["samples"])
    head = ("| setting | forward passes | fewer | wall s | CPU s | ACR (SE) | ACR loss D (paired SE) | "
            + " | ".join(f"r={r:g}" for r in radii) + " |")
    lines = [head, "|" + "---|" * (7 + len(radii))]
    summary = {}
    for loss, arm in arms.items():
        correct = np.asarray(arm["prediction"]) == labels
        score = np.asarray(arm["radius"]) * correct
        passes = sum(arm["samples"])
        ratio = fixed_passes / passes
        diff = fixed_score - score
        acc = [100 * float(np.mean(correct & (np.asarray(arm["radius"]) >= r))) for r in radii]
        name = "fixed n" if loss is None else f"adaptive, max_radius_loss {loss:g}"
        se = score.std(ddof=1) / np.sqrt(len(score))
        dse = diff.std(ddof=1) / np.sqrt(len(diff))
        lines.append(f"| {name} | {passes:,} | {ratio:.2f}x | {arm['wall_s']:.0f} | {arm['cpu_s']:.0f} | "
                     f"{score.mean():.4f} ({se:.4f}) | {diff.mean():.4f} ({dse:.4f}) | "
                     + " | ".join(f"{a:.1f}" for a in acc) + " |")
        summary[loss] = (ratio, float(diff.mean()))
    return "\n".join(lines), summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(SETUPS), required=True)
    parser.add_argument("--npz-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/adaptive_sampling"))
    parser.add_argument("--points", type=int, default=200, help="the first POINTS test images")
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--losses", type=float, nargs="+", default=[0.01, 0.02, 0.04])
    parser.add_argument("--target-loss", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--group", type=int, default=50, help="points per certify call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--independent", action="store_true",
                        help="a separate run per arm with its own draws and measured times (default: all arms "
                             "from one pilot and one pool of draws, the cost of one fixed-n run)")
    parser.add_argument("--arms", choices=("all", "fixed", "adaptive"), default="all",
                        help="with --independent: run only these arms (two processes can share the work)")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--sizes-only", action="store_true",
                        help="pilot draws only: the exact forward passes of each setting, no ACR")
    args = parser.parse_args(argv)
    args.sigma = SETUPS[args.dataset]["sigma"]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(machine_header(args, device), flush=True)
    model, how = load_or_train(args.dataset, args.npz_dir, args.work_dir)
    print(f"- model: {how}", flush=True)
    if args.train_only:
        return
    model = model.to(device).eval()
    test = load_split(args.dataset, "test", source="npz", npz_dir=args.npz_dir).subset(slice(0, args.points))
    labels = test.labels.numpy()
    print(f"- points: test images 0-{len(test) - 1} ({len(test)}), sigma {args.sigma}, n0 {args.n0}, n {args.n}, "
          f"alpha {args.alpha}, batch {args.batch_size}, {args.group} points per certify call\n")
    if args.sizes_only:
        sizes_only(model, test.images, args, device)
        return
    if not args.independent:
        path = args.work_dir / arm_key(args, "shared")
        if path.is_file():
            arms = {None if k == "fixed" else float(k): v for k, v in json.loads(path.read_text()).items()}
        else:
            arms = run_shared(model, test.images, args, device)
            path.write_text(json.dumps({"fixed" if k is None else str(k): v for k, v in arms.items()}))
        report(arms, labels, args, timing="estimated from the shared run")
        return
    arms = {}
    for loss in [None, *args.losses]:
        path = args.work_dir / arm_key(args, loss)
        if path.is_file():
            arms[loss] = json.loads(path.read_text())
            continue
        if args.arms != "all" and (loss is None) != (args.arms == "fixed"):
            continue  # another process runs this arm
        arms[loss] = run_arm(model, test.images, args, loss, device)
        path.write_text(json.dumps(arms[loss]))
        print(f"  done: {'fixed' if loss is None else loss} in {arms[loss]['wall_s']:.0f} s", flush=True)
    missing = [loss for loss in [None, *args.losses] if loss not in arms]
    if missing:
        print(f"arms still to run (rerun with --arms all to run them, or wait for the other process): {missing}")
        return
    report(arms, labels, args, timing="measured per arm")


def report(arms: dict, labels: np.ndarray, args, timing: str) -> None:
    text, summary = table(arms, labels, [0.0, 0.25, 0.5, 0.75, 1.0])
    print(f"\nTimes: {timing}.\n")
    print(text)
    print(f"\n- load average at end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    within = {loss: rd for loss, rd in summary.items() if loss is not None and rd[1] <= args.target_loss}
    if within:
        best = max(within, key=lambda loss: within[loss][0])
    else:
        best = min((loss for loss in summary if loss is not None), key=lambda loss: summary[loss][1])
    ratio, loss_d = summary[best]
    print(f"- recommended: max_radius_loss {best:g}")
    print(f"adaptive: {ratio:.2f}x fewer forward passes, ACR loss {loss_d:.4f}")


if __name__ == "__main__":
    main()
