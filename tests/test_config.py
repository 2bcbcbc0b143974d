"""The config tree: every option composes, the schema rejects typos and bad values by name, every key is documented."""

import dataclasses
import os
import subprocess
import sys

import pytest

from looper.config import iter_docs
from tests.conftest import CONF, ROOT, compose

GROUPS = ["model", "lora", "arms", "reward", "stage", "data", "logger", "experiment"]


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_group_option_composes(group, option):
    cfg = compose(f"{group}={option}")
    if group == "model":
        assert cfg.model.name == option
    if group == "stage":
        assert cfg.stage.name == option


def test_the_public_option_names_exist():
    expected = {
        "model": {"tiny", "abel_7b", "deepseek_r1_distill_llama_8b"},
        "lora": {"r64", "qlora_4bit", "qlora_8bit", "none"},
        "arms": {"regime_w", "single"},
        "reward": {"default"},
        "stage": {"sft", "rollout", "preferences", "dpo", "eval", "pipeline"},
        "data": {"synthetic", "gsm8k"},
        "logger": {"wandb", "none"},
        "experiment": {"tiny_demo", "abel_platinum", "deepseek_qlora"},
    }
    for group, names in expected.items():
        assert names <= {p.stem for p in (CONF / group).glob("*.yaml")}, group


def test_default_is_the_offline_tiny_pipeline():
    cfg = compose()
    assert (cfg.model.name, cfg.data.name, cfg.stage.name, cfg.logger.name) == (
        "tiny",
        "synthetic",
        "pipeline",
        "wandb",
    )
    assert cfg.model.name_or_path is None and cfg.paths.artifacts == "outputs/artifacts"


def test_every_stage_setting_is_present_whatever_the_stage():
    cfg = compose("stage=sft")
    assert cfg.dpo.beta > 0 and cfg.eval.targets and cfg.rollout.batch_size > 0
    assert compose("stage=dpo", "dpo.beta=0.2").dpo == compose("stage=pipeline", "dpo.beta=0.2").dpo


def test_the_documented_command_composes():
    cfg = compose("stage=dpo", "reward.beta=0.5")
    assert cfg.stage.name == "dpo" and cfg.reward.beta == 0.5


def test_each_lora_option_quantizes_as_its_name_says_and_otherwise_equals_r64():
    r64 = compose("lora=r64").lora
    for option, quantization in (("qlora_4bit", "4bit"), ("qlora_8bit", "8bit")):
        assert compose(f"lora={option}").lora == dataclasses.replace(r64, quantization=quantization), option
    assert compose("lora=none").lora.enabled is False


def test_the_presets_global_batches_train_alike_on_one_gpu_and_on_the_plans_two(monkeypatch):
    from looper import distributed, training

    for experiment in ("abel_platinum", "deepseek_qlora", "deepseek_qlora_looper"):
        cfg = compose(f"experiment={experiment}")
        for name in ("sft", "dpo"):
            section = getattr(cfg, name)
            if section.global_batch_size is None:
                continue
            batches = set()
            for world in (1, 2):
                monkeypatch.setattr(distributed, "world_size", lambda world=world: world)
                batches.add(training.effective_batch(section, name)[f"{name}/effective_batch_size"])
            assert batches == {section.global_batch_size}, (experiment, name)


def test_every_key_the_looper_variant_changes_from_the_deepseek_plan_is_documented():
    from looper.artifacts import to_plain

    def flat(node, prefix=""):
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    plan, ours = (
        flat(to_plain(compose("experiment=deepseek_qlora"))),
        flat(to_plain(compose("experiment=deepseek_qlora_looper"))),
    )
    changed = sorted(k for k in plan.keys() | ours.keys() if plan.get(k) != ours.get(k) and k != "experiment")
    departures = (ROOT / "docs" / "presets.md").read_text()
    assert changed and not [k for k in changed if f"`{k}" not in departures and f"{k}=" not in departures], changed


def test_an_unknown_key_fails_naming_it():
    with pytest.raises(Exception, match="alpah"):
        compose("reward.alpah=1")


