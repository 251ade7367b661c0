"""certify_model: every variant written, allocation verified before anything is written, resume by index."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import ssmooth.evaluate as evaluate
import ssmooth.certify.kinds.samplewise as samplewise_kind
from ssmooth.certify import AllocationError
from ssmooth.certify.allocation import Allocation
from ssmooth.certify.results import read_rows
from ssmooth.certify.runfolder import FingerprintMismatch, FolderLocked, open_run_folder
from ssmooth.data import IndexedDataset
from ssmooth.evaluate import CertificationInterrupted, CertifyConfig, certify_model


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
                          mean_ratio=1.0, answered=np.asarray(radius) > 0, num_dropped=0)

    monkeypatch.setattr(samplewise_kind, "allocate", broken)
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


# ---------------------------------------------------------------------------------------- the folder contract

class Shifted(Threshold):
    """Another checkpoint: the same architecture with other weights."""

    def __init__(self, shift=0.0):
        super().__init__()
        self.register_buffer("shift", torch.tensor(float(shift)))

    def forward(self, x):
        return super().forward(x + self.shift)


def certify_toy(out, model=None, data=None, **kw):
    return certify_model(model if model is not None else Shifted(), data if data is not None else points(), out,
                         config(**kw), num_classes=2, base_sigma=0.25, dataset="toy")


def folder_bytes(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "certify.lock"}


@pytest.mark.parametrize("change, key", [(dict(n=800), "n"), (dict(seed=1), "seed"), (dict(sigma=0.5), "sigma"),
                                         (dict(start=3), "points_sha256"), (dict(model=1.0), "checkpoint_sha256")])
def test_rerun_with_other_settings_or_another_checkpoint_is_refused_before_any_work(tmp_path, change, key, monkeypatch):
    certify_toy(tmp_path)
    before = folder_bytes(tmp_path)
    change = dict(change)
    model = Shifted(change.pop("model")) if "model" in change else None
    data = points().subset(list(range(change.pop("start"), 12))) if "start" in change else None
    monkeypatch.setattr(evaluate, "certify_points", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(FingerprintMismatch) as info:
        certify_toy(tmp_path, model=model, data=data, **change)
    message = str(info.value)
    assert f"settings: {key} " in message and "new folder" in message and "certify.overwrite=true" in message
    assert folder_bytes(tmp_path) == before  # rows, summary and fingerprint untouched


def test_overwrite_starts_the_folder_afresh(tmp_path):
    certify_toy(tmp_path, n=800)
    summary = certify_toy(tmp_path, overwrite=True)
    assert summary["fingerprint"]["n"] == 400 and summary["points"]["count"] == 12
    assert read_rows(tmp_path / "certify.tsv")["idx"].tolist() == list(range(100, 112))


def test_a_second_writer_is_refused(tmp_path, monkeypatch):
    certify_toy(tmp_path)
    monkeypatch.setattr(evaluate, "certify_points", lambda *a, **k: pytest.fail("work started"))
    with open_run_folder(tmp_path, json.loads((tmp_path / "fingerprint.json").read_text())):
        with pytest.raises(FolderLocked, match="in use by another certification"):
            certify_toy(tmp_path)


def test_summary_counts_exactly_the_requested_points(tmp_path):
    certify_toy(tmp_path)
    first_row = (tmp_path / "certify.tsv").read_text().splitlines()[1].split("\t")
    with open(tmp_path / "certify.tsv", "a") as f:  # a stray row of a point that was not asked for
        f.write("\t".join(["999", *first_row[1:]]) + "\n")
    summary = certify_toy(tmp_path)
    assert summary["points"]["indices"] == list(range(100, 112)) and summary["variants"]["constant"]["num_points"] == 12
    lines = (tmp_path / "certify.tsv").read_text().splitlines(keepends=True)  # drop the stray row and index 111
    (tmp_path / "certify.tsv").write_text("".join(line for line in lines if not line.startswith(("999\t", "111\t"))))
    again = certify_toy(tmp_path)  # the missing point is certified, not left out of the denominator
    assert again["points"]["indices"] == list(range(100, 112)) and again["variants"]["constant"]["num_points"] == 12


def test_ctrl_c_says_what_was_kept_and_the_same_command_resumes(tmp_path, monkeypatch):
    real = evaluate.certify_points
    data = points()

    def interrupted(model, pts, writer, **kw):
        real(model, pts.subset(list(range(7))), writer, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "certify_points", interrupted)
    with pytest.raises(CertificationInterrupted,
                       match=r"^interrupted: 7/12 rows kept in .*certify.tsv; re-run the same command to resume$"):
        certify_toy(tmp_path, data=data, points_per_group=7)
    kept = (tmp_path / "certify.tsv").read_bytes()
    monkeypatch.setattr(evaluate, "certify_points", real)
    summary = certify_toy(tmp_path, data=data, points_per_group=7)  # the lock was released; no duplicates
    assert (tmp_path / "certify.tsv").read_bytes().startswith(kept)
    assert read_rows(tmp_path / "certify.tsv")["idx"].is_unique and summary["points"]["count"] == 12


def test_split_train_certifies_training_points_without_augmentation():
    images = torch.rand(10, 1, 2, 2)
    train = IndexedDataset(images, torch.arange(10) % 2, torch.arange(10), transform=lambda x: x * 0)

    class Data:
        train_set = train

        def setup(self, stage=None):
            pass

        def test_points(self, *a):
            raise AssertionError("the test split was used")

    chosen = evaluate.certification_points(Data(), config(split="train", skip=3, start=1, max=9))
    assert chosen.indices.tolist() == [1, 4, 7]
    assert torch.equal(torch.stack([chosen[i][0] for i in range(3)]), images[[1, 4, 7]])


KILLED = """
import sys, time, torch
sys.path.insert(0, sys.argv[2])
import ssmooth.certify.run as run
from tests.test_evaluate import Shifted, certify_toy
real = run.certify
def slow(*a, **k):
    time.sleep(0.3)  # leaves time to kill the run between and during groups
    return real(*a, **k)
