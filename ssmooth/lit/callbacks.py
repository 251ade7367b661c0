"""Certification while training: every few epochs, CERTIFY a small fixed test subset with a small n and log
certified accuracy and ACR (``cert/acc@0.5``, ``cert/acr``, ``cert/abstain``).

    ssmooth-train callbacks=certify                                        # every 5 epochs, 100 points, n = 1000
    ssmooth-train callbacks=certify callbacks.certify.every_n_epochs=1 callbacks.certify.num_points=500
    ssmooth-train callbacks=certify trainer=ddp trainer.devices=4          # each GPU certifies a quarter

What runs on each rank: rank r certifies subset positions r, r + W, ... and writes
``<run>/cert_during_training/epoch003/rank<r>.tsv``; after a barrier rank 0 merges the files (keyed by dataset
index, duplicates dropped) into ``merged.tsv``, checks that every point of the subset is there exactly once,
computes the metrics and broadcasts them, so every rank logs the same numbers. The folder must be visible to
every rank (a shared filesystem, as the run folder is on a cluster); if it is not, the coverage check fails
loudly instead of reporting half the subset.
"""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from ssmooth import report
from ssmooth.certify.results import RowWriter, merge_rows
from ssmooth.certify.run import certify_points
from ssmooth.certify.stats import require_useful_sample_size
from ssmooth.evaluate import CONSTANT_COLUMNS
from ssmooth.lit.logging import certification_metrics