def test_a_wrong_type_fails_naming_the_key():
    with pytest.raises(Exception, match="batch_size"):
        compose("rollout.batch_size=many")


@pytest.mark.parametrize(
    "override,key",
    [
        ("rollout.batch_size=0", "rollout.batch_size"),
        ("eval.scorers=[strict,bogus]", "eval.scorers"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("arms.plain.family=poetic", "arms.plain.family"),
        ("sft.eval_examples=-1", "sft.eval_examples"),
        ("sft.eval_steps=0", "sft.eval_steps"),
    ],
)
def test_a_bad_value_fails_naming_the_key_and_what_is_allowed(override, key):
    with pytest.raises(Exception, match=key):
        compose(override)


def test_every_schema_field_has_a_one_line_doc():
    undocumented = [key for key, help, _ in iter_docs() if not help or "\n" in help]
    assert undocumented == []


def _restated_defaults(values: dict, schema, where: str) -> list[str]:
    """The keys of `values` (a group file's) that equal `schema`'s defaults: a second source for one value."""
    from dataclasses import MISSING, asdict, fields, is_dataclass

    restated = []
    for item in fields(schema):
        if item.name not in values or item.name == "name":  # (an option's `name` says which option it is)
            continue
        default = item.default if item.default is not MISSING else item.default_factory()
        default = asdict(default) if is_dataclass(default) else default
        if values[item.name] == default:
            restated.append(f"{where}{item.name}")
    return restated


def test_group_files_set_only_what_differs_from_the_schema():
    import yaml

    from looper import config

    schemas = {
        "model": config.ModelConfig,
        "lora": config.LoraSettings,
        "reward": config.RewardConfig,
        "data": config.DataConfig,
        "logger": config.LoggerConfig,
        "stage": config.StageConfig,
    }
    restated = []
    for group, schema in schemas.items():
        for path in sorted((CONF / group).glob("*.yaml")):
            restated += _restated_defaults(yaml.safe_load(path.read_text()) or {}, schema, f"{group}/{path.stem}: ")
    for path in sorted((CONF / "arms").glob("*.yaml")):
        for arm, values in yaml.safe_load(path.read_text()).items():
            restated += _restated_defaults(values, config.ArmConfig, f"arms/{path.stem}: {arm}.")
    assert restated == []  # each value has one source: the schema, or the option that changes it
    # (experiment presets may pin the study's values: a schema default that changes must not move a named setup)


def test_a_stray_key_in_a_group_file_fails_at_start_naming_it(tmp_path):
    import shutil

    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    conf = shutil.copytree(CONF, tmp_path / "conf")
    with open(conf / "data" / "synthetic.yaml", "a") as handle:
        handle.write("synthetic_trian: 500\n")
    with (
        initialize_config_dir(config_dir=str(conf), version_base="1.3"),
        pytest.raises(Exception, match="synthetic_trian"),
    ):
        hydra_compose(config_name="config")


@pytest.mark.slow
@pytest.mark.parametrize("override", ["reward.alpah=1", "+reward.alpah=1", "rollout.batch_size=0"])
def test_cli_refuses_a_mistake_in_one_line_naming_the_key_without_a_traceback(override, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "looper", override, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    key = "rollout.batch_size" if "batch_size" in override else "did you mean reward.alpha?"
    assert lines[0].startswith("looper: ") and key in lines[0]


def test_a_key_typo_on_the_command_line_is_named_before_hydra_composes():
    from looper.config import unknown_overrides

    assert "did you mean sft.weight_decay" in unknown_overrides(["-m", "sft.weight_decayy=0.1,0.2"])
    assert "arms.plain.temprature" in unknown_overrides(["++arms.plain.temprature=1"])
    known = ["model=abel_7b", "hydra/launcher=slurm", "hydra.run.dir=x", "+sft.trainer.neftune_noise_alpha=5", "seed=1"]
    assert unknown_overrides([*known, "reward.scorer.unit=30", "arms.plain.temperature=1"]) is None
    assert unknown_overrides(["-sc", "install=bash"]) is None  # (Hydra's own arguments pass)
    assert unknown_overrides(["--cfg", "job", "-p", "reward", "--info", "defaults"]) is None


def test_the_wheel_ships_every_config_group_directory():
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    groups = {"looper." + ".".join(p.relative_to(ROOT).parts) for p in CONF.rglob("*") if p.is_dir()}
    groups = {g for g in groups if "__pycache__" not in g}
    assert groups | {"looper.conf"} <= packages, sorted(groups - packages)


def test_the_config_reference_is_current():
    from looper.config import reference_markdown

    assert (ROOT / "docs" / "config.md").read_text() == reference_markdown(), (
        "run: python -m looper.config > docs/config.md"
    )


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp.yaml"])
def test_the_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "scripts" / "accelerate" / name))
    assert config.num_processes == 2 and config.mixed_precision == "bf16"


