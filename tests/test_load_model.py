"""ssmooth.load_model: any checkpoint back as a model plus what certifying it needs (levels, classes, normalization)."""
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import ssmooth
from ssmooth.cli import train as train_cli
from ssmooth.cli.common import CONFIG_DIR
from ssmooth.lit.selector import save_with_selector
from ssmooth.models import create_model

TINY = ["~experiment", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.accelerator=cpu",
        "dataset.train_subset=16", "dataset.batch_size=8", "dataset.num_workers=0", "certify.enabled=false",
        "model.hidden=[16]"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        train_cli.run(compose("train", overrides=[f"output_dir={out}", *TINY]))
    return out / "checkpoints" / "last.ckpt"


def test_a_trained_checkpoint_loads_with_its_metadata(trained):
    model, meta = ssmooth.load_model(trained)
    assert not model.training
    assert (meta["num_classes"], meta["input_shape"], meta["sigma"], meta["levels"]) == (10, [1, 8, 8], 0.25, [0.25])
    assert meta["dataset"]["name"] == "digits" and meta["level_selector"] is None
    state = torch.load(trained, weights_only=False)["state_dict"]
    assert meta["normalization"]["mean"] == pytest.approx(state["model.normalize.mean"].tolist())
    x = torch.rand(3, 1, 8, 8)
    # the same logits as the trained weights: every tensor came back
    assert all(torch.equal(v, state[f"model.{k}"]) for k, v in model.state_dict().items())
    assert model(x).shape == (3, 10)


def test_a_selector_checkpoint_loads_its_level_selector(trained, tmp_path):
    torch.manual_seed(0)
    h_e = create_model("mlp", num_classes=3, input_shape=(1, 8, 8), mean=(0.3,), std=(0.2,), hidden=[8])
    selector_meta = {"model": {"name": "mlp", "normalize": True, "hidden": [8]}, "grid": [0.125, 0.25, 0.5],
                     "sigma_e": 0.5}
    path = save_with_selector(trained, h_e, selector_meta, tmp_path / "selector.ckpt")
    _, meta = ssmooth.load_model(path)
    loaded, grid, sigma_e = meta["level_selector"]
    assert (grid, sigma_e) == ([0.125, 0.25, 0.5], 0.5) and not loaded.training
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(loaded(x), h_e.eval()(x))


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        ssmooth.load_model(tmp_path / "missing.ckpt")
    (tmp_path / "other.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="other.ckpt could not be read"):
        ssmooth.load_model(tmp_path / "other.ckpt")
