"""The pipeline's stages as plain functions over the settings (an OmegaConf DictConfig, e.g. from
``ssmooth.build.compose_settings``): pretrain and finetune (``train_and_certify``), the level selector
(``train_selector``), one expert per level (``load_experts`` reads them back), and the whole method (``run_pipeline``). Each writes into ``cfg.output_dir``, returns what
it made, raises ConfigError for a bad setting before any work, and prints nothing."""
from ssmooth.pipeline.experts import load_experts
from ssmooth.pipeline.run import PipelineResult, run_pipeline, stage_settings
from ssmooth.pipeline.runfolder import RESULT_NEUTRAL_KEYS, check_run_folder, never_started
from ssmooth.pipeline.selector import train_selector
from ssmooth.pipeline.train import STAGES, train_and_certify

__all__ = ["PipelineResult", "RESULT_NEUTRAL_KEYS", "STAGES", "check_run_folder", "load_experts", "never_started", "run_pipeline", "stage_settings",
           "train_and_certify", "train_selector"]
