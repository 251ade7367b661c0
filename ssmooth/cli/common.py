"""What the console scripts share: bad input refused in one line (exit 2), Ctrl-C reported in one line (exit
130), ``--help``, the project logger, output folders, building parts from configs."""
from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

# The parts that the pipeline shares with the commands, re-exported here for the commands.
from ssmooth.build import (  # noqa: F401
    ConfigError,
    Interrupted,
    certification_grid,
    certification_note,
    certify_config,
    check_output_width,
    config_differences,
    log,
    on_interrupt,
    plain,
    rerun_hint,
    resolve_device,
    test_points,
)

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
EXIT_CONFIG_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

# One token per process: with ${now:} it makes every job's run folder unique, even for two jobs started in the
# same second. Cached, so every reference within one process agrees.
OmegaConf.register_new_resolver("ssmooth_token", lambda: f"{os.getpid()}-{uuid.uuid4().hex[:6]}", use_cache=True,
                                replace=True)

# The keys a multirun sweeps over, found on the command line by `console_main`; the environment carries them to
# jobs that a launcher starts in other processes.
SWEPT_KEYS_ENV = "SSMOOTH_SWEPT_KEYS"


def swept_values(task_overrides) -> str:
    """``key=value`` of this job's swept keys (comma separated), or "" outside a sweep."""
    swept = [k for k in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if k]
    if not swept:
        return ""
    pairs = [o.lstrip("+~") for o in task_overrides or []]
    return ",".join(p for p in pairs if p.split("=", 1)[0] in swept)


# A sweep job's folder shows what varies: hydra.sweep.subdir is ${hydra.job.num}_${ssmooth_job_dir:${name}}.
OmegaConf.register_new_resolver(
    "ssmooth_job_dir", lambda name, _root_: swept_values(_root_.hydra.overrides.task) or name, replace=True)


# Lightning's lines that tell a user of these commands nothing: its own Ctrl-C line (ours says what was kept), its
# advertisements, the hardware it did not find, settings we made on purpose (limit_*_batches, the seed), and the
# end of fit (printed while the progress bar is live, it makes the bar draw its last state twice).
_DROPPED_LINES = ("Detected KeyboardInterrupt", "litlogger", "litmodels", "💡 Tip", "GPU available:", "TPU available:",
                  "HPU available:", "CUDA_VISIBLE_DEVICES:", "was configured so", "`Trainer.fit` stopped", "Seed set to")
# Lightning's warnings about choices these commands make on purpose: a deprecation inside Lightning itself, a
# resumed run writing into its own checkpoint folder (the run folder check allowed it), a stage without
# validation data (the selector's labels are levels of training points), small demo epochs.
_IGNORED_WARNINGS = (r".*isinstance\(treespec, LeafSpec\).*", r"Checkpoint directory .* exists and is not empty",
                     r".*defined a `validation_step` but have no `val_dataloader`.*",
                     r".*smaller than the logging interval.*")


def quiet_console() -> None:
    """Lightning's messages go through the root logger (console and the run's log file, once) instead of a handler
    of its own, without the lines and warnings that tell a user of these commands nothing."""
    import warnings

    import lightning  # noqa: F401  (imported now: on import it adds console handlers of its own, removed below)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True
    for handler in logging.getLogger().handlers:
        if not any(f is _keep_line for f in handler.filters):
            handler.addFilter(_keep_line)
    for pattern in _IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)


def _keep_line(record: logging.LogRecord) -> bool:
    return not any(s in record.getMessage() for s in _DROPPED_LINES)


