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
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
test = load_split("mnist", "test", source="npz", npz_dir=DATA)
points = test.subset(torch.arange(0, len(test), skip))
grid = [round(sigma * f, 6) for f in (0.5, 0.75, 1.0, 1.5, 2.0)]


def ckpt(stage):
    return run / stage / "checkpoints" / "last.ckpt"


samplewise, meta = load_model(ckpt("finetune_samplewise"))
experts = (grid, [load_model(ckpt(f"expert_s{s:g}"))[0] for s in grid])


def selector(stage):
    return load_model(ckpt(stage))[1]["level_selector"]


base = dict(n0=100, n=n, alpha=0.001, batch_size=4000, sampling="adaptive", skip=skip, progress=True)
# In order of what the comparison needs first; each job is one run folder (resumable).
jobs = {
    # the experts: constant at sigma is the constant arm; the best single level; the cascade of experts
    "experts": lambda: (experts[1][2], dict(policy="cascade", kinds=["constant", "constant_best", "cascade"]),
                        {"experts": experts}),
    # the radius-trained selector smoothed at the largest level, routing to the experts: both certificates
    "routed_radius": lambda: (samplewise, dict(kinds=["routed", "routed_set"]),
                              {"selector": selector("selector_radius"), "experts": experts}),
    # the sample-wise model: its constant certificate at sigma and the transductive certificates
    "samplewise": lambda: (samplewise, dict(kinds=["constant", "samplewise"]), {}),
    # the same selector with the sample-wise model at every level
    "inductive_radius": lambda: (samplewise, dict(kinds=["inductive_set", "inductive"]),
                                 {"selector": selector("selector_radius")}),
    # the radius-trained selector smoothed at the base level (the default), routing to the experts
    "routed_radius_se": lambda: (samplewise, dict(kinds=["routed_set"]),
                                 {"selector": selector("selector_radius_se"), "experts": experts}),
    # the radius-trained selector at the largest level with class-balance weights (1 / share of its best level)
    "routed_balanced": lambda: (samplewise, dict(kinds=["routed_set", "routed"]),
                                {"selector": selector("selector_radius_balanced"), "experts": experts}),
    # the sample-wise model's own best single level (the experts' is the baseline above)
    "samplewise_best": lambda: (samplewise, dict(kinds=["constant_best"]), {}),
    "samplewise_cascade": lambda: (samplewise, dict(policy="cascade", kinds=["cascade"]), {}),
    "inductive_table": lambda: (samplewise, dict(kinds=["inductive"]), {"selector": selector("selector_table")}),
}
for name, job in jobs.items():
    if only and name not in only:
        continue
    model, settings, extra = job()
    summary = certify_model(model, points, out / name, CertifyConfig(**base, **settings), num_classes=10,
                            base_sigma=sigma, grid=grid, dataset="mnist", meta={"name": f"mnist s{sigma:g} {name}"},
                            **extra)
    print(name, {k: (round(v["acr"], 4), v["forward_passes"]) for k, v in summary["variants"].items()}, flush=True)
