"""First contact: a non-editable install (the wheel, configs inside) gives a `looper` command that runs, explains
itself, and completes on tab."""

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import FAST, ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """looper installed from a copy of the sources with `pip install --no-deps` (not editable) into a directory of
    its own; the environment's dependencies serve it. Returns (bin dir, environment with it first on the path)."""
    where = tmp_path_factory.mktemp("install")
    ignore = shutil.ignore_patterns(
        ".venv", ".git", "outputs", "build", "*.egg-info", "__pycache__", ".whl", ".bnb", "wandb"
    )
    shutil.copytree(ROOT, where / "src", ignore=ignore)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
         str(where / "site"), str(where / "src")],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(where / "site"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return where / "site" / "bin", env


def _run(installed, *args, cwd, **kwargs):
    bin_dir, env = installed
    return subprocess.run(
        [str(bin_dir / "looper"), *args], cwd=cwd, env={**env, **kwargs}, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_the_installed_command_names_the_groups_and_the_reference(installed, tmp_path):
    result = _run(installed, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = ("stage: dpo, eval, export, grpo, pipeline", "debug: fast", "docs/config.md", "looper -sc install=bash")
    for line in expected:
        assert line in result.stdout
    assert "__main__" not in result.stdout
    where = subprocess.run(
        [sys.executable, "-c", "import looper; print(looper.__file__)"],
        cwd=tmp_path,
        env=installed[1],
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(str(installed[0].parent))  # the installed copy, not the sources


@pytest.mark.slow
def test_tab_completion_offers_groups_and_keys(installed, tmp_path):
    stage = _run(installed, "-sc", "query=bash", cwd=tmp_path, COMP_LINE="looper stage=", COMP_POINT="13")
    assert "stage=eval" in stage.stdout.split() and "stage=pipeline" in stage.stdout.split()
    key = _run(installed, "-sc", "query=bash", cwd=tmp_path, COMP_LINE="looper sft.weight", COMP_POINT="17")
    assert key.stdout.split() == ["sft.weight_decay="]


@pytest.mark.slow
def test_the_installed_command_runs_an_evaluation(installed, artifacts, tiny_sft, tmp_path):
    run_dir = tmp_path / "run"
    result = _run(
        installed,
        *FAST,
        "stage=eval",
        "eval.targets=[base]",
        f"paths.artifacts={artifacts}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| synthetic_test | base | 16 |" in result.stdout
    assert (run_dir / "looper.log").exists() and "eval base (tiny) on synthetic_test" in (
        run_dir / "looper.log"
    ).read_text()
