"""What the console scripts share: bad input refused in one line (exit 2), Ctrl-C reported in one line (exit
130), ``--help``, the project logger, output folders, building parts from configs."""
from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Callable, Iterator

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
EXIT_CONFIG_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

# The run's messages: through logging, so that they reach the console and the run's <job>.log file once.
log = logging.getLogger("ssmooth")

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


class ConfigError(ValueError):
    """A bad setting, found before any work starts; the message names the key and the value."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with one line saying what the interrupted work kept and how to resume it."""


@contextlib.contextmanager
def on_interrupt(note: Callable[[], str], folder: Path | None = None) -> Iterator[None]:
    """Ctrl-C inside the block becomes ``Interrupted(message)``, printed by ``exit_on_config_error`` (exit 130).

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


def plain(node) -> dict:
    """A config node as a plain dict (resolved)."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else {}


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


def certification_note(out_dir: Path, total: int) -> str:
    """What an interrupted certification kept: flushed rows per file, and how to resume."""
    kept = []
    for path in sorted(Path(out_dir).glob("certify*.tsv")):
        text = path.read_text()
        rows = max(text.count("\n") - 1, 0)  # a torn last line has no newline and is redone on resume
        kept.append(f"{rows}/{total} rows in {path.name}")
    what = ", ".join(kept) if kept else "no rows yet"
    return f"certification stopped: kept {what} in {out_dir}; {rerun_hint(out_dir)} to resume"


def rerun_hint(out_dir: Path) -> str:
    """How to run the same command into the same folder (run folders are time-stamped by default)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return f"re-run the same command with hydra.sweep.dir={hydra_cfg.sweep.dir}"
        return f"re-run the same command with hydra.run.dir={hydra_cfg.runtime.output_dir}"
    except Exception:  # outside a Hydra app (called from Python)
        return f"re-run with output_dir={out_dir}"
