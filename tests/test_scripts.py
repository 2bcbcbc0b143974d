"""The GPU tools run end to end on the CPU (tiny shapes): the benchmark and the greedy check of a trained model."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import FAST, ROOT

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}


def _bench(tmp_path, *args) -> dict:
    """The report of `scripts/bench_gpu.py --arch tiny --quick *args`."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "scripts/bench_gpu.py", "--arch", "tiny", "--quick", *args, "--out", str(out)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_the_benchmark_reports_real_tokens_and_the_greedy_check(tmp_path):
    report = _bench(
        tmp_path,
        "--sections",
        "prefill,step,rollout,eval",
        "--rollout-arms",
        "8",
        "--baseline",
        "--check-greedy",
        "--eval-shots",
        "2",
    )
    assert report["prefill"]["tokens"] > 0 and report["prefill"]["prompts"] == 16
    step = report["step"]  # one decode step of the rollout batch
    assert step["slots"] == 256 and step["ms"] > 0 and 150 < step["mean_context"] < 300
    rollout = report["rollout"]["looper"]
    assert rollout["real_tokens"] > 0 and rollout["sequences"] == 256
    assert rollout["rank0_stats"]["decode_steps"] > 0 and report["rollout"]["plain_generate"]["tokens_per_s"] > 0
    # prompts in the 8 arms' templates share their prefixes
    assert rollout["arms"] == 8 and rollout["rank0_stats"]["prefix_shared_tokens"] > 0
    assert report["eval"]["greedy_check"]["float32"]["looper_equal_plain"] == "8/8"
    # two solved examples before every eval question: their tokens are computed once per prefill
    evaluation = report["eval"]["looper"]
    assert evaluation["shots"] == 2 and evaluation["rank0_stats"]["prefix_shared_tokens"] > 0


@pytest.mark.slow
def test_the_benchmark_rolls_out_the_issue_setting_with_shared_prompts(tmp_path):
    report = _bench(tmp_path, "--sections", "sampling,rollout", "--issue-setting", "--rollout-samples", "8")
    assert report["sampling"]["torch_ms"] > 0 and report["sampling"]["vocab"] == 1000
    rollout = report["rollout"]["looper"]
    assert rollout["issue_setting"] and rollout["samples_per_prompt"] == 8
    stats = rollout["rank0_stats"]
    assert stats["prefill_tokens"] == 32 * 128 and stats["prefill_shared"] == 256 - 32  # 32 prompts of 128, 8 each


@pytest.mark.slow
def test_the_greedy_check_compares_a_trained_model_with_plain_generate(artifacts, tiny_sft):
    result = subprocess.run(
        [sys.executable, "scripts/greedy_check.py", f"paths.artifacts={artifacts}", *FAST],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("looper (sdpa) 24/24") == 2, result.stdout


@pytest.mark.slow
@pytest.mark.data
def test_the_reasoning_probe_builds_an_r1_style_model_the_deepseek_preset_accepts(tmp_path):
    from looper import models, prompts
    from tests.conftest import compose, shared_file

    data = shared_file("gsm8k", "train.jsonl").parent
    result = subprocess.run(
        [
            sys.executable,
            "scripts/reasoning_probe.py",
            str(tmp_path / "r1"),
            "--data",
            str(data),
            "--arch",
            "tiny",
            "--vocab",
            "600",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = compose("experiment=deepseek_qlora", "lora=r64", f"model.name_or_path={tmp_path / 'r1'}")
    tokenizer = models.load_tokenizer(str(tmp_path / "r1"), cfg.model)
    prompt = prompts.build_prompt(cfg.model, tokenizer, "How many?")
    ids = prompts.encode_prompt(tokenizer, prompt)
    assert prompt.endswith("<｜Assistant｜><think>\n")
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_every_path_the_docs_name_exists():
    """README's layout map and the paths README, CONTRIBUTING and docs/ name (in backticks or as links) exist."""
    import re

    missing = []
    for doc in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        top = "|".join(p.name for p in ROOT.iterdir() if not p.name.startswith("."))
        named = set(re.findall(rf"`((?:{top})(?:/[\w.-]*)*)`", text))  # repository paths in backticks
        named |= {link for link in re.findall(r"\]\(([^)#]+)", text) if not link.startswith("http")}
        for block in re.findall(r"```\n(.*?)```", text, re.S):  # a layout map: every file and folder it lists
            if "looper/" in block:
                named |= set(re.findall(r"(?<![\w./<-])([\w-]+(?:\.py|\.md|\.sh|/))(?=[\s,]|$)", block, re.M))
        for name in sorted(named):
            if "<" in name or name.startswith("outputs/"):
                continue  # (run outputs and placeholders)
            candidates = [doc.parent / name, ROOT / name]
            if not any(c.exists() for c in candidates) and not list(ROOT.glob(f"**/{name.rstrip('/')}")):
                missing.append(f"{doc.name}: {name}")
    assert missing == []