class CertificationCallback(Callback):
    """CERTIFY ``num_points`` test points at the module's base level ``pl_module.noise.sigma`` after every
    ``every_n_epochs``-th training epoch, with ``n0``/``n``/``alpha`` (Cohen et al.'s CERTIFY).

    The subset is every k-th test item, ``k = len(test) // num_points``, the first ``num_points`` of them: fixed
    for the whole run, so successive epochs are comparable. The noise seed is fixed too (``seed``), and each
    point draws from its own noise streams keyed by its dataset index: its noise does not depend on which rank
    certifies it or which points share its forward batches, so a DDP run logs exactly what a single process
    would with the same weights. Certification never touches the global RNG, so training proceeds as it would
    without the callback.

    Runs in ``on_train_epoch_end``: once per training epoch whatever the validation schedule
    (``check_val_every_n_epoch``, ``val_check_interval < 1``, ``limit_val_batches=0``), never during the sanity
    check, and after the epoch's validation, on the weights the epoch ended with. Rows go to
    ``trainer.default_root_dir / out_subdir / epoch{E:03d}`` (E counted from 0, as in checkpoint names):
    ssmooth-train sets it to the run folder, so the rows sit beside ``checkpoints/`` whatever the loggers are.
    Each certification starts its files afresh: rows of an interrupted attempt may come from other weights.

    The full certification at the end of fit (n = 100000, the configured test subset, summary.json) is not this
    callback's job: ``ssmooth-train`` runs it after ``trainer.fit`` on rank 0 with the ``certify`` config
    (``ssmooth.evaluate.certify_model``), and ``ssmooth-certify`` does the same for a checkpoint.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        num_points: int = 100,
        n0: int = 32,
        n: int = 1000,
        alpha: float = 0.001,
        batch_size: int = 1000,
        radii: list[float] | None = None,
        seed: int = 0,
        out_subdir: str = "cert_during_training",
    ):
        super().__init__()
        checks = [
            ("every_n_epochs", every_n_epochs, every_n_epochs >= 1, "must be >= 1"),
            ("num_points", num_points, num_points >= 1, "must be >= 1"),
            ("n0", n0, n0 >= 1, "must be >= 1"),
            ("n", n, n >= 1, "must be >= 1"),
            ("alpha", alpha, 0 < alpha < 1, "must be in (0, 1)"),
            ("batch_size", batch_size, batch_size >= 1, "must be >= 1"),
            ("seed", seed, seed >= 0, "must be >= 0"),
            ("out_subdir", out_subdir, bool(out_subdir) and not Path(out_subdir).is_absolute(),
             "must be a non-empty relative path"),
        ]
        if radii is not None:
            radii = [float(r) for r in radii]
            checks.append(("radii", radii, len(radii) > 0 and min(radii) >= 0, "must be non-empty and >= 0"))
        for key, value, ok, why in checks:
            if not ok:
                raise ValueError(f"callbacks.certify.{key}={value!r} {why}")
        require_useful_sample_size(n, alpha, "callbacks.certify")
        self.every_n_epochs, self.num_points = int(every_n_epochs), int(num_points)
        self.n0, self.n, self.alpha, self.batch_size = int(n0), int(n), float(alpha), int(batch_size)
        self.radii, self.seed, self.out_subdir = radii, int(seed), str(out_subdir)
        self.points = None  # IndexedDataset of the subset and the dataset's class count, both set in setup
        self.num_classes: int | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.points is not None:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "test_points"):
            raise ValueError("CertificationCallback needs trainer.fit(..., datamodule=SmoothingDataModule(...)): "
                             "it certifies a subset of the datamodule's test split")
        datamodule.setup(stage)
        step = max(1, len(datamodule.test_set) // self.num_points)
        self.points = datamodule.test_points(skip=step, max=step * self.num_points)
        if self.radii is None:
            self.radii = report.standard_radii(datamodule.info.name)
        self.num_classes = datamodule.info.num_classes

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        metrics = self.certify_subset(trainer, pl_module)
        for key, value in metrics.items():
            # The values are identical on every rank (broadcast from rank 0). sync_dist with "max" is an exact
            # no-op reduction, and keeps Lightning from warning about unsynchronized epoch-level metrics; the
            # logger writes once (rank 0), and every rank can monitor the key (e.g. ModelCheckpoint on cert/acr).
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max", batch_size=1)

    def epoch_dir(self, trainer: L.Trainer) -> Path:
        return Path(trainer.default_root_dir) / self.out_subdir / f"epoch{trainer.current_epoch:03d}"

    def certify_subset(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Certify this rank's share of the subset, merge all ranks' rows on rank 0, return the metrics
        (the same dict on every rank). Collective: every rank must call it."""
        rank, world = trainer.global_rank, trainer.world_size
        out = self.epoch_dir(trainer)
        own = out / f"rank{rank}.tsv"
        own.unlink(missing_ok=True)
        shard = self.points.subset(list(range(rank, len(self.points), world)))
        with RowWriter(own, columns=CONSTANT_COLUMNS) as writer:
            certify_points(pl_module.model, shard, writer, sigma=float(pl_module.noise.sigma), n0=self.n0, n=self.n,
                           alpha=self.alpha, batch_size=self.batch_size, num_classes=self.num_classes,
                           points_per_group=max(1, self.batch_size // self.n), seed=self.seed,
                           device=pl_module.device)
        trainer.strategy.barrier("ssmooth_certification_rows")
        result: dict | str = {}
        if trainer.is_global_zero:
            try:
                result = self._merge(out, world)
            except Exception as err:  # other ranks wait in broadcast: hand them the error instead of hanging
                result = f"{type(err).__name__}: {err}"
        result = trainer.strategy.broadcast(result, src=0)
        if isinstance(result, str):
            raise RuntimeError(f"certification during training failed on rank 0: {result}")
        return result

    def _merge(self, out: Path, world: int) -> dict[str, float]:
        merged = merge_rows([out / f"rank{r}.tsv" for r in range(world)], out / "merged.tsv")
        expected = set(self.points.indices.tolist())
        found = set(merged["idx"].tolist())
        if found != expected:
            missing, extra = sorted(expected - found), sorted(found - expected)
            raise RuntimeError(
                f"{out / 'merged.tsv'} covers {len(found)} of the {len(expected)} subset points (missing "
                f"{missing[:5]}, unexpected {extra[:5]}): is {out} on a filesystem every rank shares?"
            )
        summary = {"variants": {"constant": report.summarize_rows(merged, self.radii)}, "main": "constant",
                   "radii": self.radii}
        metrics = certification_metrics(summary)
        # Not "summary.json": ssmooth-report collects those as finished jobs.
        passes = int(merged["samples"].sum()) if "samples" in merged else None
        (out / "metrics.json").write_text(json.dumps({**metrics, "n0": self.n0, "n": self.n, "alpha": self.alpha,
                                                      "num_points": len(merged), "forward_passes": passes},
                                                     indent=2) + "\n")
        return metrics
