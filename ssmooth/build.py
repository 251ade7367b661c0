"""The parts of a run built from its settings: model, noise, objective, optimizer, data, trainer, loggers, and
the certification settings. Every builder checks its settings and raises ConfigError naming the bad key and value,
so that both commands and Python callers refuse bad input before any work starts. Nothing here prints or exits."""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

from omegaconf import DictConfig, OmegaConf

# The run's messages: through logging, so that a command sends them to the console and the run's log file once.
log = logging.getLogger("ssmooth")

NOISE_KINDS = ("constant", "samplewise")


# The commands' config files (Hydra's config folder).
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")

class ConfigError(ValueError):
    """A bad setting, found before any work starts; the message names the key and the value."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with one line saying what the interrupted work kept and how to resume it."""


@contextlib.contextmanager
def on_interrupt(note: Callable[[], str], folder: Path | None = None) -> Iterator[None]:
    """Ctrl-C inside the block becomes ``Interrupted(message)`` (a command prints it and exits 130).

    The message is what the interrupted code said, when it raised a KeyboardInterrupt with one (certification
    counts the rows it kept), with "re-run the same command" made precise for ``folder`` (run folders are
    time-stamped, so the same command alone would start a new one); otherwise ``note()``, computed when the
    interrupt arrives so that it can count what was kept by then."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt as err:
        said = str(err).removeprefix("interrupted: ")
        try:
            if said and folder is not None:
                message = said.replace("re-run the same command", rerun_hint(folder), 1)
            else:
                message = said or note()
        except Exception as failure:  # a note must never hide the interrupt itself
            message = said or f"(what was kept is unknown: {failure})"
        raise Interrupted(message) from None


def rerun_hint(out_dir: Path) -> str:
    """How to run the same job into the same folder (a command's run folders are time-stamped by default)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return f"re-run the same command with hydra.sweep.dir={hydra_cfg.sweep.dir}"
        return f"re-run the same command with hydra.run.dir={hydra_cfg.runtime.output_dir}"
    except Exception:  # called from Python, not from a command
        return f"re-run with output_dir={out_dir}"


def certification_note(out_dir: Path, total: int) -> str:
    """What an interrupted certification kept: flushed rows per file, and how to resume."""
    kept = []
    for path in sorted(Path(out_dir).glob("certify*.tsv")):
        text = path.read_text()
        rows = max(text.count("\n") - 1, 0)  # a torn last line has no newline and is redone on resume
        kept.append(f"{rows}/{total} rows in {path.name}")
    what = ", ".join(kept) if kept else "no rows yet"
    return f"certification stopped: kept {what} in {out_dir}; {rerun_hint(out_dir)} to resume"


def plain(node) -> dict:
    """A config node as a plain dict (resolved)."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


def root_cause(err: BaseException) -> str:
    """The innermost error's message (instantiate wraps the constructor's ValueError/TypeError)."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err)


def compose_settings(overrides: list[str] = (), config_name: str = "train") -> DictConfig:
    """The settings a command would run with, composed in Python from the project's config files and
    ``overrides`` (``["noise.sigma=0.5", "output_dir=runs/a"]``); no command line, no run folder made. Give
    ``output_dir``: outside a command nothing picks one."""
    from hydra import compose, initialize_config_dir

    config_dir = CONFIG_DIR
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        return compose(config_name, overrides=list(overrides))


