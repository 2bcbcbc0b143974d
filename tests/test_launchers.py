"""Sweep launchers: the launcher configs compose, and parallel jobs each claim a GPU of their own."""

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


def test_parallel_jobs_claim_different_gpus_and_release_them(monkeypatch, tmp_path):
    import torch

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    with distributed.claim_gpu(tmp_path) as first:
        with distributed.claim_gpu(tmp_path) as second:  # another job while the first still runs
            assert {first, second} == {0, 1}
    with distributed.claim_gpu(tmp_path) as again:
        assert again == 0  # released
    assert chosen == [0, 1, 0]
    with distributed.claim_gpu(tmp_path, enabled=False) as none:
        assert none is None
