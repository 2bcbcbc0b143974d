"""Nothing invalid gets past the start: values, counts, limits and every data file are checked before any stage."""

import sys
import time

import pytest

from looper import preflight
from tests.conftest import FAST, compose, looper_cli


@pytest.mark.parametrize(
    "override,message",
    [
        ("reward.alpha=nan", "reward.alpha: must be >= 0, got nan"),
        ("dpo.learning_rate=inf", "dpo.learning_rate: must be at most 1, got inf"),
        ("reward.length_penalty=inf", "reward.length_penalty: must be a finite number, got inf"),
        ("arms.plain.top_p=nan", "arms.plain.top_p: must be in"),
        ("sft.learning_rate=3", "sft.learning_rate: must be at most 1"),
        ("reward.beta=-1", "reward.beta: must be >= 0"),
        ("data.path=/data/gsm8k", "data.path: is set (/data/gsm8k) but data=synthetic does not read files"),
    ],
)
def test_a_bad_value_is_refused_at_start_naming_the_key(override, message):
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        compose(override)


@pytest.mark.parametrize(
    "override,message",
    [
        ("eval.max_new_tokens=10000000", "eval.max_new_tokens: 10000000 tokens exceed the model's context of 1024"),
        ("sft.max_length=4096", "sft.max_length: 4096 tokens exceed the model's context"),
        ("eval.shots=5000", "eval.shots=5000: the examples come from a training split of 300 problems"),
        ("rollout.num_questions=100000", "rollout.num_questions=100000, but the training split has 300 problems"),
        (
            "eval.num_questions=500",
            r"eval.num_questions=500, but the largest dataset evaluated \(synthetic_test, "
            r"synthetic_dev\) has 24 problems",
        ),
    ],
)
def test_counts_and_limits_beyond_the_data_or_the_model_are_refused(fast_cfg, override, message):
    with pytest.raises(ValueError, match=message):
        preflight.check(fast_cfg(override))


@pytest.mark.slow
def test_a_platinum_file_that_cannot_be_read_fails_in_seconds_before_any_stage(tmp_path):
    start = time.time()
    result = looper_cli(
        f"paths.artifacts={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *FAST,
        "eval.datasets=[gsm8k_platinum]",
        f"eval.platinum_path={tmp_path / 'missing.jsonl'}",
    )
    assert result.returncode != 0 and f"{tmp_path / 'missing.jsonl'}: no such file" in result.stderr
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("DONE"))  # nothing was built
    assert time.time() - start < 60


@pytest.mark.slow
def test_logger_none_imports_no_wandb(fast_cfg):
    import subprocess

    # transformers and TRL import W&B merely to ask whether it is installed
    code = (
        "import sys; from tests.conftest import compose, FAST; from looper import tracking; "
        "tracking.keep_wandb_out(compose(*FAST)); from trl import SFTTrainer, DPOTrainer; "
        "print(sys.modules.get('wandb') is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]
