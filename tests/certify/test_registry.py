"""Certificate kinds as a registry: certify_model computes exactly the requested kinds on the same points."""
import numpy as np
import pytest
import torch
from torch import nn

import ssmooth.certify.kinds as kinds
from ssmooth.certify.cascade import CASCADE_COLUMNS
from ssmooth.certify.results import read_rows
from ssmooth.data import IndexedDataset
from ssmooth.evaluate import CertifyConfig, certify_model

GRID = [0.125, 0.25, 0.5]


class Threshold(nn.Module):
    def forward(self, x):
        s = (x.flatten(1).mean(1) - 0.5) * 20
        return torch.stack([-s, s], dim=1)


class Level(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        return nn.functional.one_hot(torch.full((len(x),), self.k), len(GRID)).float()


def points(num=10, dim=4):
    images = torch.rand(num, 1, 1, dim, generator=torch.Generator().manual_seed(0))
    labels = (images.flatten(1).mean(1) > 0.5).long()
    return IndexedDataset(images, labels, torch.arange(num))


def config(**kw):
    base = dict(n0=16, n=400, alpha=0.01, batch_size=512, points_per_group=5, progress=False, radii=[0, 0.25, 0.5])
    return CertifyConfig(**{**base, **kw})


def test_cascade_policy_certifies_its_kinds_and_counts_every_pass(tmp_path):
    summary = certify_model(Threshold(), points(), tmp_path, config(policy="cascade"), num_classes=2, base_sigma=0.25,
                            grid=GRID, dataset="toy")
    assert summary["kinds"] == ["constant", "constant_best", "cascade"] and summary["main"] == "cascade"
    cascade = summary["variants"]["cascade"]
    assert cascade["sound"] and cascade["setting"] == kinds.ANY_INPUT and cascade["p0"] == 0.5
    rows = read_rows(tmp_path / "certify.tsv")
    assert tuple(rows.columns) == CASCADE_COLUMNS and cascade["forward_passes"] == int(rows["samples"].sum())
    # The constant file at the base level serves both the constant kind and that level of the best single level.
    files = ["certify_constant.tsv", "certify_constant_s0.125.tsv", "certify_constant_s0.5.tsv", "certify.tsv"]
    assert summary["forward_passes"] == sum(int(read_rows(tmp_path / f)["samples"].sum()) for f in files)
    assert "evaluated points" in summary["variants"]["constant_best"]["note"]


def test_routed_with_one_model_as_every_expert_is_the_inductive_certificate(tmp_path):
    selector = (Level(1), GRID, 0.5)
    experts = (GRID, [Threshold()] * 3)
    inductive = certify_model(Threshold(), points(), tmp_path / "i", config(kinds=["inductive"]), num_classes=2,
                              base_sigma=0.25, grid=GRID, dataset="toy", selector=selector)
    routed = certify_model(Threshold(), points(), tmp_path / "r", config(kinds=["routed", "cascade"]),
                           num_classes=2, base_sigma=0.25, grid=GRID, dataset="toy", selector=selector, experts=experts)
    assert routed["sigma_policy"] == "routed" and set(routed["variants"]) == {"routed", "cascade"}
    a, b = read_rows(tmp_path / "i" / "certify.tsv"), read_rows(tmp_path / "r" / "certify.tsv")
    for column in ("idx", "predict", "radius", "sigma", "level"):
        assert np.array_equal(a[column].to_numpy(), b[column].to_numpy()), column


def test_a_kind_the_model_cannot_certify_is_refused_before_the_folder_is_touched(tmp_path):
    with pytest.raises(ValueError, match="certify.kinds: routed needs"):
        certify_model(Threshold(), points(), tmp_path / "run", config(kinds=["constant", "routed"]), num_classes=2,
                      base_sigma=0.25, grid=GRID, dataset="toy")
    with pytest.raises(ValueError, match="unknown kind 'greedy'"):
        certify_model(Threshold(), points(), tmp_path / "run", config(kinds=["greedy"]), num_classes=2,
                      base_sigma=0.25, dataset="toy")
    assert not (tmp_path / "run").exists()


def test_a_new_kind_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    class Majority:
        """Always class 1, radius 0: a trivially sound certificate."""
        name = "majority"

        def needs(self, job):
            return None

        def rows(self, job):
            return []

        def entries(self, job):
            rows = job.read(job.out / "certify.tsv").assign(predict=1, radius=0.0)
            rows["correct"] = (rows["label"] == 1).astype(int)
            return {"majority": kinds.CONSTANT.entry(rows, job.radii, forward_passes=0)}

    monkeypatch.setitem(kinds.REGISTRY, "majority", Majority())
    summary = certify_model(Threshold(), points(), tmp_path, config(kinds=["constant", "majority"]), num_classes=2,
                            base_sigma=0.25, dataset="toy")
    labels = read_rows(tmp_path / "certify.tsv")["label"]
    assert summary["variants"]["majority"]["certified_accuracy"][0] == pytest.approx((labels == 1).mean())


def test_the_expert_that_is_the_model_is_certified_once(tmp_path):
    experts = (GRID, [Threshold(), Threshold(), Threshold()])
    summary = certify_model(experts[1][1], points(), tmp_path, config(kinds=["constant", "constant_best"]),
                            num_classes=2, base_sigma=0.25, grid=GRID, dataset="toy", experts=experts)
    written = sorted(p.name for p in tmp_path.glob("certify*.tsv"))
    assert written == ["certify_constant.tsv", "certify_expert_s0.125.tsv", "certify_expert_s0.5.tsv"]
    assert summary["variants"]["constant_best"]["experts"]