def test_the_reasoning_presets_train_on_what_they_generate():
    for experiment in ("deepseek_qlora", "deepseek_qlora_looper"):
        cfg = compose(f"experiment={experiment}")
        assert cfg.model.reasoning == "think"
        assert cfg.dpo.max_length >= cfg.model.max_new_tokens, experiment  # a whole trajectory fits a DPO example


def test_both_7b_presets_report_platinum_with_the_benchmarks_prompt_and_greedy_decoding():
    for experiment in ("abel_platinum", "deepseek_qlora", "deepseek_qlora_looper"):
        cfg = compose(f"experiment={experiment}")
        assert (cfg.eval.prompt, cfg.eval.temperature, cfg.eval.samples) == ("platinum", 0.0, 1), experiment


def test_a_think_model_must_close_its_think_block_in_the_completion():
    with pytest.raises(Exception, match="model.completion_template"):
        compose("model.reasoning=think")  # the tiny model's template is `{solution}`: no </think>


def test_selecting_on_a_test_set_needs_an_explicit_key():
    with pytest.raises(Exception, match="eval.select_on.*test set"):
        compose("eval.select_on=gsm8k_platinum")
    assert compose("eval.select_on=gsm8k_platinum", "eval.select_on_test=true").eval.select_on == "gsm8k_platinum"


def test_several_greedy_samples_are_refused_by_name():
    with pytest.raises(Exception, match="eval.samples"):
        compose("eval.samples=4")
    assert compose("eval.samples=4", "eval.temperature=0.5").eval.samples == 4


def test_the_dpo_reference_check_takes_error_or_warn():
    with pytest.raises(Exception, match="dpo.reference_check"):
        compose("dpo.reference_check=maybe")


def test_the_8bit_preset_loads_the_base_in_8bit_and_the_4bit_one_in_nf4():
    import torch

    from looper import models

    eight = models.quantization_config(compose("lora=qlora_8bit").lora, torch.bfloat16)
    four = models.quantization_config(compose("lora=qlora_4bit").lora, torch.bfloat16)
    assert (eight.load_in_8bit, eight.load_in_4bit) == (True, False)
    assert (four.load_in_4bit, four.bnb_4bit_quant_type) == (True, "nf4")
    assert models.quantization_config(compose("lora=r64").lora, torch.bfloat16) is None


def test_a_run_turns_off_the_libraries_progress_bars_for_trivial_work(monkeypatch):
    import datasets
    import transformers.utils.logging

    from looper.__main__ import quiet_libraries

    monkeypatch.setattr(transformers.utils.logging, "_tqdm_active", True)
    datasets.enable_progress_bars()
    quiet_libraries()
    assert not transformers.utils.logging.is_progress_bar_enabled() and not datasets.is_progress_bar_enabled()
    datasets.enable_progress_bars()


def test_the_help_page_is_hydras_own_without_its_wait():
    from looper.__main__ import app_help

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    hydras = subprocess.run(  # Hydra's --help, through the decorated main (cli() answers it itself)
        [sys.executable, "-c", "import sys; from looper import __main__ as m; sys.argv[1:] = ['--help']; m.main()"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert hydras.returncode == 0, hydras.stderr[-2000:]
    page = app_help()
    assert "== Config groups (group=option) ==\narms: " in page and "stage: dpo, eval, export," in page
    assert hydras.stdout == page + "\n"
