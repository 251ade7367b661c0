"""Shared fixtures: a clean environment per test, and no test may leave files in the repository."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests run in parallel processes: one thread each avoids oversubscribing a small CPU.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis"}


def _repo_files() -> set[str]:
    # A plain walk (without the venv) costs milliseconds; `git status --ignored` would crawl the venv.
    found = set()
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        found.update(os.path.join(root, f) for f in files if not f.endswith(".pyc"))
    return found


@pytest.fixture(autouse=True)
def no_files_left_in_repo():
    before = _repo_files()
    yield
    new = {os.path.relpath(p, REPO) for p in _repo_files() - before}
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


@pytest.fixture
def tiny_imagenet(tmp_path) -> Path:
    """An ImageFolder tree like ImageNet's (train/ and val/ class folders) with 2 classes of 40x50 random-pixel
    PNG images: 3 per class for training, 2 per class for validation."""
    import numpy as np
    from PIL import Image

    root = tmp_path / "imagenet"
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("val", 2)):
        for wnid in ("n01440764", "n01443537"):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for k in range(per_class):
                pixels = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{k}.png")
    return root
