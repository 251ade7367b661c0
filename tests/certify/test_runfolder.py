"""Run folders: a fingerprint written before any row, a mismatch refused, an exclusive lock that dies with its holder."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import ssmooth.certify.runfolder as runfolder
from ssmooth.certify.runfolder import (
    FINGERPRINT_KEYS,
    FingerprintMismatch,
    FolderLocked,
    diff_fingerprints,
    file_sha256,
    fingerprint,
    open_run_folder,
    points_pixels_sha256,
    state_dict_sha256,
)
from ssmooth.data import IndexedDataset, ImageFileDataset
from ssmooth.evaluate import CertifyConfig, _settled, certify_model

REPO = Path(__file__).resolve().parents[2]


def fp(**kw):
    base = dict(checkpoint_sha256="a" * 64, dataset="mnist", split="test", subset={"skip": 1, "max": -1, "start": 0},
                indices=[0, 1, 2], labels=[7, 2, 1], n0=100, n=1000, alpha=0.001, policy="constant", sigma=0.25,
                seed=0, version="0.1.0", pixels_sha256="c" * 64)
    return fingerprint(**{**base, **kw})


def test_fingerprint_has_the_stable_key_set_and_sees_every_result_changing_setting():
    a = fp()
    assert tuple(a) == FINGERPRINT_KEYS
    assert diff_fingerprints(a, fp()) == []
    changes = {"checkpoint_sha256": dict(checkpoint_sha256="b" * 64), "n0": dict(n0=50), "n": dict(n=2000),
               "alpha": dict(alpha=0.01), "sigma": dict(sigma=0.5), "seed": dict(seed=1), "split": dict(split="train"),
               "subset": dict(subset={"skip": 2, "max": -1, "start": 0}), "points_sha256": dict(labels=[7, 2, 3]),
               "policy": dict(policy="samplewise"), "grid": dict(grid=[0.25, 0.5]), "version": dict(version="0.2.0"),
               "selection": dict(selection={"selection_samples": 64}), "autocast": dict(autocast="bf16"),
               "dataset": dict(dataset="cifar10"), "pixels_sha256": dict(pixels_sha256="d" * 64),
               "device": dict(device="cuda")}
    assert set(changes) | {"certification_scheme"} == set(FINGERPRINT_KEYS)
    for key, change in changes.items():
        assert diff_fingerprints(a, fp(**change)) == [key]


def test_a_new_certification_scheme_changes_the_fingerprint(monkeypatch):
    a = fp()
    monkeypatch.setattr(runfolder, "SCHEME_VERSION", runfolder.SCHEME_VERSION + 1)
    assert diff_fingerprints(a, fp()) == ["certification_scheme"]


def test_pixels_are_hashed_from_the_tensor_the_files_or_item_by_item(tmp_path):
    images = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    data = IndexedDataset(images, torch.tensor([1, 2, 3]))
    same = points_pixels_sha256(data)
    assert points_pixels_sha256(IndexedDataset(images.clone(), torch.tensor([1, 2, 3]))) == same
    moved = images.clone()
    moved[2, 0, 1, 1] += 1e-6
    assert points_pixels_sha256(IndexedDataset(moved, torch.tensor([1, 2, 3]))) != same
    assert points_pixels_sha256(list(data)) == points_pixels_sha256(list(data))  # any sequence of items
    assert points_pixels_sha256(list(data)) != points_pixels_sha256([data[0], data[2], data[1]])
    # image files: their bytes, never decoded
    paths = []
    for k, content in enumerate([b"first image", b"second image"]):
        paths.append(tmp_path / f"{k}.jpg")
        paths[-1].write_bytes(content)
    files = ImageFileDataset([str(p) for p in paths], torch.tensor([0, 1]), torch.tensor([5, 6]), transform=None)
    before = points_pixels_sha256(files)
    paths[1].write_bytes(b"another image")
    assert points_pixels_sha256(files) != before


class Mean(nn.Module):
    def forward(self, x):
        s = (x.flatten(1).mean(1) - 0.5) * 20
        return torch.stack([-s, s], dim=1)


def toy_points(images=None):
    images = torch.rand(6, 1, 1, 4, generator=torch.Generator().manual_seed(0)) if images is None else images
    return IndexedDataset(images, (images.flatten(1).mean(1) > 0.5).long(), torch.arange(100, 106))


def certify_toy(out, data, **kw):
    cfg = CertifyConfig(n0=16, n=400, alpha=0.01, points_per_group=4, progress=False, radii=[0, 0.25])
    return certify_model(Mean(), data, out, cfg, num_classes=2, base_sigma=0.25, dataset="toy", **kw)


def test_a_resume_on_other_pixels_with_the_same_indices_and_labels_is_refused(tmp_path):
    data = toy_points()
    certify_toy(tmp_path, data)
    other = toy_points(data.images.flip(3))  # a mirrored image keeps its mean: the same labels
    assert torch.equal(other.labels, data.labels)
    # Before: the rows of the first images were resumed as these images' rows
    with pytest.raises(FingerprintMismatch, match=r'settings: pixels_sha256 "[0-9a-f]{12}\.\.\." in the folder'):
        certify_toy(tmp_path, other)


def test_a_resume_on_another_kind_of_device_is_refused(tmp_path):
    data = toy_points()
    certify_toy(tmp_path, data)
    cfg = CertifyConfig(n0=16, n=400, alpha=0.01, points_per_group=4, progress=False, radii=[0, 0.25])
    on_gpu = _settled(Mean(), data, cfg, base_sigma=0.25, dataset="toy", device="cuda")[2]
    assert on_gpu["device"] == "cuda" and json.loads((tmp_path / "fingerprint.json").read_text())["device"] == "cpu"
    with pytest.raises(FingerprintMismatch, match='device "cpu" in the folder, "cuda" now'):
        open_run_folder(tmp_path, on_gpu)


def test_a_resume_across_certification_schemes_is_refused(tmp_path, monkeypatch):
    data = toy_points()
    monkeypatch.setattr(runfolder, "SCHEME_VERSION", 1)
    certify_toy(tmp_path, data)
    monkeypatch.setattr(runfolder, "SCHEME_VERSION", 2)
    with pytest.raises(FingerprintMismatch, match="certification_scheme 1 in the folder, 2 now"):
        certify_toy(tmp_path, data)
    # a folder written before the scheme was recorded at all
    recorded = json.loads((tmp_path / "fingerprint.json").read_text())
    for key in ("certification_scheme", "device", "pixels_sha256"):
        recorded.pop(key)
    (tmp_path / "fingerprint.json").write_text(json.dumps(recorded))
    with pytest.raises(FingerprintMismatch, match="certification_scheme missing in the folder, 2 now"):
        certify_toy(tmp_path, data)


def test_checkpoint_hashes_follow_the_content(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"abc")  # sha256("abc") from FIPS 180-2, read in chunks smaller than the file
    assert file_sha256(path, chunk=2) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert state_dict_sha256(a) == state_dict_sha256(b)
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert state_dict_sha256(a) != state_dict_sha256(b)


def test_same_fingerprint_resumes_other_fingerprint_is_refused_naming_keys_and_ways_out(tmp_path):
    with open_run_folder(tmp_path, fp()) as folder:
        assert not folder.resumed
        (tmp_path / "certify.tsv").write_text("idx\n0\n")
    assert json.loads((tmp_path / "fingerprint.json").read_text()) == fp()
    with open_run_folder(tmp_path, fp()) as folder:
        assert folder.resumed
    with pytest.raises(FingerprintMismatch) as info:
        open_run_folder(tmp_path, fp(n=2000, checkpoint_sha256="b" * 64))
    message = str(info.value)
    assert "checkpoint_sha256" in message and "n 1000 in the folder, 2000 now" in message
    assert "new folder" in message and "certify.overwrite=true" in message and "\n" not in message
    assert (tmp_path / "certify.tsv").read_text() == "idx\n0\n"  # nothing touched
    open_run_folder(tmp_path, fp()).close()  # a refusal leaves the lock free


def test_rows_without_a_fingerprint_are_refused(tmp_path):
    (tmp_path / "certify.tsv").write_text("idx\n0\n")
    with pytest.raises(FingerprintMismatch, match="no fingerprint.json"):
        open_run_folder(tmp_path, fp())


def test_overwrite_starts_afresh_and_removes_only_certification_outputs(tmp_path):
    open_run_folder(tmp_path, fp()).close()
    for name in ("certify.tsv", "certify_raw.tsv", "summary.json", "checkpoints/last.ckpt", "config.yaml"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    with open_run_folder(tmp_path, fp(n=2000), overwrite=True) as folder:
        assert not folder.resumed
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == \
        ["certify.lock", "config.yaml", "fingerprint.json", "last.ckpt"]
    assert json.loads((tmp_path / "fingerprint.json").read_text())["n"] == 2000


# The holder loads runfolder.py on its own (the module is standalone): importing the package would add ~8 s of
# torch and SciPy imports to the test.
HOLD = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("runfolder", sys.argv[2])
runfolder = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runfolder)
folder = runfolder.open_run_folder(sys.argv[1], runfolder.fingerprint(**{fp_kwargs}))
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_writer_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    kwargs = dict(checkpoint_sha256="a" * 64, dataset="mnist", split="test", subset={}, indices=[0], labels=[1],
                  pixels_sha256="c" * 64, n0=1,
                  n=10, alpha=0.1, policy="constant", sigma=0.5, version="0.1.0")
    code = HOLD.replace("{fp_kwargs}", repr(kwargs))
    module = REPO / "ssmooth" / "certify" / "runfolder.py"
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(module)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderLocked, match=f"process {holder.pid}@"):
            open_run_folder(tmp_path, fingerprint(**kwargs))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the lock with the process: no waiting, no manual clean-up.
    began = time.monotonic()
    with open_run_folder(tmp_path, fingerprint(**kwargs)) as folder:
        assert folder.resumed
    assert time.monotonic() - began < 5
