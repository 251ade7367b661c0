"""`make reproduce-mnist SMOKE=1`: the published pipeline end to end at toy size (real MNIST from ../shared)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.cli
def test_reproduce_mnist_smoke_runs_the_pipeline_and_reports(tmp_path, shared_data):
    out = tmp_path / "reproduce"
    env = {**os.environ, "SMOKE": "1", "SIGMAS": "0.25", "OUT": str(out), "SHARED": str(shared_data),
           "BIN": str(Path(sys.executable).parent), "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", str(REPO / "scripts" / "reproduce.sh"), "mnist"], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=600)
    stages = {p.parent.name: json.loads(p.read_text()) for p in out.rglob("summary.json")}
    assert set(stages) == {"pretrain", "finetune_samplewise", "selector", "finetune_constant", "experts_certify"}
    inductive = stages["selector"]["variants"]["inductive"]
    assert inductive["sound"] and inductive["setting"] == "any input"
    assert {"routed", "cascade", "constant_best"} <= set(stages["experts_certify"]["variants"])
    samplewise = stages["finetune_samplewise"]
    assert samplewise["dataset"] == "mnist" and samplewise["alpha"] == 0.001
    assert samplewise["variants"]["samplewise_raw"]["sound"] is False
    assert all(samplewise["variants"][f"samplewise_{r}"]["sound"] for r in ("fill", "halving", "lp"))
    report = (out / "report.md").read_text()
    assert "pretrain" in report and "finetune_samplewise" in report
    assert (out / "certified_accuracy.png").is_file()
    assert not list(REPO.glob("outputs/reproduce/*_smoke")), "the smoke run must write where it was told"