def config_differences(saved: dict, requested: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """``key=requested (was saved)`` for every leaf that differs, skipping keys under ``ignore``.

    A key the saved config does not have (added to the package after it was written) counts only when the
    request sets it to something other than null or false: an option that did not exist was not in use."""
    def leaves(node, prefix=""):
        out = {}
        for key, value in (node or {}).items():
            if isinstance(value, dict) and value:
                out.update(leaves(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    old, new = leaves(saved), leaves(requested)
    differences = []
    for key in sorted(set(old) | set(new)):
        if any(key == i or key.startswith(f"{i}.") for i in ignore):
            continue
        if key not in old and new.get(key) in (None, False):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            differences.append(f"{key}={new.get(key, '<absent>')} (was {old.get(key, '<absent>')})")
    return differences


# ---- certification settings ----

def check_types(settings: dict, schema, prefix: str) -> None:
    """Raise ConfigError for a setting whose value is not of the dataclass field's declared type: ``n=1e4`` is
    the float 10000.0, which would fail deep inside certification instead of here."""
    import typing

    hints = typing.get_type_hints(schema)
    for key, value in settings.items():
        if key in hints and not _of_type(value, hints[key]):
            wanted = _type_name(hints[key])
            whole = f" (write {int(value)})" if isinstance(value, float) and value.is_integer() else ""
            raise ConfigError(f"{prefix}.{key}={value!r} must be {wanted}{whole}")


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def _type_name(hint) -> str:
    import typing

    if typing.get_origin(hint) is list:
        return f"a list of {_type_name(typing.get_args(hint)[0]).split(' ', 1)[-1]}s"
    args = typing.get_args(hint)
    if args:
        return " or ".join(_type_name(h) for h in args)
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _of_type(value, hint) -> bool:
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_of_type(value, h) for h in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint) or (object,)
        return isinstance(value, (list, tuple)) and all(_of_type(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:  # an int is a float's value too (alpha=1), a bool is neither
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return hint is object or isinstance(value, hint)


def certify_config(node):
    """The certification settings as a validated CertifyConfig; unknown keys, values of the wrong type and bad
    values are ConfigErrors."""
    from ssmooth.evaluate import CertifyConfig

    settings = node if isinstance(node, dict) else plain(node)
    try:
        check_types(settings, CertifyConfig, "certify")
        cfg = CertifyConfig(**settings)
        cfg.validate()
        factors = cfg.grid_factors
        if factors is not None and (not factors or not all(isinstance(f, (int, float)) and f > 0 for f in factors)):
            raise ConfigError(f"certify.grid_factors={factors} must be a non-empty list of factors > 0 "
                              "(the levels are sigma * factor)")
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


def certification_grid(cert_cfg, base_sigma: float, trained_grid, source: str) -> list[float] | None:
    """The levels sample-wise certification chooses from: ``certify.grid_factors`` when given, else the grid the
    model was trained with. A sample-wise certification without any grid is refused here, before any work."""
    from ssmooth.noise import sigma_grid

    grid = list(trained_grid or []) or None
    if cert_cfg.grid_factors is not None:
        grid = sigma_grid(cert_cfg.sigma or base_sigma, cert_cfg.grid_factors)
    if cert_cfg.policy == "samplewise" and not grid:
        raise ConfigError(f"certify.policy=samplewise: {source} was trained at one level; give the grid with "
                          "certify.grid_factors=[0.5,1.0,2.0]")
    return grid


def test_points(datamodule, cert_cfg):
    """The certification subset of ``certify.split``; an empty or inverted one (start past the end, max not
    above start) is a ConfigError naming the keys."""
    from ssmooth.evaluate import certification_points

    try:
        points = certification_points(datamodule, cert_cfg)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if len(points) == 0:
        raise ConfigError(f"certify.split={cert_cfg.split} certify.start={cert_cfg.start} certify.max={cert_cfg.max} "
                          f"certify.skip={cert_cfg.skip} selects no point")
    return points



def check_output_width(model, input_shape, num_classes: int, source: str) -> None:
    """One forward pass on a blank input: a model whose output width is not the dataset's number of classes
    would certify against the wrong classes, so it is refused before any work."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            width = model(torch.zeros(1, *input_shape)).shape[-1]
    finally:
        model.train(was_training)
    if width != num_classes:
        raise ConfigError(f"{source} outputs {width} classes but the dataset has num_classes={num_classes}")


# ---- training parts ----

def build_model(model_cfg: dict, info):
    """The network of ``model_cfg`` for dataset ``info``, normalization included as its first layer."""
    from ssmooth.models import create_model

    options = dict(model_cfg)
    name = options.pop("name")
    normalize = options.pop("normalize", True)
    try:
        return create_model(name, num_classes=info.num_classes, input_shape=info.input_shape,
                            mean=info.mean if normalize else None, std=info.std if normalize else None, **options)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"model: {err}") from None


def build_noise(noise_cfg: dict, num_train: int):
    """The noise policy: one level for every sample, or a per-sample table over a grid of levels."""
    from ssmooth.noise import ConstantSigma, SampleWiseSigma, sigma_grid

    kind = noise_cfg.get("kind")
    if kind not in NOISE_KINDS:
        raise ConfigError(f"noise.kind={kind!r} must be one of {NOISE_KINDS}")
    sigma = noise_cfg.get("sigma")
    if not isinstance(sigma, (int, float)) or not sigma > 0:
        raise ConfigError(f"noise.sigma={sigma!r} must be > 0")
    if kind == "constant":
        unknown = set(noise_cfg) - {"kind", "sigma"}
        if unknown:
            raise ConfigError(f"noise: unknown key(s) {sorted(unknown)} for kind=constant")
        return ConstantSigma(sigma)
    _check_samplewise_noise(noise_cfg)
    try:
        grid = sigma_grid(sigma, noise_cfg["grid_factors"])
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return SampleWiseSigma(sigma, grid, num_train)


def _check_samplewise_noise(noise_cfg: dict) -> None:
    allowed = {"kind", "sigma", "grid_factors", "update_every", "num_draws", "soft", "selection", "fraction"}
    unknown = set(noise_cfg) - allowed
    if unknown:
        raise ConfigError(f"noise: unknown key(s) {sorted(unknown)}; allowed {sorted(allowed)}")
    if noise_cfg["update_every"] < 1:
        raise ConfigError(f"noise.update_every={noise_cfg['update_every']} must be >= 1")
    if noise_cfg["num_draws"] < 1:
        raise ConfigError(f"noise.num_draws={noise_cfg['num_draws']} must be >= 1")
    if noise_cfg.get("selection", "local") not in ("local", "full"):
        raise ConfigError(f"noise.selection={noise_cfg['selection']!r} must be 'local' or 'full'")
    if not 0 < noise_cfg.get("fraction", 1.0) <= 1:
        raise ConfigError(f"noise.fraction={noise_cfg['fraction']!r} must be in (0, 1]")


def build_objective(objective_cfg: dict, attack_node):
    from hydra.utils import instantiate

    options = dict(objective_cfg)
    name = options.pop("name", "?")
    try:
        if name == "smoothadv":
            if not attack_node:
                raise ConfigError("objective=smoothadv needs an attack: set attack=pgd or attack=ddn")
            attack_options = {k: v for k, v in plain(attack_node).items() if k != "name"}
            options["attack"] = instantiate(attack_options)
        elif attack_node:
            raise ConfigError(f"attack={attack_node.get('name')} is only used by objective=smoothadv, not {name}")
        return instantiate(options)
    except ConfigError:
        raise
    except Exception as err:  # the constructor's ValueError/TypeError, wrapped by instantiate
        raise ConfigError(f"objective {name}: {root_cause(err)}") from None


def build_optimizer(optim_node, model):
    """The optimizer and scheduler factories (partials) of ``optim``; both are built once on ``model`` now, so
    that a misspelt argument fails before training."""
    from hydra.utils import instantiate

    try:
        optimizer = instantiate(optim_node.optimizer)
        scheduler = instantiate(optim_node.scheduler) if optim_node.get("scheduler") else None
        probe = optimizer(params=model.parameters())
        if scheduler is not None:
            scheduler(optimizer=probe)
    except Exception as err:
        raise ConfigError(f"optim: {root_cause(err)}") from None
    return optimizer, scheduler


def build_datamodule(dataset_cfg: dict, seed: int):
    from ssmooth.data import SmoothingDataModule

    try:
        return SmoothingDataModule(**dataset_cfg, seed=seed)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"dataset: {err}") from None


def load_data(datamodule) -> None:
    """Read the splits now, so that a missing or malformed file (bad shape, NaN pixels) fails before training."""
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
    except ValueError as err:
        raise ConfigError(f"dataset: {err}") from None


def build_callbacks(callbacks_node, output_dir: Path) -> list:
    """The checkpoint writer (``checkpoints/last.ckpt`` and the best epoch) and the ``callbacks`` group."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="epoch{epoch:03d}",
                                 auto_insert_metric_name=False, save_last=True, save_top_k=1)]
    try:
        return callbacks + [instantiate(c) for c in (callbacks_node or {}).values()]
    except Exception as err:
        raise ConfigError(f"callbacks: {root_cause(err)}") from None


def build_loggers(logger_cfg: dict, output_dir: Path, resume_epoch: int | None = None):
    from hydra.utils import instantiate

    loggers = []
    for name, options in (logger_cfg or {}).items():
        options = dict(options)
        if name == "wandb":
            from ssmooth.lit.logging import wandb_offline_default

            if options.get("offline") is None:
                options["offline"] = wandb_offline_default()
            os.environ.setdefault("WANDB_SILENT", "true")
        if options.get("_target_", "").endswith("ResumableCSVLogger"):
            options["resume_epoch"] = resume_epoch  # keep the rows of the epochs the checkpoint holds
        try:
            logger = instantiate(options)
        except Exception as err:
            raise ConfigError(f"logger.{name}: {root_cause(err)}") from None
        if name == "wandb":
            # Lightning always passes wandb's deprecated `anonymous` setting, and wandb warns about it on every run.
            getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        loggers.append(logger)
    return loggers


def finish_wandb(loggers) -> None:
    """One wandb run per job: finish it even when the job fails, or the next sweep job logs into it."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        from ssmooth.lit.logging import offline_wandb_note

        note = offline_wandb_note(loggers)
        wandb.finish()
        if note:
            log.info(note)


def build_trainer(cfg: DictConfig, output_dir: Path, loggers, callbacks):
    import sys

    from hydra.utils import instantiate

    extra = {}
    if not sys.stderr.isatty():
        # Written to a file (SLURM, a redirect): one line per epoch, not a bar redrawn into one huge line.
        extra["enable_progress_bar"] = False
    if not extra.get("enable_progress_bar", cfg.trainer.get("enable_progress_bar")):
        from ssmooth.lit.logging import epoch_line_callback

        callbacks = [*callbacks, epoch_line_callback()]
    try:
        return instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                           default_root_dir=str(output_dir), **extra)
    except Exception as err:
        raise ConfigError(f"trainer: {root_cause(err)}") from None


def checkpoint_meta(cfg: DictConfig, info, noise, model_cfg: dict) -> dict:
    """What a checkpoint says about itself: dataset, architecture, noise policy, seed and the whole config."""
    where = {k: v for k, v in plain(cfg.dataset).items() if k in ("source", "root", "npz_dir")}
    # Absolute, so that certifying the checkpoint from another directory finds the same files.
    where.update({k: str(Path(where[k]).resolve()) for k in ("root", "npz_dir") if where.get(k)})
    return {
        "name": cfg.name,
        "stage": cfg.stage,
        "dataset": {"name": info.name, "num_classes": info.num_classes, "input_shape": list(info.input_shape),
                    **where},
        "model": model_cfg,
        "objective": cfg.objective.get("name", ""),
        "noise": {"kind": noise.kind, "sigma": float(noise.sigma), "grid": list(getattr(noise, "grid", []))},
        "seed": int(cfg.seed),
        "config": plain(cfg),
    }
