"""The pipeline's stages called from Python (no command line): experts, the selector stage, run folders."""
import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from ssmooth.build import ConfigError, build_datamodule, build_model, certify_config, compose_settings
from ssmooth.build import test_points as points_of
from ssmooth.lit.module import load_checkpoint, model_state
from ssmooth.certify.results import read_rows
from ssmooth.lit.selector import load_selector
from ssmooth.pipeline import load_experts, run_pipeline
from ssmooth.pipeline.run import stage_kinds
from ssmooth.pipeline.selector import reuse_constant_rows

# One optimizer step per stage, two certified points, few samples.
TINY = [
    "experiment=demo", "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "dataset.train_subset=8",
    "dataset.batch_size=4", "dataset.eval_batch_size=4", "dataset.num_workers=0", "noise.num_draws=2",
    "certify.n0=8", "certify.n=100", "certify.max=2", "certify.skip=1", "certify.batch_size=64",
    "certify.progress=false", "pipeline.finetune_epochs=1", "selector.epochs=1", "logger=none",
    "pipeline.experts=true",
]


def tiny_settings(out: Path, *overrides: str):
    return compose_settings([*TINY, f"output_dir={out}", *overrides])


def test_experts_one_per_level_with_the_constant_arm_as_the_base_levels_expert(tmp_path):
    cfg = tiny_settings(tmp_path, "selector.enabled=false", "noise.grid_factors=[0.5,1.0,2.0]")
    run_pipeline(cfg)
    listing = json.loads((tmp_path / "experts.json").read_text())
    assert listing["levels"] == [0.125, 0.25, 0.5]
    assert listing["checkpoints"] == ["experts/s0.125/checkpoints/last.ckpt",
                                      "finetune_constant/checkpoints/last.ckpt",
                                      "experts/s0.5/checkpoints/last.ckpt"]
    assert not (tmp_path / "experts" / "s0.25").exists()  # the constant arm is not trained twice
    levels, models = load_experts(tmp_path)
    assert levels == [0.125, 0.25, 0.5]
    for level, model, path in zip(levels, models, listing["checkpoints"]):
        meta, state = load_checkpoint(tmp_path / path)
        assert meta["noise"] == {"kind": "constant", "sigma": level, "grid": []}
        assert meta["stage"] == "finetune"
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, model_state(state)[name])
        assert not model.training
    # Experts are trained, not certified: no summary of their own, so the report holds the same stages.
    assert not list((tmp_path / "experts").rglob("summary.json"))


def test_experts_without_the_constant_arm_train_the_base_level_too_resume_and_are_checked(tmp_path):
    with pytest.raises(FileNotFoundError, match="pipeline.experts=true"):
        load_experts(tmp_path)
    cfg = tiny_settings(tmp_path, "selector.enabled=false", "pipeline.constant_arm=false",
                        "noise.grid_factors=[1.0,2.0]", "certify.enabled=false")
    run_pipeline(cfg)
    levels, _ = load_experts(tmp_path / "experts.json")
    assert levels == [0.25, 0.5]
    assert (tmp_path / "experts" / "s0.25" / "checkpoints" / "last.ckpt").is_file()
    before = (tmp_path / "experts" / "s0.5" / "checkpoints" / "last.ckpt").stat().st_mtime_ns
    run_pipeline(cfg)  # the same settings: every finished stage is skipped
    assert (tmp_path / "experts" / "s0.5" / "checkpoints" / "last.ckpt").stat().st_mtime_ns == before
    listing = json.loads((tmp_path / "experts.json").read_text())
    listing["checkpoints"].reverse()  # each level now points at the other level's expert
    (tmp_path / "experts.json").write_text(json.dumps(listing))
    with pytest.raises(ValueError, match=r"expert of level 0.25 .* not at the constant level 0.25"):
        load_experts(tmp_path)


