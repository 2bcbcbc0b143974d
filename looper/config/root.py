"""The root schema (`Config`), the data, logging and path sections, and the generated reference (docs/config.md)."""

import difflib
import json
import math
from dataclasses import MISSING, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union, get_args, get_origin

from hydra.core.config_store import ConfigStore

from looper.config.evaluation import EvalConfig, ExportConfig, GenerationSettings
from looper.config.fields import _check, _choice, _positive, doc
from looper.config.grpo import GRPOSettings
from looper.config.model import ArmConfig, LoraSettings, ModelConfig, RewardConfig
from looper.config.stages import (
    DPOConfig,
    PreferencesConfig,
    RolloutConfig,
    SFTConfig,
    StageConfig,
)


@dataclass
class DataConfig:
    name: str = doc("`synthetic` (generated here, offline) or `gsm8k`.", "synthetic")
    synthetic_train: int = doc("Synthetic training problems.", 2000)
    synthetic_dev: int = doc("Synthetic dev problems.", 200)
    synthetic_test: int = doc("Synthetic test problems.", 200)
    synthetic_seed: int = doc("Seed of the synthetic generator.", 1234)
    max_steps: int = doc("Synthetic problems take 1..max_steps arithmetic steps.", 3)
    max_number: int = doc("Largest operand in synthetic problems.", 10)
    path: Optional[str] = doc(
        "GSM8K: a directory with train.jsonl and test.jsonl (null: the hub's openai/gsm8k).", None
    )
    dev_fraction: float = doc("GSM8K: share of train held out as the dev split.", 0.2)
    split_seed: int = doc("GSM8K: seed of the train/dev split.", 0)
    allow_overlap: bool = doc(
        "GSM8K: accept questions that appear both in the training file and in a test set (test.jsonl, "
        "GSM8K-Platinum); by default the run refuses them, naming how many and the first ones.",
        False,
        identity=False,
    )

    def __post_init__(self):
        _choice(self.name, "data.name", ("synthetic", "gsm8k"))
        for name in ("synthetic_train", "synthetic_dev", "synthetic_test", "max_steps"):
            _positive(getattr(self, name), f"data.{name}")
        _check(self.max_number >= 2, "data.max_number", "must be >= 2")
        _check(0 < self.dev_fraction < 1, "data.dev_fraction", f"must be in (0, 1), got {self.dev_fraction}")


@dataclass
class LoggerConfig:
    name: str = doc("`wandb` or `none`.", "wandb")
    project: str = doc("W&B project.", "looper")
    entity: Optional[str] = doc("W&B entity (team or user; null: your default).", None)
    mode: str = doc("online, offline or disabled; `auto` is online when an API key is set up, else offline.", "auto")
    group: Optional[str] = doc(
        "W&B group (null: the experiment and the sweep's date and time in multirun, else the experiment and the day).",
        None,
    )
    quiet: bool = doc(
        "W&B's own console output off (banners, and its warnings, which go to its debug log in the run's wandb/ "
        "directory); looper logs one line per run naming where it logs.",
        True,
    )
    upload_limit_mb: float = doc(
        "Files of a stage artifact up to this size are uploaded into its W&B artifact; larger ones (model weights, "
        "big record files) are referenced by their path, not copied.",
        16.0,
    )

    def __post_init__(self):
        _choice(self.name, "logger.name", ("wandb", "none"))
        _choice(self.mode, "logger.mode", ("auto", "online", "offline", "disabled"))
        _check(self.upload_limit_mb >= 0, "logger.upload_limit_mb", f"must be >= 0, got {self.upload_limit_mb}")


@dataclass
class PathsConfig:
    artifacts: str = doc(
        "Where stage artifacts are cached, shared by runs and sweeps.", "outputs/artifacts", identity=False
    )
    verify: str = doc(
        "What reusing a cached artifact checks against its manifest: `quick` (every file's size and "
        "JSONL line count, the hashes of files up to 256 MiB) or `full` (every hash).",
        "quick",
        identity=False,
    )

    def __post_init__(self):
        _choice(self.verify, "paths.verify", ("quick", "full"))


