"""Shared fixtures: a clean environment per test, and no test may leave files in the repository."""
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests run in parallel processes: one thread each avoids oversubscribing a small CPU.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def _untracked() -> set[str]:
    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored"], cwd=REPO,
                         capture_output=True, text=True).stdout
    return {line[3:] for line in out.splitlines() if line.startswith(("??", "!!"))
            and not line[3:].startswith((".venv", ".pytest_cache", ".hypothesis")) and "__pycache__" not in line
            and not line.endswith((".pyc", ".egg-info/")) and "egg-info" not in line}


@pytest.fixture(autouse=True)
def no_files_left_in_repo():
    before = _untracked()
    yield
    new = _untracked() - before
    assert not new, f"test left files in the repository: {sorted(new)[:5]}"


@pytest.fixture(autouse=True)
def clean_distributed_env(monkeypatch):
    # Lightning leaves these behind after a DDP run; they would leak into the next test.
    for key in ("MASTER_PORT", "MASTER_ADDR", "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "LOCAL_RANK", "NODE_RANK",
                "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist" / "mnist_test.npz").is_file():
        pytest.skip("../shared/data is not beside the checkout")
    return SHARED_DATA
