"""Logging glue: wandb defaults that never prompt, and certification results as logger metrics."""
from __future__ import annotations

import os
from pathlib import Path


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
    headline variant, and ``cert/<variant>/...`` for the others (e.g. the constant-sigma baseline)."""
    metrics: dict[str, float] = {}
    for name, variant in summary["variants"].items():
        key = prefix if name == summary["main"] else f"{prefix}/{name}"
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
