"""Markdown table of the any-input measurement: every kind, certified accuracy at 0/0.5/1/1.5/2, ACR, paired
difference against constant_best (experts) with its standard error, forward passes and their ratio to constant."""
import json
import sys
from pathlib import Path

import numpy as np

from ssmooth.report.metrics import certified_accuracy, paired_difference, read_rows

root = Path(sys.argv[1])
RADII = [0.0, 0.5, 1.0, 1.5, 2.0]
entries = []
for folder in sorted(p for p in root.iterdir() if (p / "summary.json").is_file()):
    summary = json.loads((folder / "summary.json").read_text())
    for name, v in summary["variants"].items():
        rows_file = v.get("rows_file")
        if rows_file is None:
            main = summary["main"]
            rows_file = "certify.tsv" if name == main else {
                "constant": "certify_constant.tsv", "samplewise_raw": "certify_raw.tsv"}.get(
                name, f"certify_{name.removeprefix('samplewise_')}.tsv" if name.startswith("samplewise_")
                else f"certify_{name}.tsv")
        entries.append((folder.name, name, v, read_rows(folder / rows_file)))
best = next(rows for f, n, v, rows in entries if n == "constant_best")
constant_passes = next(v["forward_passes"] for f, n, v, rows in entries if n == "constant" and f == "experts")
print("| model set | kind | holds for | " + " | ".join(f"r={r:g}" for r in RADII) + " | ACR | vs constant_best (SE) | passes | x constant |")
print("|---|---|---|" + "---:|" * (len(RADII) + 4))
for folder, name, v, rows in entries:
    correct = (rows["correct"].to_numpy() == 1) & (rows["predict"].to_numpy() != -1)
    acc = certified_accuracy(rows["radius"].to_numpy(float), correct, RADII)
    d = paired_difference(rows, best)
    holds = "not a certificate" if not v["sound"] else v["setting"]
    print(f"| {folder} | {name} | {holds} | " + " | ".join(f"{100 * a:.0f}" for a in acc)
          + f" | {v['acr']:.3f} | {d['mean']:+.3f} ({d['se']:.3f}) | {v['forward_passes'] / 1e6:.2f} M | "
          f"{v['forward_passes'] / constant_passes:.2f} |")
