"""Wall time of sample-wise finetuning (selection included) against constant-sigma finetuning, at equal epochs,
and the certified radius each gives.

One model is pretrained with Gaussian augmentation at --sigma. From it, every arm finetunes for --epochs with the
same optimizer, data and batches:
- constant: the base level for every sample;
- full: the original selection rule, every sample at every grid level with 32 draws every 2 epochs;
- local: the default rule, a rotating fifth of the samples per epoch probes the two neighbouring levels with 4
  soft draws each, the current level's vote read off the training steps.
The arms run interleaved (constant, full, local, then the next round with the next seed), so a change in load
hits them alike; the table gives each arm's best wall time and its best and median CPU time (one thread: the
work itself, robust to other jobs on a shared machine) over the rounds, as ratios to the constant arm. Then the
models of the first --certify-rounds rounds are certified on the same test points with the same seed (n = --n,
alpha 0.001): the constant arm at the base level, the sample-wise arms with per-point levels and the fill
allocation (a sound certificate), whose ACR is the one to keep.

    .venv/bin/python benchmarks/stage_b.py --threads 2 --skip 2               # digits + MLP, a few minutes
    .venv/bin/python benchmarks/stage_b.py --threads 2 --dataset mnist --npz-dir DATA --train-subset 6000
    .venv/bin/python benchmarks/stage_b.py --quick                            # smoke run (numbers meaningless)
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import header  # noqa: E402  (the machine description every benchmark prints)

ARMS = {
    "constant": None,
    "full": dict(selection="full", num_draws=32, update_every=2, soft=False),
    "local": dict(selection="local", num_draws=4, update_every=1, soft=True, fraction=0.2),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits", choices=("digits", "mnist"))
    parser.add_argument("--npz-dir", default=None, help="folder of mnist_{train,test}.npz (dataset.source=npz)")
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=10, help="finetuning epochs of every arm")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (one seed each)")
    parser.add_argument("--first-seed", type=int, default=0, help="seed of the first round (then +1 per round)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--certify-rounds", type=int, default=1, help="certify the models of the first k rounds")
    parser.add_argument("--n", type=int, default=10_000, help="certification samples per point")
    parser.add_argument("--skip", type=int, default=1, help="certify every skip-th test point")
    parser.add_argument("--max-points", type=int, default=-1, help="certify test positions below this (-1: all)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.pretrain_epochs, args.epochs, args.rounds, args.n, args.max_points = 2, 2, 1, 200, 40
    return args


def build(args, seed: int):
    from ssmooth.data import SmoothingDataModule
    from ssmooth.models import create_model

    options = dict(name=args.dataset, seed=seed, train_subset=args.train_subset)
    if args.dataset == "mnist":
        options.update(source="npz" if args.npz_dir else "auto", npz_dir=args.npz_dir, batch_size=400)
    datamodule = SmoothingDataModule(**options)
    datamodule.setup("fit")
    info = datamodule.info
    if args.dataset == "mnist":
        model = create_model("lenet", num_classes=info.num_classes, input_shape=info.input_shape)
    else:
        model = create_model("mlp", num_classes=info.num_classes, input_shape=info.input_shape,
                             mean=info.mean, std=info.std)
    return datamodule, model


def fit(module, datamodule, epochs: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one ``trainer.fit``. With one thread and no data workers the
    CPU time is the work itself, unaffected by other jobs on a shared machine; the wall time is what a user waits."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    began, began_cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=datamodule)
    return time.perf_counter() - began, time.process_time() - began_cpu


def module_for(arm: str, model, datamodule, args, lr: float, seed: int):
    from functools import partial

    from ssmooth.lit.finetune import SigmaFinetuneModule
    from ssmooth.lit.module import SmoothingModule
    from ssmooth.noise import ConstantSigma, SampleWiseSigma, sigma_grid
    from ssmooth.objectives import GaussianAugmentation

    common = dict(model=model, objective=GaussianAugmentation(), num_classes=datamodule.info.num_classes,
                  optimizer=partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=1e-4), meta={"seed": seed})
    if ARMS.get(arm) is None:
        return SmoothingModule(noise=ConstantSigma(args.sigma), **common)
    grid = sigma_grid(args.sigma, [0.5, 0.75, 1.0, 1.5, 2.0])
    table = SampleWiseSigma(args.sigma, grid, int(datamodule.train_set.indices.max()) + 1)
    return SigmaFinetuneModule(noise=table, **common, **ARMS[arm])


def certify_acr(model, datamodule, args, samplewise: bool, out: Path) -> float:
    from ssmooth.evaluate import CertifyConfig, certify_model

    cfg = CertifyConfig(n0=100, n=args.n, alpha=0.001, batch_size=10_000, skip=args.skip, max=args.max_points,
                        policy="samplewise" if samplewise else "constant", compare_allocations=False,
                        best_constant=False, progress=False)
    points = datamodule.test_points(cfg.skip, cfg.max, cfg.start)
    grid = None
    if samplewise:
        from ssmooth.noise import sigma_grid

        grid = sigma_grid(args.sigma, [0.5, 0.75, 1.0, 1.5, 2.0])
    summary = certify_model(model, points, out, cfg, num_classes=datamodule.info.num_classes, base_sigma=args.sigma,
                            grid=grid, dataset=datamodule.info.name)
    return summary["variants"][summary["main"]]["acr"], len(points)


def main(argv=None) -> None:
    import lightning as L

    from ssmooth.lit.module import SmoothingModule
    from ssmooth.noise import ConstantSigma
    from ssmooth.objectives import GaussianAugmentation

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging
    import warnings

    # One trainer per arm and round: keep Lightning's per-fit banner and warnings out of the printed tables.
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    print(header(args, torch.device("cpu")), flush=True)

    L.seed_everything(0, verbose=False)
    datamodule, model = build(args, seed=0)
    pretrain = SmoothingModule(model=model, objective=GaussianAugmentation(), noise=ConstantSigma(args.sigma),
                               optimizer=lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9,
                                                                        weight_decay=1e-4),
                               num_classes=datamodule.info.num_classes)
    pretrain_s, _ = fit(pretrain, datamodule, args.pretrain_epochs)
    pretrained = copy.deepcopy(model.state_dict())
    print(f"pretrained {args.dataset} ({len(datamodule.train_set)} training images) for {args.pretrain_epochs} "
          f"epochs at sigma {args.sigma} in {pretrain_s:.1f} s\n")

    times = {arm: [] for arm in args.arms}
    cpu = {arm: [] for arm in args.arms}
    acr = {arm: [] for arm in args.arms}
    with tempfile.TemporaryDirectory(prefix="stage_b_") as tmp:
        for r in range(args.rounds):
            seed = args.first_seed + r
            for arm in args.arms:
                L.seed_everything(seed, verbose=False)
                datamodule, model = build(args, seed=seed)
                model.load_state_dict(pretrained)
                module = module_for(arm, model, datamodule, args, lr=0.01, seed=seed)
                wall, used = fit(module, datamodule, args.epochs)
                times[arm].append(wall)
                cpu[arm].append(used)
                if r < args.certify_rounds:
                    value, num_points = certify_acr(model, datamodule, args, arm != "constant",
                                                    Path(tmp) / f"{arm}_{seed}")
                    acr[arm].append(value)
                shown = f"   ACR {acr[arm][-1]:.3f}" if r < args.certify_rounds else ""
                print(f"round {r} (seed {seed}): {arm:8s} wall {wall:7.1f} s  CPU {used:7.1f} s{shown}", flush=True)

    print(f"\n## Finetuning time, {args.epochs} epochs, {args.rounds} interleaved rounds (selection included)\n")
    print("| arm | wall s, best | wall / constant (best) | CPU s, best | CPU / constant (best) | CPU / constant "
          "(median) | ACR mean | ACR per round |")
    print("|---|---|---|---|---|---|---|---|")
    base = "constant" if "constant" in args.arms else args.arms[0]  # ratios are to the constant arm if it ran
    for arm in args.arms:
        mean = f"{statistics.mean(acr[arm]):.3f}" if acr[arm] else "-"
        print(f"| {arm} | {min(times[arm]):.1f} | {min(times[arm]) / min(times[base]):.2f} | "
              f"{min(cpu[arm]):.1f} | {min(cpu[arm]) / min(cpu[base]):.2f} | "
              f"{statistics.median(cpu[arm]) / statistics.median(cpu[base]):.2f} | "
              f"{mean} | {', '.join(f'{a:.3f}' for a in acr[arm])} |")
    if base != "constant":
        print(f"\n(no constant arm in this run: time ratios are to the {base} arm)")
    if args.certify_rounds:
        print(f"\nACR of the first {min(args.certify_rounds, args.rounds)} round(s): {num_points} test points, "
              f"n0 = 100, n = {args.n:,}, alpha = 0.001; constant arm at sigma {args.sigma}, sample-wise arms with "
              "per-point levels and the fill allocation.")
    print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
