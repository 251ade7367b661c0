"""What both console scripts share: config errors that exit cleanly, output folders, building parts from configs."""
from __future__ import annotations

import functools
import os
import sys
import uuid
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")

# One token per process: with ${now:} it makes every job's run folder unique, even for two jobs started in the
# same second. Cached, so every reference within one process agrees.
OmegaConf.register_new_resolver("ssmooth_token", lambda: f"{os.getpid()}-{uuid.uuid4().hex[:6]}", use_cache=True,
                                replace=True)


def quiet_console() -> None:
    """Lightning prints through its own handler and Hydra's root handler: keep one copy, and drop a deprecation
    warning Lightning raises inside its own code on every fit."""
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).propagate = False
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


class ConfigError(ValueError):
    """A bad setting, found before any work starts; the message names the key and the value."""


def exit_on_config_error(task):
    """Print a ConfigError (or a missing file) as one line and exit 2, instead of a wall of traceback."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig):
        quiet_console()
        try:
            return task(cfg)
        except (ConfigError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def plain(node) -> dict:
    """A config node as a plain dict (resolved)."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def certify_config(node):
    """The certification settings as a validated CertifyConfig; unknown keys and bad values are ConfigErrors."""
    from ssmooth.evaluate import CertifyConfig

    try:
        cfg = CertifyConfig(**plain(node))
        cfg.validate()
    except TypeError as err:
        raise ConfigError(f"certify: {err}") from None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return cfg


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def report_certification(summary: dict, out_dir: Path) -> None:
    """Print the certified-accuracy table and draw the curve of a finished certification."""
    from ssmooth import report

    report.print_table([summary])
    report.plot_certified_accuracy([summary], Path(out_dir) / "certified_accuracy.png", envelope=False,
                                   title=summary.get("name"))
    print(f"rows, summary and plot: {out_dir}")
