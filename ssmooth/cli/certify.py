"""ssmooth-certify: certify a saved checkpoint on a test subset.

  ssmooth-certify ckpt=outputs/runs/RUN/checkpoints/last.ckpt
  ssmooth-certify ckpt=PATH certify.skip=20 certify.n=100000 certify.alpha=0.001        # Cohen's protocol
  ssmooth-certify ckpt=PATH certify.policy=samplewise certify.allocation=lp             # per-point levels
  ssmooth-certify ckpt=RUN/selector/checkpoints/last.ckpt certify.policy=inductive     # level selector
  ssmooth-certify ckpt=PATH dataset.source=npz dataset.npz_dir=../shared/data          # data from .npz

The checkpoint carries the architecture, normalization, dataset, classes and noise policy. Re-running into
the same folder (hydra.run.dir=...) resumes where an interrupted run stopped.
"""
from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from ssmooth.cli.common import (
    CONFIG_DIR,
    ConfigError,
    certify_config,
    exit_on_config_error,
    plain,
    report_certification,
    resolve_device,
)


def run(cfg: DictConfig) -> dict:
    from ssmooth.cli.train import build_datamodule, build_model
    from ssmooth.evaluate import certify_model
    from ssmooth.lit.module import load_checkpoint, model_state

    cert_cfg = certify_config(cfg.certify)
    try:
        meta, state = load_checkpoint(cfg.ckpt)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    dataset_cfg = {"name": meta["dataset"]["name"], "source": meta["dataset"].get("source", "auto"),
                   "root": meta["dataset"].get("root", "data"), "npz_dir": meta["dataset"].get("npz_dir")}
    unknown = set(plain(cfg.dataset)) - {"source", "root", "npz_dir", "download"}
    if unknown:
        raise ConfigError(f"dataset: unknown key(s) {sorted(unknown)}")
    dataset_cfg.update({k: v for k, v in plain(cfg.dataset).items() if v is not None})
    datamodule = build_datamodule(dataset_cfg, seed=meta.get("seed", 0))
    model = build_model(meta["model"], datamodule.info)
    try:
        model.load_state_dict(model_state(state))
    except RuntimeError as err:
        raise ConfigError(f"checkpoint {cfg.ckpt} does not match its own architecture: {err}") from None

    noise = meta["noise"]
    # A checkpoint trained with per-sample levels carries their grid (certify.policy=constant leaves it unused).
    grid = noise.get("grid") or None
    if cert_cfg.grid_factors is not None:
        from ssmooth.noise import sigma_grid

        grid = sigma_grid(cert_cfg.sigma or noise["sigma"], cert_cfg.grid_factors)
    selector = None
    if "selector" in meta and cert_cfg.policy in (None, "inductive"):
        from ssmooth.lit.selector import load_selector

        selector = load_selector(meta, state, datamodule.info)
    if cert_cfg.policy == "inductive" and selector is None:
        raise ConfigError(f"certify.policy=inductive: checkpoint {cfg.ckpt} has no level selector; train one with "
                          "the pipeline's selector stage (stage=pipeline selector.enabled=true)")
    if cert_cfg.policy == "samplewise" and not grid:
        raise ConfigError(f"certify.policy=samplewise: checkpoint {cfg.ckpt} was trained at one level; give the "
                          "grid with certify.grid_factors=[0.5,1.0,2.0]")
    points = datamodule.test_points(cert_cfg.skip, cert_cfg.max, cert_cfg.start)
    output_dir = Path(cfg.output_dir)
    summary = certify_model(model, points, output_dir, cert_cfg, num_classes=datamodule.info.num_classes,
                            base_sigma=noise["sigma"], grid=grid, dataset=datamodule.info.name,
                            meta={**meta, "checkpoint": str(cfg.ckpt)}, device=resolve_device(cfg.device),
                            selector=selector)
    report_certification(summary, output_dir)
    return summary


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="certify")
@exit_on_config_error
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