@dataclass
class Config:
    experiment: str = doc("Name of this setup (in W&B group names and run directories).", "default")
    seed: int = doc("Seed of everything random: training order, sampling, LoRA init.", 0)
    model: ModelConfig = doc("The model and its prompt format (conf/model/).", factory=ModelConfig)
    lora: LoraSettings = doc("Adapter and quantization settings (conf/lora/).", factory=LoraSettings)
    arms: Dict[str, ArmConfig] = doc("The arm-set: reasoning paths rollouts sample from (conf/arms/).", factory=dict)
    reward: RewardConfig = doc("Reward and coherence weights (conf/reward/).", factory=RewardConfig)
    stage: StageConfig = doc("What runs (conf/stage/).", factory=StageConfig)
    sft: SFTConfig = doc("Supervised fine-tuning.", factory=SFTConfig)
    rollout: RolloutConfig = doc("Trajectory sampling.", factory=RolloutConfig)
    preferences: PreferencesConfig = doc("Pair construction.", factory=PreferencesConfig)
    dpo: DPOConfig = doc("Direct preference optimisation.", factory=DPOConfig)
    grpo: GRPOSettings = doc("Online RL (GRPO) from the SFT policy: `stage=grpo`.", factory=GRPOSettings)
    eval: EvalConfig = doc("Evaluation.", factory=EvalConfig)
    export: ExportConfig = doc("The standalone model `stage=export` writes.", factory=ExportConfig)
    generation: GenerationSettings = doc(
        "The shared decoding path of rollouts and evaluation.", factory=GenerationSettings
    )
    data: DataConfig = doc("Training and evaluation problems (conf/data/).", factory=DataConfig)
    logger: LoggerConfig = doc("Experiment tracking (conf/logger/).", factory=LoggerConfig)
    paths: PathsConfig = doc("Where things go.", factory=PathsConfig)

    def __post_init__(self):
        _check(len(self.arms) > 0, "arms", "the arm-set is empty; choose arms=regime_w or arms=single")
        for name, arm in self.arms.items():
            arm.check(name)
        if self.rollout.allocation == "thompson":
            budget = self.rollout.budget or sum(arm.samples for arm in self.arms.values())
            _check(
                budget >= self.rollout.floor * len(self.arms) + self.rollout.rounds - 1,
                "rollout.budget",
                f"{budget} samples a question cannot give {len(self.arms)} arms their floor of {self.rollout.floor} "
                f"and one sample to each of the {self.rollout.rounds - 1} bandit rounds; raise it or lower "
                "rollout.floor / rollout.rounds",
            )
        _check(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32) (the generators' range), got {self.seed}")
        for key, value in _numbers(self):
            _check(math.isfinite(value), key, f"must be a finite number, got {value}")
        _check(
            self.data.path is None or self.data.name == "gsm8k",
            "data.path",
            f"is set ({self.data.path}) but data={self.data.name} does not read files; use data=gsm8k",
        )


def _numbers(node: Any, prefix: str = ""):
    """(dotted key, value) of every float in a config tree."""
    items = (
        ((f.name, getattr(node, f.name)) for f in fields(node))
        if is_dataclass(node)
        else node.items()
        if isinstance(node, dict)
        else ()
    )
    for name, value in items:
        key = f"{prefix}{name}"
        if isinstance(value, float):
            yield key, value
        elif is_dataclass(value) or isinstance(value, dict):
            yield from _numbers(value, key + ".")


def _inner(kind: Any) -> Any:
    """X of Optional[X]."""
    if get_origin(kind) is Union:
        return next(arg for arg in get_args(kind) if arg is not type(None))
    return kind


# the config groups a command line chooses from (`model=abel_7b`): Hydra checks those choices
GROUPS = ("model", "lora", "arms", "reward", "stage", "data", "logger", "experiment", "debug", "hparams_search")


def unknown_keys(node: Any, schema: Any = Config, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(dotted key, the schema's keys at that level) for every key of a composed config that the schema does not
    declare. Hydra's `+key=value` adds a key that no schema field reads; it would be stored, enter nothing and do
    nothing. The open places are the `Dict[str, Any]` fields (the scorer's own keys, the trainers' pass-through)."""
    declared = {f.name: _inner(f.type) for f in fields(schema)}
    found = []
    for key in node.keys() if hasattr(node, "keys") else ():
        dotted = f"{prefix}{key}"
        if key not in declared:
            found.append((dotted, list(declared)))
            continue
        kind, value = declared[key], node[key]
        if is_dataclass(kind) and hasattr(value, "keys"):
            found += unknown_keys(value, kind, dotted + ".")
        elif get_origin(kind) is dict and is_dataclass(get_args(kind)[1]) and hasattr(value, "keys"):
            for name in value.keys():  # arms.<name>: each a schema of its own
                found += unknown_keys(value[name], get_args(kind)[1], f"{dotted}.{name}.")
    return found


def _unknown_message(found: list[tuple[str, list[str]]]) -> str:
    lines = []
    for key, known in found:
        parent, _, name = key.rpartition(".")
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
        lines.append(f"{key}: not a config key{hint}")
    return (
        "; ".join(lines)
        + ". `+key=value` adds only what the schema declares (`python -m looper.config` lists it); the "
        "open places are "
        "sft.trainer, dpo.trainer and grpo.trainer (TRL's arguments) and reward.scorer (the scorer's own keys)"
    )


def check_known(raw: Any) -> None:
    """Fail naming every key the schema does not know (with the closest known key), before anything runs."""
    found = unknown_keys(raw)
    if found:
        raise ValueError(_unknown_message(found))


def unknown_overrides(args: list[str]) -> Optional[str]:
    """The message for command-line overrides (`key=value`, `+key=value`, `++key=value`) whose key the schema does not
    declare, naming the closest known key; None when all are known. Group choices (`model=...`, `hydra/...`) and
    Hydra's own keys are Hydra's to check. Lets `looper` refuse a typo before Hydra composes."""
    if {"-sc", "--shell-completion"} & set(args):  # (installing or answering tab completion: Hydra's)
        return None
    tree: dict = {}
    takes_value = {"-c", "--cfg", "-p", "--package", "-i", "--info", "-cp", "--config-path", "-cn", "--config-name"}
    takes_value |= {"-cd", "--config-dir", "--experimental-rerun"}
    for previous, arg in zip([None, *args], args):
        if arg.startswith("-") or "=" not in arg or previous in takes_value:
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if "/" in key or key.startswith("hydra.") or key == "hydra" or ("." not in key and key in GROUPS):
            continue
        node = tree
        for part in key.split("."):
            node = node.setdefault(part, {})
    found = unknown_keys(tree)
    return _unknown_message(found) if found else None


def load(raw: Any) -> "Config":
    """The typed, checked Config of a composed config: unknown keys first, then every schema's value checks."""
    from omegaconf import OmegaConf

    check_known(raw)
    return OmegaConf.to_object(raw)


def conf_dir() -> Path:
    """The directory of the Hydra config groups: `conf/` at the repository's top level in a checkout, `looper/conf/`
    in an installed wheel (pyproject.toml maps it there)."""
    package = Path(__file__).resolve().parents[1]
    return package / "conf" if (package / "conf").is_dir() else package.parent / "conf"


def register_configs() -> None:
    """Register the schema so that `conf/config.yaml` can extend it (`defaults: [schema, ...]`)."""
    ConfigStore.instance().store(name="schema", node=Config)


def iter_docs(node: Any = Config, prefix: str = ""):
    """(dotted key, help, default) for every field of the schema, recursing into nested schemas (arms as
    `arms.<arm>.`); a section's default is None."""
    for item in fields(node):
        key = f"{prefix}{item.name}"
        inner = item.type
        if get_origin(inner) is Union:  # Optional[X]
            inner = next(arg for arg in get_args(inner) if arg is not type(None))
        nested = get_origin(inner) is dict and is_dataclass(get_args(inner)[1])
        section = is_dataclass(inner) or nested
        default = item.default if item.default is not MISSING else item.default_factory()
        yield key, item.metadata.get("help"), None if section else _shown(default)
        if nested:
            inner, key = get_args(inner)[1], f"{key}.<name>"
        if is_dataclass(inner):
            yield from iter_docs(inner, key + ".")


def _shown(value: Any) -> str:
    """A default as the command line would write it (JSON-like; long text cut)."""
    text = "null" if value is None else json.dumps(value) if not isinstance(value, str) else value
    text = text.replace("\n", "\\n").replace("|", "\\|")
    return text if len(text) <= 40 else text[:37] + "..."


def reference_markdown() -> str:
    """The config reference (docs/config.md): every key with its one-line doc and schema default."""
    rows = ["| key | default | what it does |", "| --- | --- | --- |"]
    rows += [
        f"| `{key}` | {f'`{default}`' if default not in (None, '') else ''} | {help} |"
        for key, help, default in iter_docs()
    ]
    return (
        "# Config reference\n\nGenerated from the schemas in `looper/config/` by "
        "`python -m looper.config > docs/config.md`; the defaults are the schema's, and the group files under `conf/` "
        "set the values of each option where they differ (`looper <overrides> --cfg job` prints what a run gets).\n\n"
        + "\n".join(rows)
        + "\n"
    )
