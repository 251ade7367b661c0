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


def test_radius_targets_match_the_closed_form_of_a_half_space():
    # Class 1 iff the first pixel > 0: at level s, p_1(x) = Phi(x0 / s), so R_k = x0 (the same at every level)
    # where x0 > 0, and 0 for the class-0 label. With many draws the estimate is close.
    from ssmooth.data import IndexedDataset
    from ssmooth.lit.selector import balance_weights, radius_targets, soft_targets

    class HalfSpace(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot((x.flatten(1)[:, 0] > 0).long(), 2).float()

    images = torch.zeros(3, 1, 1, 2)
    images[:, 0, 0, 0] = torch.tensor([0.1, 0.2, -0.2])
    data = IndexedDataset(images, torch.tensor([1, 1, 1]), torch.tensor([5, 6, 7]))
    grid = [0.25, 0.5]
    radii = radius_targets(HalfSpace(), data, grid, num_samples=4000, seed=0, batch_size=8000)
    assert radii.shape == (3, 2)
    assert torch.allclose(radii[:2], torch.tensor([[0.1, 0.1], [0.2, 0.2]], dtype=torch.float64), atol=0.03)
    assert radii[2].tolist() == [0.0, 0.0]  # the label loses at every level: dropped from training
    again = radius_targets(HalfSpace(), data.subset([1]), grid, num_samples=4000, seed=0, batch_size=8000)
    assert torch.equal(again[0], radii[1])  # per-image streams: the same draws whatever the batch
    soft = soft_targets(torch.tensor([[0.0, 1.0]]), 0.1)
    assert soft[0, 1] > 0.9999 and torch.allclose(soft.sum(1), torch.ones(1))
    weights = balance_weights(torch.tensor([[0.0, 1.0], [0.0, 2.0], [0.0, 1.0], [1.0, 0.0]]))
    assert weights.tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2.0])  # the rare best level weighs 3x


def test_radius_selector_learns_which_level_certifies_more():
    # Images whose first pixel is bright certify best at the large level, dark ones at the small: a selector
    # trained on those soft targets under noise routes both groups right.
    import functools

    import lightning as L

    from ssmooth.data import IndexedDataset
    from ssmooth.lit.selector import RadiusSelectorModule

    L.seed_everything(0)
    n = 256
    images = torch.zeros(n, 1, 4, 4)
    images[: n // 2] = 1.0
    targets = torch.zeros(n, 2)
    targets[: n // 2, 1], targets[n // 2:, 0] = 1.0, 1.0
    data = IndexedDataset(images, torch.zeros(n, dtype=torch.long))
    selector = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    module = RadiusSelectorModule(selector, targets, torch.ones(n), 0.5,
                                  functools.partial(torch.optim.SGD, lr=0.5), consistency=1.0, entropy=0.1)
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=32, shuffle=True))
    with torch.no_grad():
        chosen = selector(images + 0.5 * torch.randn_like(images)).argmax(1)
    assert (chosen[: n // 2] == 1).float().mean() > 0.9 and (chosen[n // 2:] == 0).float().mean() > 0.9
