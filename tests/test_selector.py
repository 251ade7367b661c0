"""The level selector of the inductive certificate: its labels, its default size, its training, its checkpoint."""
import lightning as L
import pytest
import torch

from ssmooth.data import SmoothingDataModule
from ssmooth.lit.module import load_checkpoint, model_state
from ssmooth.lit.selector import (
    SelectorModule,
    default_selector_model,
    level_targets,
    load_selector,
    save_with_selector,
)
from ssmooth.models import create_model


def test_level_targets_are_grid_indices_and_off_grid_levels_fail():
    grid = [0.125, 0.25, 0.5]
    assert level_targets(torch.tensor([0.5, 0.125, 0.25, 0.5]), grid).tolist() == [2, 0, 1, 2]
    with pytest.raises(ValueError, match="off the grid"):
        level_targets(torch.tensor([0.25, 0.3]), grid)


def test_default_selector_is_the_classifier_family_smaller():
    assert default_selector_model({"name": "mlp", "normalize": True, "hidden": [256, 128]}) == {
        "name": "mlp", "normalize": True, "hidden": [128, 64]}
    assert default_selector_model({"name": "cifar_resnet", "depth": 110})["depth"] == 20
    assert default_selector_model({"name": "lenet", "normalize": False}) == {"name": "lenet", "normalize": False}


def test_selector_learns_a_level_table_under_noise_and_survives_the_checkpoint(tmp_path):
    L.seed_everything(0, verbose=False)
    datamodule = SmoothingDataModule("digits", batch_size=32, train_subset=256, augment=False)
    datamodule.setup("fit")
    info = datamodule.info
    train = datamodule.train_set
    # A table that depends on the image: bright digits got the larger level.
    brightness = train.images.flatten(1).mean(dim=1)
    table = torch.full((int(train.indices.max()) + 1,), 0.25)
    table[train.indices] = torch.where(brightness > brightness.median(), 0.5, 0.25)
    grid, sigma_e = [0.25, 0.5], 0.5
    targets = level_targets(table, grid)
    selector_cfg = {"name": "mlp", "normalize": True, "hidden": [32]}
    selector = create_model("mlp", num_classes=2, input_shape=info.input_shape, mean=info.mean, std=info.std,
                            hidden=[32])
    module = SelectorModule(selector, targets, sigma_e, 2, lambda params: torch.optim.Adam(params, lr=3e-3))
    L.Trainer(accelerator="cpu", max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, train_dataloaders=datamodule.train_dataloader())
    with torch.no_grad():
        noisy = train.images + sigma_e * torch.randn(train.images.shape, generator=torch.Generator().manual_seed(1))
        accuracy = (selector(noisy).argmax(dim=1) == targets[train.indices]).float().mean().item()
    assert accuracy > 0.62  # chance is 0.5 (standard error 0.03 on 256 images); it reaches about 0.7

    classifier = tmp_path / "classifier.ckpt"
    meta = {"dataset": {"name": "digits"}, "noise": {"kind": "samplewise", "sigma": 0.25, "grid": grid}}
    torch.save({"ssmooth": meta, "state_dict": {"model.w": torch.ones(2), "noise.table": table}}, classifier)
    out = save_with_selector(classifier, selector, {"model": selector_cfg, "grid": grid, "sigma_e": sigma_e},
                             tmp_path / "both.ckpt")
    meta2, state2 = load_checkpoint(out)
    assert list(model_state(state2)) == ["w"] and torch.equal(model_state(state2)["w"], torch.ones(2))
    assert torch.equal(state2["noise.table"], table) and meta2["noise"] == meta["noise"]
    loaded, grid2, sigma_e2 = load_selector(meta2, state2, info)
    assert grid2 == grid and sigma_e2 == sigma_e
    with torch.no_grad():
        torch.testing.assert_close(loaded(noisy[:16]), selector(noisy[:16]))
    with pytest.raises(ValueError, match="no level selector"):
        load_selector(meta, {}, info)
