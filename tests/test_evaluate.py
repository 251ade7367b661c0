"""certify_model: every variant written, allocation verified before anything is written, resume by index."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import ssmooth.evaluate as evaluate
from ssmooth.certify import AllocationError
from ssmooth.certify.allocation import Allocation
from ssmooth.data import IndexedDataset
from ssmooth.evaluate import CertifyConfig, certify_model


class Threshold(nn.Module):
    """Class 1 when the mean pixel exceeds 0.5: a fixed, well-understood classifier."""

    def forward(self, x):
        s = (x.flatten(1).mean(1) - 0.5) * 20
        return torch.stack([-s, s], dim=1)


def points(num=12, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(num, 1, 1, dim, generator=g)
    labels = (images.flatten(1).mean(1) > 0.5).long()
    return IndexedDataset(images, labels, torch.arange(100, 100 + num))


def config(**kw):
    base = dict(n0=16, n=400, alpha=0.01, batch_size=512, points_per_group=5, progress=False, radii=[0, 0.25, 0.5])
    return CertifyConfig(**{**base, **kw})


def test_samplewise_run_writes_every_variant_and_a_sound_allocation(tmp_path):
    data = points()
    summary = certify_model(Threshold(), data, tmp_path, config(policy="samplewise"), num_classes=2,
                            base_sigma=0.25, grid=[0.125, 0.25, 0.5], dataset="toy")
    assert set(summary["variants"]) == {"constant", "constant_best", "samplewise_raw", "samplewise_fill",
                                        "samplewise_halving", "samplewise_lp"}
    best = summary["variants"]["constant_best"]
    assert best["acr"] == max(best["acr_by_sigma"].values()) and set(best["acr_by_sigma"]) == {"0.125", "0.25", "0.5"}
    assert best["acr"] >= summary["variants"]["constant"]["acr"] and best["setting"] == "any input"
    assert summary["main"] == "samplewise_fill" and summary["variants"]["samplewise_raw"]["sound"] is False
    fill = summary["variants"]["samplewise_fill"]
    assert fill["num_points_T"] == 12 and "num_conflicting_pairs" in fill
    rows = np.genfromtxt(tmp_path / "certify.tsv", delimiter="\t", names=True)
    assert (rows["radius"] <= rows["radius_raw"] + 1e-12).all()
    assert set(np.unique(rows["sigma"])) <= {0.125, 0.25, 0.5}
    assert json.loads((tmp_path / "summary.json").read_text())["points"]["indices"] == list(range(100, 112))


def test_an_allocation_violation_stops_the_run_before_results_are_written(tmp_path, monkeypatch):
    def broken(x, sigma, radius, rule):
        return Allocation(radius=np.asarray(radius) * 10 + 1, rule=rule, num_points=len(radius), num_conflicts=0,
                          mean_ratio=1.0)

    monkeypatch.setattr(evaluate, "allocate", broken)
    with pytest.raises(AllocationError):
        certify_model(Threshold(), points(), tmp_path, config(policy="samplewise"), num_classes=2, base_sigma=0.25,
                      grid=[0.125, 0.25, 0.5], dataset="toy")
    assert not (tmp_path / "summary.json").exists()
    assert not (tmp_path / "certify.tsv").exists()


def test_rerun_into_the_same_folder_resumes_and_does_not_recompute(tmp_path):
    data = points()
    first = certify_model(Threshold(), data, tmp_path, config(), num_classes=2, base_sigma=0.25, dataset="toy")
    before = (tmp_path / "certify.tsv").read_text()
    again = certify_model(Threshold(), data, tmp_path, config(), num_classes=2, base_sigma=0.25, dataset="toy")
    assert (tmp_path / "certify.tsv").read_text() == before
    assert again["variants"] == first["variants"]


@pytest.mark.parametrize("key, value", [("n0", 0), ("alpha", 0.0), ("policy", "adaptive"), ("allocation", "greedy"),
                                        ("autocast", "int8"), ("skip", 0)])
def test_bad_certify_settings_name_key_and_value(key, value):
    with pytest.raises(ValueError, match=f"certify.{key}={value!r}"):
        config(**{key: value}).validate()
