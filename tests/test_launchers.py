"""Sweep launchers: the launcher configs compose, and parallel jobs each claim a GPU of their own."""

import os

from hydra import compose, initialize_config_dir

from looper import distributed
from tests.conftest import CONF


def _hydra(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True).hydra


def test_the_local_gpus_launcher_is_joblib():
    launcher = _hydra("hydra/launcher=local_gpus").launcher
    assert launcher._target_.endswith("JoblibLauncher") and launcher.n_jobs == 4


def test_the_slurm_launcher_asks_for_one_gpu_per_job():
    launcher = _hydra("hydra/launcher=slurm").launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.gpus_per_node == 1


def test_the_optuna_search_maximises_over_the_reward_and_dpo_temperature():
    sweeper = _hydra("hparams_search=coherence_optuna").sweeper
    assert sweeper.direction == "maximize" and set(sweeper.params) == {"reward.alpha", "reward.beta", "dpo.beta"}


def test_jobs_claim_different_gpus_each_seeing_only_its_own(monkeypatch, tmp_path):
    monkeypatch.delenv("LOOPER_PINNED_GPU", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with distributed.claim_gpu(tmp_path) as first:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == first  # the Trainer sees one GPU: no nn.DataParallel
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # another job (process) while the first still runs
        monkeypatch.delenv("LOOPER_PINNED_GPU")
        with distributed.claim_gpu(tmp_path) as second:
            assert {first, second} == {"0", "1"} and os.environ["CUDA_VISIBLE_DEVICES"] == second
    # a process pinned before keeps its GPU (CUDA has started on it), waiting for that GPU's lock only
    with distributed.claim_gpu(tmp_path) as again:
        assert again == second == os.environ["CUDA_VISIBLE_DEVICES"]
    monkeypatch.delenv("LOOPER_PINNED_GPU")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with distributed.claim_gpu(tmp_path) as none:  # one GPU: nothing to choose
        assert none is None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with distributed.claim_gpu(tmp_path) as none:  # accelerate assigns the GPUs of a multi-process launch
        assert none is None and os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
