"""Logging glue: wandb defaults that never prompt, certification results as logger metrics, CSV metrics that survive
a resume, and one line per epoch where a progress bar cannot be drawn."""
from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from typing_extensions import override


def wandb_offline_default() -> bool:
    """True unless WANDB_API_KEY is set or ``wandb login`` stored a key (~/.netrc); WANDB_MODE wins if set."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode in ("offline", "dryrun", "disabled")
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return not (netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"))


def certification_metrics(summary: dict, prefix: str = "cert") -> dict[str, float]:
    """Flatten a certification summary into logger keys: ``cert/acc@0.5``, ``cert/acr``, ``cert/abstain`` for the
    headline variant, and ``cert/<variant>/...`` for the others (e.g. the constant-sigma baseline).

    A variant recorded as unsound (an upper bound, not a certificate) goes under ``unsound/``, e.g.
    ``unsound/final/samplewise_raw/acr``: in W&B's panels and the CSV columns it can never pass for a result."""
    metrics: dict[str, float] = {}
    for name, variant in summary["variants"].items():
        key = prefix if name == summary["main"] else f"{prefix}/{name}"
        if variant.get("sound") is False:
            key = f"unsound/{key}"
        for r, acc in zip(summary["radii"], variant["certified_accuracy"]):
            metrics[f"{key}/acc@{r:g}"] = float(acc)
        metrics[f"{key}/acr"] = float(variant["acr"])
        metrics[f"{key}/abstain"] = float(variant["abstain_rate"])
    return metrics


def log_certification(loggers, summary: dict, step: int, plot_path=None) -> None:
    """Send a finished certification to every logger: the flat metrics, and for wandb also the certified
    accuracy curve as a table + line plot and the PNG drawn by the report."""
    # "final/...": the periodic certification callback owns "cert/..." (small n, a fixed subset).
    metrics = certification_metrics(summary, prefix="final")
    for logger in loggers:
        logger.log_metrics(metrics, step=step)
        if type(logger).__name__ != "WandbLogger":
            continue
        import wandb

        main = summary["variants"][summary["main"]]
        table = wandb.Table(columns=["radius", "certified_accuracy"],
                            data=[[r, a] for r, a in zip(summary["radii"], main["certified_accuracy"])])
        payload = {"final/curve": wandb.plot.line(table, "radius", "certified_accuracy",
                                                 title="certified accuracy vs l2 radius")}
        if plot_path is not None:
            payload["final/plot"] = wandb.Image(str(plot_path))
        logger.experiment.log(payload)


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; this one, when resuming from the end of
    epoch ``resume_epoch``, keeps the rows up to that epoch (later ones are logged again by the resumed run) and
    appends to them."""

    def __init__(self, log_dir: str, resume_epoch: int | None) -> None:
        self.resume_epoch = resume_epoch
        super().__init__(log_dir=log_dir)

    @override
    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self.resume_epoch is None or not path.is_file():
            super()._check_log_dir_exists()
            return
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if not r.get("epoch") or float(r["epoch"]) <= self.resume_epoch]
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys  # a new key rewrites the header and keeps these rows


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a run resumed from a checkpoint keeps the metrics of its earlier epochs
    (``resume_epoch``: the epoch the checkpoint was saved at; None starts a new metrics.csv)."""

    def __init__(self, *args, resume_epoch: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_epoch = resume_epoch

    @property
    @override
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            Path(self.root_dir).mkdir(parents=True, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self.resume_epoch)
        return self._experiment


def offline_wandb_note(loggers) -> str | None:
    """Where an offline wandb run was written and the command that uploads it (None when wandb ran online)."""
    for logger in loggers:
        if type(logger).__name__ != "WandbLogger":
            continue
        run = logger._experiment
        if run is None or not getattr(run, "settings", None) or not run.settings._offline:
            return None
        folder = Path(run.dir).parent  # <save_dir>/wandb/offline-run-<time>-<id>/files
        return f"wandb: offline run in {folder}; upload it with: wandb sync {folder}"
    return None


def epoch_line_callback():
    """One log line per epoch with the epoch's metrics: what a log file (SLURM) gets instead of a progress bar,
    whose carriage returns would make one very long line."""
    import time

    from lightning.pytorch.callbacks import Callback

    class EpochLine(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.began = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module):
            import logging

            metrics = " ".join(f"{k} {float(v):.4g}" for k, v in sorted(trainer.callback_metrics.items())
                               if k.startswith(("train/", "val/")))
            logging.getLogger("ssmooth").info(
                f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {metrics} "
                f"({time.perf_counter() - getattr(self, 'began', time.perf_counter()):.0f} s)")

    return EpochLine()