def test_a_pipeline_refused_in_a_later_stage_writes_nothing(tmp_path):
    from ssmooth.build import ConfigError

    # The pretrain stage is fine; the finetuning optimizer of the later stages is not.
    cfg = tiny_settings(tmp_path / "run", "pipeline.finetune_lr=-1")
    with pytest.raises(ConfigError, match=r"^optim: Invalid learning rate: -1 \(in demo/finetune_samplewise, .*"
                                          r"pipeline.finetune_lr=-1 "):
        run_pipeline(cfg)
    assert not (tmp_path / "run").exists()
    for bad in (["noise.sigma=-0.5"], ["selector.sigma_e=-1"], ["selector.lr=-1"]):
        with pytest.raises(ConfigError):
            run_pipeline(tiny_settings(tmp_path / "run", *bad))
        assert not (tmp_path / "run").exists()


def test_a_folder_holding_only_the_settings_of_a_run_that_never_started_counts_as_empty(tmp_path):
    from omegaconf import OmegaConf

    from ssmooth.pipeline import check_run_folder, never_started

    cfg = tiny_settings(tmp_path)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "train.log").write_text("")
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(tiny_settings(tmp_path, "noise.sigma=-0.5")))
    assert never_started(tmp_path)
    assert check_run_folder(cfg, tmp_path) == "fresh"
    (tmp_path / "pretrain").mkdir()  # a stage began: the settings now decide
    assert not never_started(tmp_path)
    with pytest.raises(ValueError, match=r"noise.sigma=0.25 \(was -0.5\)"):
        check_run_folder(cfg, tmp_path)


def test_a_refused_command_leaves_no_trace_and_the_same_folder_then_runs(tmp_path, monkeypatch, capsys):
    import logging
    import sys

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from ssmooth.cli import train as train_cli

    run_dir = tmp_path / "D"

    def command(*overrides: str) -> int:
        tiny = [o for o in TINY[1:] if not o.startswith(("noise.", "selector.", "pipeline."))]
        monkeypatch.setattr(sys, "argv", ["ssmooth-train", "~experiment", *tiny, "certify.enabled=false",
                                          f"hydra.run.dir={run_dir}", *overrides])
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level  # the app configures logging for its job
        GlobalHydra.instance().clear()
        try:
            train_cli.main()
        except SystemExit as exit_:
            return exit_.code
        finally:
            GlobalHydra.instance().clear()
            HydraConfig.instance().cfg = None  # later tests call the stages from Python, outside any app
            for handler in root.handlers[:]:
                if handler not in handlers:
                    root.removeHandler(handler)
                    handler.close()
            root.handlers[:], root.level = handlers, level
        return 0

    assert command("noise.sigma=-0.5") == 2
    assert capsys.readouterr().err.strip() == "error: noise.sigma=-0.5 must be > 0"
    assert not run_dir.exists()
    assert command("noise.sigma=0.5") == 0
    # Training ends by naming its checkpoint, in one line.
    assert f"trained model: {run_dir / 'checkpoints' / 'last.ckpt'}" in (run_dir / "train.log").read_text()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "train.log").is_file()
    record = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "noise.sigma=0.5" in record and (run_dir / ".hydra" / "config.yaml").is_file()
    # A re-run with other settings is refused without touching the record of the run there.
    assert command("noise.sigma=0.75") == 2
    assert "already holds a run with other settings: noise.sigma=0.75 (was 0.5)" in capsys.readouterr().err
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == record


