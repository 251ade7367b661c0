"""The experts' certificates, after the experts stage: the selector routes each input to the expert of its level
(routed, and routed_set over every level the selector may pick within the radius), the cascade runs the experts from the largest level down, and the best single level is each expert at
its own level. Folder ``experts_certify/``, on the same points as the other stages."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig

from ssmooth.build import (ConfigError, build_datamodule, build_model, certification_note, certify_config, log,
                           on_interrupt, plain, resolve_device, test_points)

FOLDER = "experts_certify"
KINDS = ["constant_best", "routed", "routed_set", "cascade"]


def certify_experts(cfg: DictConfig) -> dict | None:
    """Certify the experts of the pipeline in ``cfg.output_dir`` with the selector of its ``selector/`` stage.
    Returns the summary (None when certification is off)."""
    from ssmooth.certify.runfolder import RunFolderError, file_sha256
    from ssmooth.evaluate import certify_model
    from ssmooth.lit.module import load_checkpoint, model_state
    from ssmooth.lit.selector import load_selector
    from ssmooth.pipeline.experts import load_experts
    from ssmooth.pipeline.train import draw_certified_accuracy

    cert_cfg = certify_config(cfg.certify)
    if not cert_cfg.enabled:
        return None
    out = Path(cfg.output_dir)
    ckpt = out / "selector" / "checkpoints" / "last.ckpt"
    datamodule = build_datamodule(plain(cfg.dataset), cfg.seed)
    meta, state = load_checkpoint(ckpt)
    classifier = build_model(meta["model"], datamodule.info)
    classifier.load_state_dict(model_state(state))
    selector = load_selector(meta, state, datamodule.info)
    experts = load_experts(out)
    points = test_points(datamodule, cert_cfg)
    cert_cfg = dataclasses.replace(cert_cfg, policy="routed", kinds=KINDS)
    folder = out / FOLDER
    log.info(f"{folder}: the experts' certificates ({', '.join(KINDS)})")
    with on_interrupt(lambda: certification_note(folder, len(points)), folder=folder):
        try:
            summary = certify_model(classifier, points, folder, cert_cfg, num_classes=datamodule.info.num_classes,
                                    base_sigma=meta["noise"]["sigma"], dataset=datamodule.info.name,
                                    meta={**meta, "name": f"{cfg.name}/{FOLDER}"}, device=resolve_device("auto"),
                                    selector=selector, experts=experts, checkpoint_sha256=file_sha256(ckpt))
        except RunFolderError as err:
            raise ConfigError(str(err)) from None
    draw_certified_accuracy(summary, folder)
    return summary
