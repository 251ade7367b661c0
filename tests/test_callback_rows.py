"""The certification callback's rows carry what every other row file carries, the forward passes per point."""
from types import SimpleNamespace

import pandas as pd
import torch
from torch import nn

from ssmooth.data import SmoothingDataModule
from ssmooth.lit.callbacks import CertificationCallback


def test_callback_rows_carry_samples(tmp_path):
    callback = CertificationCallback(num_points=3, n0=8, n=40, batch_size=64, radii=[0.0, 0.5])
    callback.points = SmoothingDataModule("digits").test_points(skip=120)
    callback.num_classes = 10
    strategy = SimpleNamespace(barrier=lambda name: None, broadcast=lambda value, src: value)
    trainer = SimpleNamespace(global_rank=0, world_size=1, is_global_zero=True, current_epoch=0,
                              default_root_dir=str(tmp_path), strategy=strategy)
    torch.manual_seed(0)
    module = SimpleNamespace(model=nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), noise=SimpleNamespace(sigma=0.25),
                             device=torch.device("cpu"))
    callback.certify_subset(trainer, module)
    for name in ("rank0.tsv", "merged.tsv"):
        rows = pd.read_csv(tmp_path / "cert_during_training" / "epoch000" / name, sep="\t")
        assert rows["samples"].tolist() == [48, 48, 48], name  # n0 + n per point
