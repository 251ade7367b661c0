"""Certifying reads the test split only: a folder holding just the test .npz is enough."""
import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from ssmooth.cli import certify as certify_cli
from ssmooth.cli import train as train_cli
from ssmooth.cli.common import CONFIG_DIR
from ssmooth.data import SmoothingDataModule


def write_npz(folder, split, count):
    rng = np.random.default_rng(0)
    (folder / "mnist").mkdir(parents=True, exist_ok=True)
    np.savez(folder / "mnist" / f"mnist_{split}.npz", images=rng.integers(0, 256, (count, 28, 28), dtype=np.uint8),
             labels=np.arange(count) % 10)


def test_test_points_need_no_training_file(tmp_path):
    write_npz(tmp_path, "test", 12)
    data = SmoothingDataModule("mnist", source="npz", npz_dir=str(tmp_path))
    assert data.test_points(skip=5).indices.tolist() == [0, 5, 10]
    assert data.train_set is None
    with pytest.raises(FileNotFoundError, match="mnist_train.npz"):
        data.setup("fit")  # training does need it


def test_ssmooth_certify_from_a_folder_with_only_the_test_file(tmp_path):
    data = tmp_path / "data"
    write_npz(data, "train", 16)
    write_npz(data, "test", 12)
    npz = ["dataset.source=npz", f"dataset.npz_dir={data}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        train_cfg = compose("train", overrides=[
            f"output_dir={tmp_path / 'run'}", "~experiment", "dataset=mnist", "model=mlp", "model.hidden=[8]", *npz,
            "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.accelerator=cpu",
            "dataset.batch_size=8", "dataset.num_workers=0", "certify.enabled=false"])
        train_cli.run(train_cfg)
        (data / "mnist" / "mnist_train.npz").unlink()
        certify_cfg = compose("certify", overrides=[
            f"ckpt={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", f"output_dir={tmp_path / 'cert'}", *npz,
            "certify.n0=8", "certify.n=100", "certify.alpha=0.01", "certify.skip=4", "certify.progress=false",
            "device=cpu"])
    summary = certify_cli.run(certify_cfg)
    assert summary["points"]["indices"] == [0, 4, 8]