run.certify = slow
print("start", flush=True)
certify_toy(sys.argv[1], points_per_group=1, progress=False)
"""


@pytest.mark.slow
def test_a_killed_run_resumes_with_its_complete_rows_intact(tmp_path):
    import subprocess
    import sys
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path), str(repo)], stdout=subprocess.PIPE,
                            text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "start"
    path = tmp_path / "certify.tsv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not path.exists() or path.read_text().count("\n") < 4):
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no handler runs, the lock goes with the process
    proc.wait()
    kept = path.read_bytes()
    complete = kept[: kept.rfind(b"\n") + 1]
    summary = certify_toy(tmp_path, points_per_group=1, progress=False)
    final = path.read_bytes()
    assert final.startswith(complete) and complete.count(b"\n") >= 4
    assert read_rows(path)["idx"].tolist() == list(range(100, 112)) and summary["points"]["count"] == 12


def test_a_requested_point_without_a_row_stops_the_summary(tmp_path, monkeypatch):
    real = evaluate.certify_points
    monkeypatch.setattr(evaluate, "certify_points", lambda model, pts, writer, **kw: real(
        model, pts.subset(list(range(11))), writer, **kw))  # a bug that silently skips the last point
    with pytest.raises(RuntimeError, match="no row for 1 of the 12 requested points"):
        certify_toy(tmp_path)
    assert not (tmp_path / "summary.json").exists()


def test_duplicate_test_points_of_two_levels_one_answers(tmp_path, monkeypatch):
    import ssmooth.selection

    data = points()
    data.images[1] = data.images[0] = 0.9  # one image twice, far on the class-1 side: both certified
    monkeypatch.setattr(ssmooth.selection, "select_sigma",  # positions 0, 1 of every group get levels 0.125, 0.5
                        lambda model, x, grid, **kw: torch.tensor([grid[0], grid[2]] * len(x))[: len(x)])
    summary = certify_model(Threshold(), data, tmp_path, config(policy="samplewise"), num_classes=2,
                            base_sigma=0.25, grid=[0.125, 0.25, 0.5], dataset="toy")
    rows = read_rows(tmp_path / "certify.tsv").set_index("idx")
    assert rows.loc[100, "radius_raw"] < rows.loc[101, "radius_raw"]  # sigma 0.125 vs 0.5, both unanimous
    assert rows.loc[100, ["predict", "correct", "radius"]].tolist() == [-1, 0, 0.0]  # the smaller R abstains
    assert rows.loc[101, "predict"] == 1 and rows.loc[101, "radius"] > 0
    assert all(summary["variants"][f"samplewise_{rule}"]["num_dropped_duplicates"] == 1
               for rule in ("fill", "halving", "lp"))
