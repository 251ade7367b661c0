"""ssmooth-certify against the certification inside the pipeline: the same checkpoint, points and settings.

    .venv/bin/python benchmarks/cli_vs_pipeline.py                        # digits MLP (demo: batch 10,000)
    .venv/bin/python benchmarks/cli_vs_pipeline.py --experiment mnist_gaussian --data DIR --skip 500   # LeNet, 4,000

Each repeat runs, one after the other (interleaved, so a change in load hits all alike), each in a fresh process:
  pipeline        ssmooth-train stage=pretrain (one short epoch), then its own certification in the same process;
  cli             ssmooth-certify on that run's last.ckpt with the same certify.* settings, the batch size not
                  given (it takes the checkpoint's own);
  cli-batch-1000  the same with certify.batch_size=1000, the command's default before it took the checkpoint's.
The time compared is the summary's wall_time_s: the certification alone, not start-up, imports or training,
over the same points with the same rows. It prints the machine, the medians and the ratios to the pipeline.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def certify_settings(args) -> list[str]:
    # the demo's (conf/experiment/demo.yaml) on fewer points
    return [f"certify.skip={args.skip}", "certify.policy=constant", "certify.n0=100", f"certify.n={args.n}", "certify.alpha=0.001",
            "certify.radii=[0.0,0.25,0.5,0.75,1.0]", "certify.progress=false"]


def run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")


def wall(folder: Path) -> float:
    return float(json.loads((folder / "summary.json").read_text())["wall_time_s"])


def one_repeat(args, out: Path, k: int) -> dict[str, float]:
    settings = certify_settings(args)
    data = ["dataset.source=npz", f"dataset.npz_dir={args.data}"] if args.data else []
    train = out / f"train{k}"
    run([str(BIN / "ssmooth-train"), f"experiment={args.experiment}", "stage=pretrain", "trainer.max_epochs=1",
         "dataset.train_subset=512", f"hydra.run.dir={train}", "trainer.enable_progress_bar=false", *data,
         *settings])
    ckpt = train / "checkpoints" / "last.ckpt"
    times = {"pipeline": wall(train)}
    for name, extra in (("cli", []), ("cli-batch-1000", ["certify.batch_size=1000"])):
        folder = out / f"{name}{k}"
        run([str(BIN / "ssmooth-certify"), f"ckpt={ckpt}", f"hydra.run.dir={folder}", *data, *settings, *extra])
        times[name] = wall(folder)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", type=int, default=6, help="every skip-th test digit (6: 60 points)")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--experiment", default="demo", help="the recipe whose certify settings are compared")
    parser.add_argument("--data", default=None, help="folder of the .npz files (MNIST, CIFAR-10 recipes)")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, load {os.getloadavg()[0]:.1f}")
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.repeats):
            for name, seconds in one_repeat(args, Path(tmp), k).items():
                results.setdefault(name, []).append(seconds)
            print(f"repeat {k + 1}: " + ", ".join(f"{n} {v[-1]:.2f} s" for n, v in results.items()), flush=True)
    base = statistics.median(results["pipeline"])
    print(f"load at the end {os.getloadavg()[0]:.1f}\n\n| run | median wall time (s) | ratio to the pipeline |\n|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / base:.2f} |")


if __name__ == "__main__":
    main()