def test_the_selector_stage_reuses_the_constant_rows_of_the_samplewise_stage(tmp_path):
    result = run_pipeline(tiny_settings(tmp_path, "pipeline.constant_arm=false", "pipeline.experts=false"))
    source, selector = tmp_path / "finetune_samplewise", tmp_path / "selector"
    # Copied, not certified again: the same bytes, time column included.
    assert (selector / "certify_constant.tsv").read_bytes() == (source / "certify_constant.tsv").read_bytes()
    inductive = result.summaries["selector"]
    assert inductive["variants"]["constant"]["acr"] == result.samplewise["variants"]["constant"]["acr"]
    assert len(pd.read_csv(selector / "certify.tsv", sep="\t")) == 2
    # Another classifier's rows are never taken: other weights, so nothing is copied.
    datamodule = build_datamodule({"name": "digits"}, 0)
    datamodule.setup("fit")
    meta, state = load_checkpoint(selector / "checkpoints" / "last.ckpt")
    classifier = build_model(meta["model"], datamodule.info)
    classifier.load_state_dict(model_state(state))
    cert_cfg = dataclasses.replace(certify_config(tiny_settings(tmp_path).certify), policy="inductive",
                                   best_constant=False)
    how = dict(base_sigma=0.25, dataset="digits", checkpoint_sha256="x",
               selector=load_selector(meta, state, datamodule.info))
    points = points_of(datamodule, cert_cfg)
    assert reuse_constant_rows(source, tmp_path / "same", classifier, points, cert_cfg, **how)
    with torch.no_grad():
        next(classifier.parameters()).add_(1e-3)
    assert not reuse_constant_rows(source, tmp_path / "other", classifier, points, cert_cfg, **how)
    assert not (tmp_path / "other").exists()


def test_the_pipeline_certifies_the_experts_routed_cascade_and_best_level(tmp_path):
    cfg = tiny_settings(tmp_path, "noise.grid_factors=[0.5,1.0,2.0]", "selector.target_samples=4")
    result = run_pipeline(cfg)
    summary = result.summaries["experts_certify"]
    assert summary["kinds"] == ["constant_best", "routed", "routed_set", "cascade"] and summary["main"] == "routed"
    variants = summary["variants"]
    assert variants["constant_best"]["experts"] and variants["cascade"]["experts"]
    assert all(variants[k]["sound"] and variants[k]["setting"] == "any input" for k in variants)
    meta, _ = load_checkpoint(tmp_path / "selector" / "checkpoints" / "last.ckpt")
    assert meta["selector"]["targets"] == "radius" and meta["selector"]["target_stats"]["images"] == 8
    # The routed rows use the selector's levels and each expert at its own level.
    rows = read_rows(tmp_path / "experts_certify" / "certify.tsv")
    assert set(rows["sigma"]) <= {0.0, 0.125, 0.25, 0.5} and len(rows) == 2
    # The level-set certificate of the same routing, on the same points, with at least one level certified each.
    level_set = read_rows(tmp_path / "experts_certify" / "certify_routed_set.tsv")
    assert list(level_set["idx"]) == list(rows["idx"]) and (level_set["certified_levels"] >= 1).all()


def test_the_readme_example_runs_the_pipeline_from_python(tmp_path, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## The pipeline from Python", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    tiny = ", ".join(f'"{o}"' for o in TINY[1:] + ["selector.enabled=false", "noise.grid_factors=[1.0,2.0]"])
    example = '"output_dir=outputs/from_python"'
    assert example in code
    exec(code.replace(example, f'"output_dir={tmp_path}", {tiny}'), {})
    assert "sample-wise ACR" in capsys.readouterr().out
    assert (tmp_path / "report.md").is_file() and (tmp_path / "experts.json").is_file()


def test_certify_kinds_go_to_the_stages_whose_model_can_certify_them(tmp_path):
    cfg = tiny_settings(tmp_path / "run", "certify.kinds=[constant,samplewise,inductive_set]")
    assert stage_kinds(cfg, "pretrain") == {"certify.kinds": ["constant"]}
    assert stage_kinds(cfg, "finetune_samplewise") == {"certify.kinds": ["constant", "samplewise"]}
    assert stage_kinds(cfg, "selector") == {"certify.kinds": ["constant", "inductive_set"]}
    assert stage_kinds(tiny_settings(tmp_path / "run"), "selector") == {}  # none asked for: each stage's default
    # a kind that no stage certifies is refused before anything is trained or written
    refused = tiny_settings(tmp_path / "refused", "certify.kinds=[constant,routed]", "pipeline.experts=false")
    with pytest.raises(ConfigError, match="no stage of this pipeline certifies 'routed'"):
        run_pipeline(refused)
    assert not (tmp_path / "refused").exists()
