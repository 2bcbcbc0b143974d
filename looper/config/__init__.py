"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Hydra merges the YAML under `conf/` into these dataclasses, so an unknown key or a wrong type fails at start with the
key's name. Value checks (ranges, known names) live in each class's `__post_init__`, which runs when `__main__`
turns the composed config into objects with `OmegaConf.to_object`. Every field carries a one-line `help`.

Modules: `fields` (documented fields, identities, value checks), `model` (model, adapter, arms, reward), `stages` (the
stage sections and generation), `root` (data, logging, paths, the root `Config`, the generated reference).
"""

from looper.config.fields import EVAL_DATASETS, STAGES, doc, identity
from looper.config.model import ArmConfig, LoraSettings, ModelConfig, RewardConfig, TinyModelConfig
from looper.config.root import (
    Config,
    DataConfig,
    LoggerConfig,
    PathsConfig,
    check_known,
    iter_docs,
    load,
    reference_markdown,
    register_configs,
)
from looper.config.stages import (
    DPOConfig,
    EvalConfig,
    ExportConfig,
    GenerationSettings,
    PreferencesConfig,
    RolloutConfig,
    SFTConfig,
    StageConfig,
)

__all__ = [
    "ArmConfig",
    "Config",
    "DPOConfig",
    "DataConfig",
    "EVAL_DATASETS",
    "EvalConfig",
    "ExportConfig",
    "GenerationSettings",
    "LoggerConfig",
    "LoraSettings",
    "ModelConfig",
    "PathsConfig",
    "PreferencesConfig",
    "RewardConfig",
    "RolloutConfig",
    "SFTConfig",
    "STAGES",
    "StageConfig",
    "TinyModelConfig",
    "doc",
    "identity",
    "check_known",
    "iter_docs",
    "load",
    "reference_markdown",
    "register_configs",
]
