"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Hydra merges the YAML under `conf/` into these dataclasses, so a wrong type fails at start with the key's name;
`load` also refuses keys the schema does not declare (Hydra's `+key=value`). Value checks (ranges, known names) live in
each class's `__post_init__`, which runs when `load` turns the composed config into objects. Every field carries a
one-line `help`.

Modules: `fields` (documented fields, identities, value checks), `model` (model, adapter, arms, reward), `stages` (what
runs, SFT, rollouts, preferences, DPO), `grpo` (online RL), `evaluation` (evaluation, export, generation), `root`
(data, logging, paths, the root `Config`, the generated reference). Config imports no other part of looper: it sits
below everything.
"""

from looper.config.evaluation import EvalConfig, ExportConfig, GenerationSettings
from looper.config.fields import EVAL_DATASETS, STAGES, doc, identity
from looper.config.grpo import GRPOSettings
from looper.config.model import ArmConfig, LoraSettings, ModelConfig, RewardConfig, TinyModelConfig
from looper.config.root import (
    Config,
    DataConfig,
    LoggerConfig,
    PathsConfig,
    check_known,
    conf_dir,
    iter_docs,
    load,
    reference_markdown,
    register_configs,
    unknown_overrides,
)
from looper.config.stages import (
    DPOConfig,
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
    "GRPOSettings",
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
    "conf_dir",
    "iter_docs",
    "load",
    "reference_markdown",
    "register_configs",
    "unknown_overrides",
]
