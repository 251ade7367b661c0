"""CertificationCallback: logged metrics match the rows, DDP logs exactly what one process logs, bad settings fail."""
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ssmooth.certify.results import RowWriter
from ssmooth.cli import train as train_cli
from ssmooth.cli.common import CONFIG_DIR
from ssmooth.data import SmoothingDataModule
from ssmooth.lit.callbacks import CertificationCallback
from ssmooth.report import standard_radii, summarize_rows

NUM_POINTS = 30  # 360 test digits: every 12th
TINY = ["~experiment", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "model.hidden=[64]", "certify.enabled=false"]
CERTIFY = ["callbacks=certify", f"callbacks.certify.num_points={NUM_POINTS}", "callbacks.certify.n0=16",
           "callbacks.certify.n=200", "callbacks.certify.batch_size=256"]


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def subset_indices() -> list[int]:
    return SmoothingDataModule("digits").test_points(skip=360 // NUM_POINTS, max=360).indices.tolist()


def logged(run: Path) -> pd.DataFrame:
    metrics = pd.read_csv(run / "csv" / "metrics.csv")
    return metrics.dropna(subset=["cert/acr"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    # Four epochs, certification after the 2nd and the 4th (epoch indices 1 and 3).
    run = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)  # the CLI builds the model before it seeds: fix the initial weights here
    train_cli.run(compose_cfg([f"output_dir={run}", *TINY, *CERTIFY, "trainer.max_epochs=4",
                               "callbacks.certify.every_n_epochs=2"]))
    return run


def test_logged_metrics_are_those_of_the_rows_written(trained):
    folders = sorted(p.name for p in (trained / "cert_during_training").iterdir())
    assert folders == ["epoch001", "epoch003"]
    metrics = logged(trained)
    assert metrics["epoch"].tolist() == [1, 3]
    radii = standard_radii("digits")
    assert {f"cert/acc@{r:g}" for r in radii} | {"cert/acr", "cert/abstain"} <= set(metrics.columns)
    for (_, row), folder in zip(metrics.iterrows(), folders):
        rows = pd.read_csv(trained / "cert_during_training" / folder / "merged.tsv", sep="\t")
        assert rows["idx"].tolist() == subset_indices()  # the fixed subset, once each
        own = pd.read_csv(trained / "cert_during_training" / folder / "rank0.tsv", sep="\t")
        assert own["idx"].tolist() == rows["idx"].tolist()
        assert (rows["sigma"] == 0.25).all()
        expected = summarize_rows(rows, radii)
        assert row["cert/acr"] == pytest.approx(expected["acr"], rel=1e-6)  # logged as float32
        assert row["cert/abstain"] == pytest.approx(expected["abstain_rate"], rel=1e-6)
        for r, acc in zip(radii, expected["certified_accuracy"]):
            assert row[f"cert/acc@{r:g}"] == pytest.approx(acc, rel=1e-6)
    assert metrics["cert/acc@0"].iloc[-1] > 0.5, "a trained digits MLP certifies most points at radius 0"


def test_certification_leaves_training_unchanged(trained, tmp_path):
    # It draws from its own generators, never the global RNG: same seed, same weights, with or without it.
    torch.manual_seed(0)
    train_cli.run(compose_cfg([f"output_dir={tmp_path}", *TINY, "trainer.max_epochs=4"]))
    with_cb = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    without = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert with_cb.keys() == without.keys()
    assert all(torch.equal(with_cb[k], without[k]) for k in with_cb)


def test_ddp_logs_exactly_what_one_process_logs(trained, tmp_path):
    # lr = 0 keeps the pretrained weights through the epoch in both runs, whatever each rank's batches were.
    frozen = ["stage=finetune", f"pretrained={trained / 'checkpoints' / 'last.ckpt'}", "optim.optimizer.lr=0",
              "optim.scheduler=null", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
              "trainer.limit_val_batches=1", "callbacks.certify.every_n_epochs=1"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train_cli.run(compose_cfg([f"output_dir={single}", *TINY, *CERTIFY, *frozen]))
    train_cli.run(compose_cfg([f"output_dir={ddp}", *TINY, *CERTIFY, *frozen, "trainer=ddp_cpu"]))

    folder = ddp / "cert_during_training" / "epoch000"
    shards = [pd.read_csv(folder / f"rank{r}.tsv", sep="\t")["idx"].tolist() for r in (0, 1)]
    assert shards[0] and shards[1] and not set(shards[0]) & set(shards[1])
    merged = pd.read_csv(folder / "merged.tsv", sep="\t")
    assert merged["idx"].is_unique and merged["idx"].tolist() == subset_indices()
    reference = pd.read_csv(single / "cert_during_training" / "epoch000" / "merged.tsv", sep="\t")
    columns = ["idx", "label", "predict", "radius", "correct", "sigma"]  # all but the wall time
    pd.testing.assert_frame_equal(merged[columns], reference[columns])

    ddp_metrics, single_metrics = logged(ddp), logged(single)
    assert len(ddp_metrics) == len(single_metrics) == 1  # logged once, not once per rank
    cert_keys = [c for c in single_metrics.columns if c.startswith("cert/")]
    assert ddp_metrics[cert_keys].equals(single_metrics[cert_keys])
    assert single_metrics["cert/acr"].iloc[0] > 0, "equality of all-abstain runs would prove nothing"


def test_merge_drops_duplicates_and_refuses_a_partial_subset(tmp_path):
    callback = CertificationCallback(radii=[0.0, 0.5])
    callback.points = SmoothingDataModule("digits").test_points(skip=120)  # dataset indices of 3 test digits
    idx = callback.points.indices.tolist()
    rows = [{"idx": i, "label": 1, "predict": 1, "radius": 0.5, "correct": 1, "sigma": 0.25, "time": 0.0}
            for i in idx]
    with RowWriter(tmp_path / "rank0.tsv") as writer:
        writer.write(rows[:2])
    with RowWriter(tmp_path / "rank1.tsv") as writer:
        writer.write(rows[1:])  # rows[1] on both ranks, as a DistributedSampler's padding would put it
    metrics = callback._merge(tmp_path, world=2)
    assert pd.read_csv(tmp_path / "merged.tsv", sep="\t")["idx"].tolist() == idx
    assert metrics == {"cert/acc@0": 1.0, "cert/acc@0.5": 1.0, "cert/acr": 0.5, "cert/abstain": 0.0}

    (tmp_path / "rank1.tsv").unlink()  # a rank whose rows rank 0 cannot see
    with pytest.raises(RuntimeError, match="covers 2 of the 3 subset points"):
        callback._merge(tmp_path, world=2)


def test_config_group_builds_the_callback():
    callback = instantiate(compose_cfg(["callbacks=certify"]).callbacks.certify)
    assert isinstance(callback, CertificationCallback)
    assert (callback.every_n_epochs, callback.num_points, callback.n) == (5, 100, 1000)
    assert compose_cfg([]).callbacks == {}


@pytest.mark.parametrize("kwargs, match", [
    ({"every_n_epochs": 0}, r"every_n_epochs=0"),
    ({"num_points": 0}, r"num_points=0"),
    ({"n0": 0}, r"n0=0"),
    ({"n": 10}, r"n=10 .*at most 0.0030"),
    ({"alpha": 1.5}, r"alpha=1.5"),
    ({"batch_size": 0}, r"batch_size=0"),
    ({"radii": [-0.5]}, r"radii=\[-0.5\]"),
    ({"out_subdir": ""}, r"out_subdir=''"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CertificationCallback(**kwargs)
