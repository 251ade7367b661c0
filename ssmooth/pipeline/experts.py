"""The experts stage: the pretrained model finetuned at the constant level of each level of the grid, one
expert per level, for certificates that route each input to the expert of its level."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig

EXPERTS_FILE = "experts.json"


def expert_folder(level: float) -> str:
    """The expert of ``level``'s folder, relative to the pipeline's folder."""
    return f"experts/s{float(level):g}"


def train_experts(cfg: DictConfig, grid: list[float], train_level: Callable[[float, str], Path],
                  done: dict[float, Path] | None = None) -> Path:
    """One expert per level of ``grid``: ``train_level(level, folder)`` trains the expert of ``level`` in
    ``folder`` (relative to ``cfg.output_dir``) and returns its checkpoint; levels already in ``done`` (level ->
    checkpoint, e.g. the constant arm at the base level) are not trained again. Writes ``experts.json`` in
    ``cfg.output_dir`` (levels in increasing order, checkpoints relative to it) and returns its path."""
    out = Path(cfg.output_dir)
    done = {float(k): Path(v) for k, v in (done or {}).items()}
    checkpoints = {}
    for level in sorted(float(s) for s in grid):
        checkpoints[level] = done[level] if level in done else train_level(level, expert_folder(level))
    path = out / EXPERTS_FILE
    levels = sorted(checkpoints)
    path.write_text(json.dumps({
        "levels": levels,
        "checkpoints": [str(Path(checkpoints[s]).resolve().relative_to(out.resolve())) for s in levels],
    }, indent=2) + "\n")
    return path


def load_experts(folder) -> tuple[list[float], list]:
    """The experts a pipeline trained: (levels in increasing order, one model per level, in eval mode on the
    CPU). ``folder`` is the pipeline's folder (holding ``experts.json``) or the file itself. Raises
    FileNotFoundError when there is none, ValueError when an expert's checkpoint does not fit its entry."""
    from ssmooth.build import build_model
    from ssmooth.data import dataset_info
    from ssmooth.lit.module import load_checkpoint, model_state

    path = Path(folder)
    path = path if path.suffix == ".json" else path / EXPERTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no experts: {path} does not exist (train them with pipeline.experts=true)")
    listing = json.loads(path.read_text())
    levels = [float(s) for s in listing["levels"]]
    models = []
    for level, relative in zip(levels, listing["checkpoints"], strict=True):
        meta, state = load_checkpoint(path.parent / relative)
        if meta["noise"]["kind"] != "constant" or abs(float(meta["noise"]["sigma"]) - level) > 1e-12:
            raise ValueError(f"{path}: the expert of level {level} ({relative}) was trained with noise "
                             f"{meta['noise']}, not at the constant level {level}")
        model = build_model(meta["model"], dataset_info(meta["dataset"]["name"]))
        model.load_state_dict(model_state(state))
        models.append(model.eval())
    return levels, models
