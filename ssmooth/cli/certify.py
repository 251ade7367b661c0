"""ssmooth-certify: certify a saved checkpoint on a test subset.

  ssmooth-certify ckpt=outputs/runs/RUN/checkpoints/last.ckpt
  ssmooth-certify ckpt=PATH certify.skip=20 certify.n=100000 certify.alpha=0.001        # Cohen's protocol
  ssmooth-certify ckpt=PATH certify.policy=samplewise certify.allocation=lp             # per-point levels
  ssmooth-certify ckpt=RUN/selector/checkpoints/last.ckpt certify.policy=inductive     # level selector
  ssmooth-certify ckpt=RUN/selector/checkpoints/last.ckpt certify.experts=RUN          # routed to experts
  ssmooth-certify ckpt=RUN/finetune_samplewise/checkpoints/last.ckpt certify.policy=cascade
  ssmooth-certify ckpt=PATH certify.sampling=adaptive certify.max_radius_loss=0.04     # fewer samples per point
  ssmooth-certify ckpt=PATH dataset.source=npz dataset.npz_dir=DIR                      # data from .npz

Many devices and cluster jobs (docs/DISTRIBUTED.md): every point draws its noise from its own streams, so
these give the same rows as one process.

  ssmooth-certify ckpt=PATH distributed=ddp distributed.devices=8                # one process per GPU
  ssmooth-certify ckpt=PATH distributed=ddp distributed.devices=8 distributed.num_nodes=2   # on each node
  ssmooth-certify ckpt=PATH certify.num_shards=4 certify.shard=0 hydra.run.dir=shards/0   # one job of four
  ssmooth-certify ckpt=PATH certify.merge=true certify.shard_dirs=[shards/0,shards/1,shards/2,shards/3]
  ssmooth-certify ckpt=PATH certify.merge=true 'certify.shard_dirs="shards/*"'          # the same, a pattern

The checkpoint carries the architecture, normalization, dataset, classes and noise policy; set only the test
subset and the sampling (certify.*), where the test split is read from (dataset.source, dataset.root,
dataset.npz_dir), the device and the processes (distributed). Re-running into the same folder
(hydra.run.dir=...) resumes where an interrupted run stopped, and Ctrl-C says how many rows were kept; a folder
holding rows of another checkpoint or other settings is refused (certify.overwrite=true starts it afresh).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ssmooth.cli.common import (
    ConfigError,
    certification_grid,
    certification_note,
    certify_config,
    check_output_width,
    console_main,
    log,
    on_interrupt,
    plain,
    report_certification,
    resolve_device,
    test_points,
)


def launch(dist):
    """Start the processes ``distributed`` asks for; returns Lightning Fabric (rank, world size, barrier, device).

    Fabric starts one process per device here (re-running this command with the rank set), or takes the ranks
    that SLURM (srun) or torchrun started. The ranks only wait for each other at one barrier, so gloo serves
    GPUs and CPUs alike."""
    from datetime import timedelta

    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    strategy = DDPStrategy(process_group_backend="gloo", timeout=timedelta(hours=float(dist.timeout_hours)))
    fabric = Fabric(accelerator=dist.accelerator, devices=dist.devices, num_nodes=dist.num_nodes, strategy=strategy)
    fabric.launch()
    return fabric


def stop_children(fabric) -> None:
    """Rank 0 failed: stop the processes it started, which would otherwise wait at the barrier until the
    timeout (Fabric stops everything when a child fails, but not when the launching process does)."""
    for proc in getattr(getattr(fabric.strategy, "launcher", None), "procs", []):
        proc.terminate()


def check_distributed(dist, cert_cfg) -> None:
    if dist.strategy not in ("none", "ddp"):
        raise ConfigError(f"distributed.strategy={dist.strategy!r} must be 'none' or 'ddp'")
    if dist.num_nodes < 1:
        raise ConfigError(f"distributed.num_nodes={dist.num_nodes!r} must be >= 1")
    if not (dist.devices == -1 or (isinstance(dist.devices, int) and dist.devices >= 1)):
        raise ConfigError(f"distributed.devices={dist.devices!r} must be >= 1, or -1 for every GPU")
    if dist.strategy == "ddp" and (cert_cfg.num_shards > 1 or cert_cfg.merge):
        raise ConfigError("certify.num_shards / certify.merge split the work into independent jobs: run each job "
                          "with distributed=none")


def shard_folders(shard_dirs) -> list[str]:
    """``certify.shard_dirs``: a list of folders, or one glob pattern (``outputs/sweeps/RUN/*``)."""
    if isinstance(shard_dirs, str):
        import glob

        found = sorted(glob.glob(shard_dirs))
        if not found:
            raise ConfigError(f"certify.shard_dirs={shard_dirs!r} matches no folder")
        return found
    return [str(d) for d in shard_dirs]


def certify_experts(spec, dataset: str):
    """``certify.experts``: a pipeline folder holding experts.json, or a list of checkpoints each trained at one
    constant level. Returns ``(levels, models)`` in increasing level order, or None."""
    if not spec:
        return None
    from ssmooth.checkpoints import load_model
    from ssmooth.pipeline.experts import load_experts

    try:
        if isinstance(spec, str):
            return load_experts(spec)
        loaded = [load_model(path) for path in spec]
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"certify.experts: {err}") from None
    for path, (_, meta) in zip(spec, loaded):
        if meta["noise"]["kind"] != "constant" or meta["dataset"]["name"] != dataset:
            raise ConfigError(f"certify.experts: {path} is not a model trained at one constant level on {dataset}")
    by_level = sorted(((float(meta["sigma"]), model) for model, meta in loaded), key=lambda pair: pair[0])
    levels = [level for level, _ in by_level]
    if len(set(levels)) != len(levels):
        raise ConfigError(f"certify.experts: two experts share a level ({levels})")
    return levels, [model for _, model in by_level]


def command_line_keys() -> set[str]:
    """The keys set on the command line (empty when called from Python, outside the console script)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return {o.lstrip("+~").split("=", 1)[0] for o in HydraConfig.get().overrides.task}
    except Exception:
        return set()


def batch_size_of_checkpoint(cert_cfg, meta: dict):
    """``cert_cfg`` with the forward batch size the checkpoint's own run certified with, unless the command line
    sets one: the same work as inside the pipeline at the same speed (a recipe's 4000 against the default 1000
    made LeNet about 30% slower per certificate). The rows do not depend on it."""
    from dataclasses import replace

    from ssmooth.evaluate import CertifyConfig

    trained = ((meta.get("config") or {}).get("certify") or {}).get("batch_size")
    if ("certify.batch_size" in command_line_keys() or cert_cfg.batch_size != CertifyConfig.batch_size
            or not isinstance(trained, int) or trained < 1 or trained == cert_cfg.batch_size):
        return cert_cfg
    log.info(f"certify.batch_size={trained}, as the checkpoint's own run certified (set certify.batch_size to change)")
    return replace(cert_cfg, batch_size=trained)


def load_checkpoint_to_certify(cfg: DictConfig, cert_cfg):
    """What ``ckpt=`` holds, checked: ``(meta, datamodule, model, grid, selector, experts, cert_cfg)``, the
    settings completed from the checkpoint (its batch size). Every problem is a one-line ConfigError."""
    from ssmooth.build import build_datamodule, build_model
    from ssmooth.lit.module import load_checkpoint, model_state

    try:
        meta, state = load_checkpoint(cfg.ckpt)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    cert_cfg = batch_size_of_checkpoint(cert_cfg, meta)
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
    selector = None
    if "selector" in meta and cert_cfg.policy in (None, "inductive", "routed"):
        from ssmooth.lit.selector import load_selector

        selector = load_selector(meta, state, datamodule.info)
    if cert_cfg.policy == "inductive" and selector is None:
        raise ConfigError(f"certify.policy=inductive: checkpoint {cfg.ckpt} has no level selector; train one with "
                          "the pipeline's selector stage (stage=pipeline selector.enabled=true)")
    experts = certify_experts(cert_cfg.experts, datamodule.info.name)
    return meta, datamodule, model, grid, selector, experts, cert_cfg


def run(cfg: DictConfig) -> dict | None:
    from ssmooth.certify.distributed import MergeError
    from ssmooth.certify.runfolder import RunFolderError, file_sha256
    from ssmooth.evaluate import certify_model, certify_on_ranks, certify_part

    if OmegaConf.is_missing(cfg, "ckpt"):  # the command line checks this first; a config built in Python too
        raise ConfigError("ckpt=... is required: the checkpoint to certify")
    cert_cfg = certify_config(cfg.certify)
    check_distributed(cfg.distributed, cert_cfg)
    meta, datamodule, model, grid, selector, experts, cert_cfg = load_checkpoint_to_certify(cfg, cert_cfg)
    noise = meta["noise"]
    points = test_points(datamodule, cert_cfg)
    output_dir = Path(cfg.output_dir)
    rank, world_size, barrier, device, fabric = 0, 1, None, resolve_device(cfg.device), None
    if cfg.distributed.strategy == "ddp":
        fabric = launch(cfg.distributed)
        rank, world_size, barrier, device = fabric.global_rank, fabric.world_size, fabric.barrier, fabric.device
        # Every rank writes into rank 0's run folder: processes that SLURM or torchrun started on several nodes
        # each make their own folder unless told the same one.
        root = fabric.broadcast(str(output_dir.resolve()), src=0)
        if root != str(output_dir.resolve()):
            raise ConfigError(f"rank {rank} runs in {output_dir}, rank 0 in {root}: give every node the same "
                              "hydra.run.dir=... on a filesystem they share")
    kw = dict(num_classes=datamodule.info.num_classes, base_sigma=noise["sigma"], grid=grid,
              dataset=datamodule.info.name, meta={**meta, "checkpoint": str(cfg.ckpt)}, device=device,
              checkpoint_sha256=file_sha256(cfg.ckpt), selector=selector, experts=experts)
    with on_interrupt(lambda: certification_note(output_dir, len(points)), folder=output_dir):
        try:
            if cert_cfg.merge:
                summary = certify_model(model, points, output_dir, cert_cfg,
                                        merge_from=shard_folders(cert_cfg.shard_dirs), **kw)
            elif cert_cfg.num_shards > 1:
                bar = {"desc": f"shard {cert_cfg.shard}/{cert_cfg.num_shards} certify"}
                certify_part(model, points, output_dir, cert_cfg, part=cert_cfg.shard, num_parts=cert_cfg.num_shards,
                             bar=bar, **kw)
                print(f"shard {cert_cfg.shard} of {cert_cfg.num_shards} complete: {output_dir}\n"
                      "merge all shards with certify.merge=true certify.shard_dirs=[FOLDER,...]")
                return None
            else:
                summary = certify_on_ranks(model, points, output_dir, cert_cfg, rank=rank, world_size=world_size,
                                           barrier=barrier, **kw)
        except (MergeError, RunFolderError, ValueError) as err:
            # refused: a bad part, another run's folder, or input the library refuses (NaN pixels or logits)
            if fabric is not None:
                stop_children(fabric)
            raise ConfigError(str(err)) from None
        except BaseException:
            if fabric is not None:
                stop_children(fabric)
            raise
    if summary is not None:  # rank 0
        report_certification(summary, output_dir)
    return summary


main = console_main("certify", run, __doc__)


if __name__ == "__main__":
    main()
