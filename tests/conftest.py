"""Shared fixtures: a clean environment per test, and no test may leave files in the repository."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Real datasets and published files that some tests use when they are there (the rest of the suite needs none):
# SSMOOTH_DATA and SSMOOTH_PUBLISHED name their folders; unset, they are looked for in a folder beside the checkout.
SHARED_DATA = Path(os.environ.get("SSMOOTH_DATA") or REPO.parent / "shared" / "data")
PUBLISHED = Path(os.environ.get("SSMOOTH_PUBLISHED") or REPO.parent / "shared" / "published")
DATA_HELP = ("needs real MNIST and CIFAR-10 as .npz: set SSMOOTH_DATA=DIR, DIR holding mnist/mnist_train.npz, "
             "mnist/mnist_test.npz, cifar10/cifar10_train_first4000.npz and cifar10/cifar10_test.npz (arrays 'images' "
             "uint8, 'labels'; the file names are ssmooth.data.NPZ_FILES)")
LOGS_HELP = ("needs Cohen et al.'s published CIFAR-10 per-image logs: set SSMOOTH_PUBLISHED=DIR, DIR holding "
             "logs/cohen_cifar10_resnet110_noise{0.25,0.50,1.00}.tsv (data/certify/cifar10/resnet110/noise_X/test/"
             "sigma_X of github.com/locuslab/smoothing) and PROVENANCE.md with their table")
COHEN_HELP = ("needs a CIFAR-10 ResNet-110 file in Cohen et al.'s layout and its probe logits: set SSMOOTH_PUBLISHED=DIR, "
              "DIR holding checkpoints/cohen_cifar10_resnet110_random.pth.tar and .probe.pt")

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
    """The folder of real MNIST / CIFAR-10 .npz files (SSMOOTH_DATA); the test is skipped, saying how to give it,
    when it is missing."""
    if not (SHARED_DATA / "mnist" / "mnist_test.npz").is_file():
        pytest.skip(DATA_HELP)
    return SHARED_DATA


@pytest.fixture
def published_logs() -> Path:
    """The folder of published per-image logs (SSMOOTH_PUBLISHED)."""
    if not (PUBLISHED / "PROVENANCE.md").is_file() or not (PUBLISHED / "logs").is_dir():
        pytest.skip(LOGS_HELP)
    return PUBLISHED


@pytest.fixture(scope="session")
def published_checkpoints() -> Path:
    """The folder of published-format checkpoints (SSMOOTH_PUBLISHED/checkpoints)."""
    folder = PUBLISHED / "checkpoints"
    if not all((folder / f"cohen_cifar10_resnet110_random.{ext}").is_file() for ext in ("pth.tar", "probe.pt")):
        pytest.skip(COHEN_HELP)
    return folder


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
