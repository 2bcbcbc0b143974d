"""`python -m looper`: compose the config, check it, and run the selected stage (producing missing upstreams first)."""

import json
import logging
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from looper import distributed, dpo, evaluation, preferences, rollout, sft
from looper.artifacts import ArtifactStore
from looper.config import Config, register_configs
from looper.data import load_splits

log = logging.getLogger("looper")
register_configs()

STAGE_RUNS = {"sft": sft.run, "rollout": rollout.run, "preferences": preferences.run, "dpo": dpo.run}


def run(cfg: Config, run_dir: Path) -> Optional[float]:
    """Run `cfg.stage.name`; returns the primary accuracy of the last target on the first dataset when eval ran."""
    load_splits(cfg.data)  # a bad data line stops the run here, before anything expensive starts
    store = ArtifactStore(Path(cfg.paths.artifacts), run_dir / "artifacts.jsonl")
    stage = cfg.stage.name
    for name in (STAGE_RUNS if stage == "pipeline" else [stage] if stage != "eval" else []):
        STAGE_RUNS[name](cfg, store)
    if stage not in ("pipeline", "eval"):
        return None
    summaries = evaluation.run(cfg, store, run_dir)
    table = (run_dir / "eval_table.md").read_text()
    log.info("accuracy table (greedy, same held-out questions for every target): %s", run_dir / "eval_table.md")
    print(table, flush=True)  # the headline result, on stdout whatever the logging setup
    metrics = {f"{s['dataset']}/{s['target']}/acc_{k[4:]}": v for s in summaries for k, v in s.items()
               if k.startswith("acc_")}
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    (run_dir / "summary.json").write_text(json.dumps({"overrides": overrides, "metrics": metrics}, indent=2))
    primary = [s for s in summaries if s["dataset"] == cfg.eval.datasets[0]][-1]
    return primary[f"acc_{cfg.eval.primary_scorer}"]


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> Optional[float]:
    cfg: Config = OmegaConf.to_object(raw)  # runs every schema's value checks
    distributed.init()
    return run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
