"""Certify every kind of the MNIST any-input measurement on the same points, one folder per model set.
usage: python certify_all.py RUN_DIR SIGMA OUT_DIR SKIP N [FOLDER ...]"""
import os
import sys
from pathlib import Path

import torch

from ssmooth.checkpoints import load_model
from ssmooth.data import load_split
from ssmooth.evaluate import CertifyConfig, certify_model

DATA = os.environ.get("SSMOOTH_DATA", "data")  # a folder with mnist/mnist_train.npz and mnist_test.npz

run, sigma, out, skip, n, *only = sys.argv[1:]
run, sigma, out, skip, n = Path(run), float(sigma), Path(out), int(skip), int(n)
torch.set_num_threads(2)
test = load_split("mnist", "test", source="npz", npz_dir=DATA)
points = test.subset(torch.arange(0, len(test), skip))
grid = [round(sigma * f, 6) for f in (0.5, 0.75, 1.0, 1.5, 2.0)]


def ckpt(stage):
    return run / stage / "checkpoints" / "last.ckpt"


samplewise, meta = load_model(ckpt("finetune_samplewise"))
experts = (grid, [load_model(ckpt(f"expert_s{s:g}"))[0] for s in grid])
table = load_model(ckpt("selector_table"))[1]["level_selector"] if ckpt("selector_table").is_file() else None
radius = load_model(ckpt("selector_radius"))[1]["level_selector"]
smaller = ckpt("selector_radius_se")  # the same selector trained and smoothed at sigma_e = sigma
base = dict(n0=100, n=n, alpha=0.001, batch_size=4000, sampling="adaptive", skip=skip, progress=True)
jobs = {
    # the sample-wise model: constant at sigma, the transductive certificates, the cascade over its grid
    "samplewise": (samplewise, dict(kinds=["constant", "samplewise", "cascade"]), {}),
    # the experts: constant at sigma is the constant arm; the best single level; the cascade of experts
    "experts": (experts[1][2], dict(policy="cascade", kinds=["constant", "constant_best", "cascade"]),
                {"experts": experts}),
    "inductive_table": (samplewise, dict(kinds=["inductive"]), {"selector": table}),
    "inductive_radius": (samplewise, dict(kinds=["inductive"]), {"selector": radius}),
    "routed_radius": (samplewise, dict(kinds=["routed"]), {"selector": radius, "experts": experts}),
}
if smaller.is_file():
    jobs["routed_radius_se"] = (samplewise, dict(kinds=["routed"]),
                                {"selector": load_model(smaller)[1]["level_selector"], "experts": experts})
for name, (model, settings, extra) in jobs.items():
    if only and name not in only:
        continue
    summary = certify_model(model, points, out / name, CertifyConfig(**base, **settings), num_classes=10,
                            base_sigma=sigma, grid=grid, dataset="mnist", meta={"name": f"mnist s{sigma:g} {name}"},
                            **extra)
    print(name, {k: (round(v["acr"], 4), v["forward_passes"]) for k, v in summary["variants"].items()}, flush=True)
