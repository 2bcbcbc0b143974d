"""Shared test helpers: compose the real config tree, a fast tiny setup, and one session-wide artifact cache."""

import os
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from looper.config import Config, load, register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = ROOT.parent / "shared" / "data"

# A tiny pipeline that runs in seconds (conf/debug/fast.yaml): it exercises every mechanism, not the demo's
# accuracy. The arm temperature is the `single` arm-set's (tests that pick another arm-set leave it out).
FAST = ["debug=fast", "arms.plain.temperature=0.7"]

register_configs()


def pytest_collection_modifyitems(items):
    """Markers by what a test needs (pyproject.toml): a test that uses the trained tiny model (`tiny_sft`) is `slow`;
    a `gpu` test is skipped without CUDA. `slow` is also set by hand on tests that run the pipeline in a subprocess."""
    import torch

    for item in items:
        if "tiny_sft" in item.fixturenames:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def compose_raw(*overrides: str):
    """The composed (untyped) config for these overrides, as `python -m looper` would see it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def compose(*overrides: str) -> Config:
    """The typed, checked Config for these overrides."""
    return load(compose_raw(*overrides))


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """One artifact cache for the session, so the tiny base and SFT are built once."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def fast_cfg(artifacts):
    """Compose the fast tiny setup over the session cache, with extra overrides."""

    def make(*overrides: str) -> Config:
        return compose(f"paths.artifacts={artifacts}", *FAST, *overrides)

    return make


def shared_file(*parts: str) -> Path:
    """A file of ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not present")
    return path


@pytest.fixture(scope="session")
def tiny_sft(fast_cfg):
    """(cfg, store, base path, full-FT SFT artifact) of the fast tiny setup, built once per session."""
    from looper import pipeline
    from looper.artifacts import ArtifactStore

    cfg = fast_cfg()
    store = ArtifactStore(Path(cfg.paths.artifacts))
    return cfg, store, pipeline.artifact(cfg, store, "base"), pipeline.artifact(cfg, store, "sft")


def looper_cli(*args: str, cwd: Path = ROOT, timeout: int = 600, wandb_silent: bool = True):
    """Run `python -m looper ARGS` in a subprocess, offline; returns the CompletedProcess. `wandb_silent=False` leaves
    W&B's console output to looper (`logger.quiet`)."""
    import subprocess
    import sys

    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    if not wandb_silent:
        del env["WANDB_SILENT"]
    return subprocess.run(
        [sys.executable, "-m", "looper", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def on_two_processes(*command: str, timeout: int = 600):
    """Run `python COMMAND` (a script, or `-m module`, and its arguments) under `accelerate launch --num_processes 2`
    (CPU: gloo); the CompletedProcess. `--multi_gpu` selects accelerate's torchrun launcher; with no GPU the processes
    run on the CPU over gloo (`--cpu` would select its single-process launcher). `--tee 3` prefixes each process's
    lines with `[default<rank>]:`, which `each_rank` untangles."""
    import socket
    import subprocess
    import sys

    with socket.socket() as probe:  # a free port: a launch never collides with another job on the default one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = ["--num_processes", "2", "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--tee", "3"]
    launch += ["--main_process_port", str(port), "--dynamo_backend", "no"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *launch, *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def looper_on_two_processes(*args: str, timeout: int = 600):
    """Run `python -m looper ARGS` on two processes (`on_two_processes`)."""
    return on_two_processes("-m", "looper", *args, timeout=timeout)


def each_rank(result, lines: int = 40) -> str:
    """The last `lines` lines each process of an `on_two_processes` run wrote (stdout and stderr), then the
    launcher's own: a failure message that shows the rank that failed first, not only the one that waited for it."""
    streams: dict[str, list[str]] = {}
    for line in (result.stdout + result.stderr).splitlines():
        prefix, tagged, rest = line.partition("]:")
        who = prefix[1:] if tagged and prefix.startswith("[default") else "launcher"
        streams.setdefault(who, []).append(rest if who != "launcher" else line)
    return "\n".join(
        f"--- {who} (exit code {result.returncode}) ---\n" + "\n".join(text[-lines:])
        for who, text in sorted(streams.items())
    )


def cache_sharing_models(artifacts: Path, cache: Path) -> Path:
    """A fresh artifact cache that shares the session's trained models (base, sft) but nothing downstream."""
    for stage in ("base", "sft"):
        (cache / stage).mkdir(parents=True)
        for item in (artifacts / stage).iterdir():
            if item.is_dir() and (item / "DONE").exists():
                (cache / stage / item.name).symlink_to(item)
    return cache


def kill_when_written(overrides: list[str], watch: str, min_lines: int, root: Path, timeout: float = 300) -> Path:
    """Start `python -m looper OVERRIDES`, SIGKILL it once a file matching the glob `watch` (under `root`) holds
    `min_lines` lines, and return that file. Fails if the run ends or stalls first."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "looper", *overrides],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and process.poll() is None:
            found = list(root.glob(watch))
            if found and sum(1 for _ in open(found[0])) >= min_lines:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"the run finished or stalled before {watch} held {min_lines} lines")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="session")
def fixed_model():
    """(cfg, model, tokenizer): a tiny random Llama (float32, CPU) whose outputs are fixed by construction, for the
    engine's tests. Its logits follow two features of the last hidden state: feature 1 is a constant (every token
    embeds 1.0 there and no layer writes it) that holds EOS's logit far below the rest, so every row runs to its
    limit on any machine; feature 0 (random per token, mixed by attention) scales one random column over the
    vocabulary, so what is sampled depends on the whole context (a wrong KV entry shows) but never on rounding noise
    at a near-tie of trained, flat logits."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from looper.data import synthetic_splits
    from looper.tiny import train_tokenizer

    cfg = compose("debug=fast")
    texts = [f"{p['question']}\n{p['answer']}" for p in synthetic_splits(cfg.data)["train"][:400]]
    tokenizer = train_tokenizer(texts, 400)
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
        model.model.embed_tokens.weight[:, 1] = 1.0
        for layer in model.model.layers:  # attention that picks positions, and writes feature 0 (never feature 1)
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.weight.normal_(0.0, 0.3)
            layer.self_attn.o_proj.weight[0].normal_(0.0, 0.3)
            layer.self_attn.o_proj.weight[1].zero_()
            layer.mlp.down_proj.weight[1].zero_()
        model.model.norm.weight.zero_()
        model.model.norm.weight[:2] = 1.0
        head = model.lm_head.weight
        head.zero_()
        head[:, 0] = torch.randn(head.shape[0], generator=torch.Generator().manual_seed(1)) * 2.0
        head[tokenizer.eos_token_id, 1] = -1000.0
    return cfg, model, tokenizer