def exit_on_config_error(task):
    """Print a ConfigError (or a missing file) as one line and exit 2, and Ctrl-C as one line saying what was
    kept and exit 130, instead of a wall of traceback."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig):
        quiet_console()
        try:
            return task(cfg)
        except (ConfigError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_CONFIG_ERROR)
        except KeyboardInterrupt as err:
            note = str(err).removeprefix("interrupted: ") or "nothing was kept"  # Interrupted, or the library's own
            print(f"\ninterrupted: {note}", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


def console_main(config_name: str, task: Callable[[DictConfig], object], doc: str) -> Callable[[], None]:
    """The entry point of a console script: ``--help`` from ``doc`` and the config groups the command takes;
    command-line overrides checked before Hydra starts (a misspelt key is one line and exit 2); then the Hydra
    app running ``task`` under ``exit_on_config_error``."""
    import hydra

    app = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(exit_on_config_error(task))

    def main() -> None:
        args = sys.argv[1:]
        try:
            if any(a in ("-h", "--help") for a in args):
                print(command_help(config_name, doc))
                return
            swept = check_overrides(config_name, args)
            if swept:
                os.environ[SWEPT_KEYS_ENV] = ",".join(swept)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(EXIT_CONFIG_ERROR)
        except KeyboardInterrupt:
            print("\ninterrupted before anything started", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        app()

    main.__doc__ = doc
    return main


def _compose(config_name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name, overrides=overrides, return_hydra_config=True)


def config_keys(cfg) -> list[str]:
    """Every dotted key of a config (leaves and nodes)."""
    keys = []

    def walk(node, prefix):
        for key, value in node.items():
            full = f"{prefix}{key}"
            keys.append(full)
            if isinstance(value, dict):
                walk(value, f"{full}.")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return keys


def check_overrides(config_name: str, args: list[str]) -> list[str]:
    """Compose the config with the command line's overrides (every value of a sweep) and raise ConfigError in one
    line for an unknown key (with the closest valid key), a config group option that does not exist, or a value
    Hydra cannot parse. Returns the keys a multirun sweeps over.

    Anything this check cannot judge (Hydra's own options such as --cfg, sweeps over globs) is left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    multirun = any(a in ("-m", "--multirun") for a in args)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return []
    overrides = [a for a in args if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise ConfigError(f"cannot parse the command line: {_first_line(err)}") from None
    sweeps = [o for o in parsed if o.is_sweep_override()] if multirun else []
    try:
        first = {id(o): next(iter(o.sweep_string_iterator())) for o in sweeps}
        variants = [[f"{o.get_key_element()}={first[id(o)]}" if id(o) in first else o.input_line for o in parsed]]
        for i, o in enumerate(parsed):
            if id(o) in first:
                for value in list(o.sweep_string_iterator())[1:]:
                    variant = list(variants[0])
                    variant[i] = f"{o.get_key_element()}={value}"
                    variants.append(variant)
    except Exception:  # e.g. glob() sweeps need Hydra's own expansion
        return [o.key_or_group for o in sweeps]
    for variant in variants:
        try:
            composed = _compose(config_name, variant)
        except MissingConfigException as err:
            found = re.search(r"Could not find '([^']+)/([^'/]+)'", str(err))
            if found and err.options:
                raise ConfigError(f"{found.group(1)}={found.group(2)}: no such config; choose one of "
                                  f"{', '.join(err.options)}") from None
            raise ConfigError(_first_line(err)) from None
        except ConfigCompositionException as err:
            unknown = re.match(r"Could not override '([^']+)'", str(err))
            if unknown:
                key = unknown.group(1)
                rest = [v for v in variant if not re.match(rf"[+~]*{re.escape(key)}=", v)]
                try:
                    known = config_keys(_compose(config_name, rest))
                except Exception:
                    known = []
                raise ConfigError(f"unknown key '{key}'; {unknown_key_hint(key, known)}") from None
            if str(err).startswith("Ambiguous value"):
                raise ConfigError(f"{_first_line(err)}: sweep over it with -m, or write a list as key=[a,b]") from None
            raise ConfigError(_first_line(err)) from None
        check_composed(composed)
    return [o.key_or_group for o in sweeps]


def unknown_key_hint(key: str, known: list[str]) -> str:
    """The setting a misspelt or unqualified key most likely meant: a close spelling (``trainer.max_epoch``), or
    a setting whose last part is the key (``n`` -> ``certify.n``). Never ``+KEY=VALUE``: a new key is read by
    nothing, so the run would go ahead at the default without a word."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in known if k.rsplit(".", 1)[-1] == leaf and not k.startswith("hydra.")][:3]
    if close:
        return f"did you mean {' or '.join(repr(k) for k in close)}?"
    return "no setting has this name (--cfg job prints every key)"


def check_composed(cfg) -> None:
    """Settings the composed config must have, checked before Hydra starts and makes a run folder: mandatory keys
    given (``ckpt=PATH``), and ``certify.*`` of the right types and in range."""
    # Unresolved: interpolations such as output_dir resolve only inside the running app; Hydra's own node holds
    # ??? values that it fills in then.
    missing = [key for key in config_keys(cfg) if not key.startswith("hydra") and OmegaConf.is_missing(
        OmegaConf.select(cfg, key.rpartition(".")[0]) if "." in key else cfg, key.rpartition(".")[2])]
    if missing:
        raise ConfigError(f"{missing[0]}=... is required (e.g. {missing[0]}={REQUIRED_EXAMPLES.get(missing[0], 'VALUE')})")
    if "certify" in cfg:
        try:
            node = OmegaConf.to_container(cfg.certify, resolve=True)
        except Exception:  # an interpolation only Hydra's running app can resolve: checked again in the task
            return
        certify_config(node)


# What to write for a required key, in its "is required" line.
REQUIRED_EXAMPLES = {"ckpt": "outputs/runs/RUN/checkpoints/last.ckpt"}


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def command_help(config_name: str, doc: str) -> str:
    """``doc`` and the config groups this command composes (with their options and defaults)."""
    lines = [doc.strip(), "", "Config groups (choose with GROUP=OPTION; ~GROUP removes one):"]
    try:
        choices = _compose(config_name, []).hydra.runtime.choices
    except Exception as err:  # help must still print if the config is broken
        choices = {}
        lines.append(f"  (could not compose the config: {_first_line(err)})")
    for group, default in sorted(choices.items()):
        if group.startswith("hydra/"):
            continue
        options = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
        lines.append(f"  {group}: {' | '.join(options)}   (default: {default})")
    lines += ["", "Any key can be set with KEY=VALUE (e.g. trainer.max_epochs=5); print the composed config with",
              "--cfg job; run a sweep with -m KEY=A,B; Hydra's own options: --hydra-help."]
    return "\n".join(lines)


def report_certification(summary: dict, out_dir: Path) -> None:
    """Print the certified-accuracy table and draw the curve of a finished certification."""
    from ssmooth import report

    report.print_table([summary])
    report.plot_run(summary, out_dir, title=summary.get("name"))
    parts = summary.get("parts_wall_time_s")
    if parts:
        log.info(f"wall time: {summary['wall_time_s']:.1f} s waited (slowest of {parts['count']} parts "
                 f"{parts['slowest']:.1f} s, then the merge), {parts['sum']:.1f} s summed over the parts")
    log.info(f"rows, summary and plot: {out_dir}")
