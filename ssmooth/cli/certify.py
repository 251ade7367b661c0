"""ssmooth-certify: certify a saved checkpoint on a test subset.

  ssmooth-certify ckpt=outputs/runs/RUN/checkpoints/last.ckpt
  ssmooth-certify ckpt=PATH certify.skip=20 certify.n=100000 certify.alpha=0.001        # Cohen's protocol
  ssmooth-certify ckpt=PATH certify.policy=samplewise certify.allocation=lp             # per-point levels
  ssmooth-certify ckpt=PATH dataset.source=npz dataset.npz_dir=DIR                      # data from .npz

The checkpoint carries the architecture, normalization, dataset, classes and noise policy; set only the test
subset and the sampling (certify.*), where the test split is read from (dataset.source, dataset.root,
dataset.npz_dir) and device. Re-running into the same folder (hydra.run.dir=...) resumes where an interrupted
run stopped; Ctrl-C says how many rows were kept.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ssmooth.cli.common import (
    ConfigError,
    certification_grid,
    certification_note,
    certify_config,
    check_output_width,
    console_main,
    on_interrupt,
    plain,
    report_certification,
    resolve_device,
    test_points,
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
    check_output_width(model, datamodule.info.input_shape, datamodule.info.num_classes, f"checkpoint {cfg.ckpt}")

    noise = meta["noise"]
    # A checkpoint trained with per-sample levels carries their grid (certify.policy=constant leaves it unused).
    grid = certification_grid(cert_cfg, noise["sigma"], noise.get("grid"), f"checkpoint {cfg.ckpt}")
    points = test_points(datamodule, cert_cfg)
    output_dir = Path(cfg.output_dir)
    with on_interrupt(lambda: certification_note(output_dir, len(points))):
        summary = certify_model(model, points, output_dir, cert_cfg, num_classes=datamodule.info.num_classes,
                                base_sigma=noise["sigma"], grid=grid, dataset=datamodule.info.name,
                                meta={**meta, "checkpoint": str(cfg.ckpt)}, device=resolve_device(cfg.device))
    report_certification(summary, output_dir)
    return summary


main = console_main("certify", run, __doc__)


if __name__ == "__main__":
    main()
