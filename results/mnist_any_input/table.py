"""Markdown table of the any-input measurement: every kind, certified accuracy at 0/0.5/1/1.5/2, ACR, paired
difference against constant_best (experts) with its standard error, the largest loss of certified accuracy against
constant_best at a radius of the grid (percentage points), forward passes and their ratio to constant."""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from ssmooth.report.metrics import certified_radii, paired_difference, read_rows, summarize_rows

root = Path(sys.argv[1])
RADII = [0.0, 0.5, 1.0, 1.5, 2.0]
entries = []
for folder in sorted(p for p in root.iterdir() if (p / "summary.json").is_file()):
    summary = json.loads((folder / "summary.json").read_text())
    for name, v in summary["variants"].items():
        # the kind's own file when it has one, else the run's main file (as ssmooth-report reads them)
        short = {"constant": "constant", "samplewise_raw": "raw"}.get(name, name.removeprefix("samplewise_"))
        candidates = [v.get("rows_file"), f"certify_{name}.tsv", f"certify_{short}.tsv", "certify.tsv"]
        rows_file = next(f for f in candidates if f and (folder / f).is_file())
        entries.append((folder.name, name, v, read_rows(folder / rows_file)))
best_folder, best = next((f, rows) for f, n, v, rows in entries if n == "constant_best")


def accuracy(rows):
    return summarize_rows(rows, RADII)["certified_accuracy"]


best_acc = accuracy(best)
# the constant certificate the cost is measured against: the experts' (the constant arm), else the first one
constant_passes = next(v["forward_passes"] for f, n, v, rows in sorted(entries, key=lambda e: e[0] != best_folder)
                       if n == "constant")
print("| model set | kind | holds for | " + " | ".join(f"r={r:g}" for r in RADII) + " | ACR | vs constant_best (SE) | largest loss | passes | x constant |")
print("|---|---|---|" + "---:|" * (len(RADII) + 5))
for folder, name, v, rows in entries:
    acc = accuracy(rows)
    loss = max(0.0, 100 * max(b - a for a, b in zip(acc, best_acc)))
    d = paired_difference(rows, best)
    holds = "not a certificate" if not v["sound"] else v["setting"]
    print(f"| {folder} | {name} | {holds} | " + " | ".join(f"{100 * a:.0f}" for a in acc)
          + f" | {v['acr']:.3f} | {d['mean']:+.3f} ({d['se']:.3f}) | {loss:.0f} | {v['forward_passes'] / 1e6:.2f} M | "
          f"{v['forward_passes'] / constant_passes:.2f} |")

# What a perfect selector could reach: each point at the expert level that certifies it farthest (rows at the
# full alpha, levels picked with the labels). Not a certificate; it bounds what routing can gain.
levels = sorted((root / best_folder).glob("certify_expert_s*.tsv")) + sorted(
    (root / best_folder).glob("certify_constant.tsv"))
if len(levels) > 1:
    radii = pd.concat([certified_radii(read_rows(p)) for p in levels], axis=1).max(axis=1)
    gain = (radii - certified_radii(best)).to_numpy()
    print(f"\nper-point best expert level (not a certificate): ACR {radii.mean():.3f}, "
          f"{gain.mean():+.3f} ({gain.std(ddof=1) / np.sqrt(len(gain)):.3f}) against constant_best; it differs "
          f"from the best single level at {int((gain > 1e-9).sum())} of {len(gain)} points")
