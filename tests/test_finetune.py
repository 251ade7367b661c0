"""Sample-wise finetuning: the local selection rule touches a rotating fraction of the samples per update and
keeps a running vote per sample at its current level from the training steps."""
import lightning as L
import pytest
import torch

from ssmooth.data import SmoothingDataModule
from ssmooth.lit.finetune import SigmaFinetuneModule
from ssmooth.models import create_model
from ssmooth.noise import SampleWiseSigma, sigma_grid
from ssmooth.objectives import GaussianAugmentation


def finetune(epochs: int, **rule):
    L.seed_everything(0, verbose=False)
    datamodule = SmoothingDataModule("digits", batch_size=16, train_subset=64, augment=False)
    datamodule.setup("fit")
    info = datamodule.info
    model = create_model("mlp", num_classes=info.num_classes, input_shape=info.input_shape, hidden=[16])
    grid = sigma_grid(0.25, [0.5, 1.0, 2.0])
    table = SampleWiseSigma(0.25, grid, int(datamodule.train_set.indices.max()) + 1)
    module = SigmaFinetuneModule(model=model, objective=GaussianAugmentation(), noise=table,
                                 optimizer=lambda params: torch.optim.SGD(params, lr=0.1), num_classes=10,
                                 meta={"seed": 0}, **rule)
    moves = []
    original = module.noise.update

    def recording_update(index, sigma):
        moves.append((index.clone(), sigma.clone()))
        return original(index, sigma)

    module.noise.update = recording_update
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=datamodule)
    return module, datamodule.train_set.indices, moves


def test_local_rule_updates_a_rotating_half_and_restarts_the_running_vote_of_moved_samples():
    module, indices, moves = finetune(2, selection="local", fraction=0.5, num_draws=2)
    positions = torch.arange(len(indices))
    assert [m[0].tolist() for m in moves] == [indices[positions % 2 == 0].tolist(),
                                              indices[positions % 2 == 1].tolist()]
    grid = torch.tensor(module.noise.grid)
    for _, sigma in moves:
        assert bool(torch.isin(sigma, grid).all())
    # Levels move at most one grid step per update (the base level is the middle one).
    assert set(moves[0][1].tolist()) <= {0.125, 0.25, 0.5}
    # Every sample was trained on once per epoch. A sample whose level changed at the second update restarted
    # its running vote then, so it holds one training step; every other sample holds two.
    # The odd positions were still at the base level 0.25 when the second update moved them.
    moved_second = moves[1][0][moves[1][1] != 0.25]
    want = torch.full((len(indices),), 2.0)
    want[torch.isin(indices, moved_second)] = 1.0
    torch.testing.assert_close(module.seen_count[indices], want)
    assert bool((module.seen_p[indices] <= module.seen_count[indices]).all())


def test_full_rule_reselects_every_sample():
    module, indices, moves = finetune(1, selection="full", num_draws=2, update_every=1)
    assert len(moves) == 1 and moves[0][0].tolist() == indices.tolist()
    assert module.seen_count.sum() == 0  # the full rule keeps no running vote


@pytest.mark.parametrize("bad, match", [({"selection": "all"}, "selection"), ({"fraction": 0.0}, "fraction")])
def test_bad_rule_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        SigmaFinetuneModule(model=torch.nn.Linear(2, 2), objective=GaussianAugmentation(),
                            noise=SampleWiseSigma(0.25, [0.25, 0.5], 4), optimizer=torch.optim.SGD, **bad)
