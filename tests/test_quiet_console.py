"""The commands' console carries their own lines, not Lightning's tips, hardware lines and warnings about settings
made on purpose."""
import io
import logging
import warnings

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ssmooth.cli.common import quiet_console


class NoValidationData(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):  # defined, but the stage has no validation data
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_fit_without_validation_data_prints_nothing_of_lightnings(tmp_path):
    console = io.StringIO()
    handler = logging.StreamHandler(console)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            quiet_console()
            L.seed_everything(0)
            trainer = L.Trainer(max_epochs=1, accelerator="cpu", limit_train_batches=1.0, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                default_root_dir=tmp_path)
            data = DataLoader(TensorDataset(torch.rand(4, 2)), batch_size=2)
            trainer.fit(NoValidationData(), train_dataloaders=data)
        logging.getLogger("ssmooth").info("our own line")
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    assert console.getvalue() == "our own line\n"
    assert [str(w.message) for w in caught] == []
