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

from ssmooth.certify.runfolder import (
    FINGERPRINT_KEYS,
    FingerprintMismatch,
    FolderLocked,
    diff_fingerprints,
    file_sha256,
    fingerprint,
    open_run_folder,
    state_dict_sha256,
)

REPO = Path(__file__).resolve().parents[2]


def fp(**kw):
    base = dict(checkpoint_sha256="a" * 64, dataset="mnist", split="test", subset={"skip": 1, "max": -1, "start": 0},
                indices=[0, 1, 2], labels=[7, 2, 1], n0=100, n=1000, alpha=0.001, policy="constant", sigma=0.25,
                seed=0, version="0.1.0")
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
               "dataset": dict(dataset="cifar10")}
    assert set(changes) == set(FINGERPRINT_KEYS)
    for key, change in changes.items():
        assert diff_fingerprints(a, fp(**change)) == [key]


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
    kwargs = dict(checkpoint_sha256="a" * 64, dataset="mnist", split="test", subset={}, indices=[0], labels=[1], n0=1,
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
