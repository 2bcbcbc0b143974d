"""`python -m looper`: compose the config, check it, and run the selected stage (producing missing upstreams first).

A mistake a person makes (a misspelt key, a bad value, a missing file) is answered by one line naming the key and
what to do, exit status 2, no traceback. Importing this module stays light (the schema and Hydra only: `--help` and
tab completion answer at once); the stages, torch and the trainers are imported when a run starts.
"""

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from looper import config
from looper.config import Config, register_configs

log = logging.getLogger("looper")
register_configs()

# the hyperparameters a sweep report tabulates, whatever was swept
SWEPT = (
    "reward.alpha",
    "reward.beta",
    "reward.length_penalty",
    "reward.w_end",
    "reward.w_path",
    "reward.w_cf",
    "dpo.beta",
    "dpo.learning_rate",
    "dpo.loss_type",
    "preferences.strategy",
    "preferences.margin",
    "seed",
)


def _param(cfg: Config, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def run(cfg: Config, run_dir: Path) -> Optional[float]:
    """Run `cfg.stage.name` and write the run's `summary.json`: what it ran, every artifact it built or reused (with
    its path) and, when eval ran, what it measured and the objective it returns: the primary-scorer accuracy of the
    last of `eval.targets` on a dev split (`evaluation.objective_dataset`; what a sweep ranks by and an Optuna search
    maximises), never a test set unless `eval.select_on` asks for one."""
    from looper import preflight, tracking

    try:
        preflight.check(cfg)  # bad data, counts or limits stop the run here, before anything expensive starts
    except (ValueError, FileNotFoundError) as error:
        refuse(error)
    with tracking.job_run(cfg, run_dir):  # the job's one W&B run: every stage it builds or reuses, eval's results
        return _run(cfg, run_dir)


def _run(cfg: Config, run_dir: Path) -> Optional[float]:
    from looper import credit, distributed, tracking
    from looper.artifacts import ArtifactStore
    from looper.pipeline import Pipeline
    from looper.stages import evaluation

    store = ArtifactStore(Path(cfg.paths.artifacts), run_dir / "artifacts.jsonl", cfg.paths.verify)
    graph = Pipeline(cfg, store)
    results = graph.run(cfg.stage.name, run_dir)
    if "preferences" in graph.resolved and distributed.is_main_process():  # per-arm credit, beside the run's results
        credit_png = Path(graph.resolved["preferences"]) / credit.PNG
        if credit_png.exists():  # (an artifact made before per-arm credit has none)
            shutil.copy(credit_png, run_dir / credit.PNG)
    if not distributed.is_main_process():
        return None
    summary = {
        "stage": cfg.stage.name,
        "experiment": cfg.experiment,
        "model": cfg.model.name,
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
        "params": {key: _param(cfg, key) for key in SWEPT},
        "artifacts": [{"stage": stage, "path": str(path), "status": "reused"} for stage, path in store.reused]
        + [{"stage": path.parent.name, "path": str(path), "status": "built"} for path in store.made],
    }
    wandb_run = tracking.current().run
    if wandb_run is not None:
        summary["wandb"] = {"id": wandb_run.id, "name": wandb_run.name, "group": wandb_run.group}
    objective = None
    if results is not None:
        print((run_dir / "eval_table.md").read_text(), flush=True)  # the headline result, whatever the logging setup
        log.info("accuracy table (greedy, same held-out questions for every target): %s", run_dir / "eval_table.md")
        primary = f"acc_{cfg.eval.primary_scorer}"
        selected_on = evaluation.objective_dataset(cfg)
        last = cfg.eval.targets[-1]
        objective = next(r for r in results if r["dataset"] == selected_on and r["target"] == last)[primary]
        summary |= {
            "primary_scorer": cfg.eval.primary_scorer,
            "objective": {"dataset": selected_on, "target": last, "value": objective},
            "metrics": {
                f"{r['dataset']}/{r['target']}/{k}": v for r in results for k, v in r.items() if k.startswith("acc_")
            },
            "counts": {
                f"{r['dataset']}/{r['target']}": {k: v for k, v in r.items() if k == "n" or k.startswith("correct_")}
                for r in results
            },
        }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("run summary (what was built, reused and measured): %s", run_dir / "summary.json")
    return objective


def quiet_libraries() -> None:
    """Turn off the progress bars libraries draw for work that takes a moment (transformers' weight loading and shard
    writing, datasets' map/filter, the hub's file checks): looper's own bars (pretraining, training, rollout, eval)
    are the ones that move."""
    import datasets
    import huggingface_hub.utils
    import transformers.utils.logging

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


def refuse(error: Exception) -> None:
    """End the run on a person's mistake: the message alone, on stderr, exit status 2."""
    print(f"looper: {error}", file=sys.stderr, flush=True)
    raise SystemExit(2)


@hydra.main(version_base="1.3", config_path=str(config.conf_dir()), config_name="config")
def main(raw: DictConfig) -> Optional[float]:
    try:
        cfg: Config = config.load(raw)  # unknown keys, then every schema's value checks
    except ValueError as error:
        refuse(error)
    from looper import distributed
    from looper.tracking import keep_wandb_out

    quiet_libraries()
    keep_wandb_out(cfg)
    with distributed.claim_gpu(Path(cfg.paths.artifacts) / ".gpu_locks"):  # before anything starts CUDA
        distributed.init()
        return run(cfg, Path(HydraConfig.get().runtime.output_dir))


def app_help() -> str:
    """Hydra's `--help` page (the template in conf/config.yaml, `hydra.help.template`) with the config groups listed
    from conf/ directly. Hydra lists them by copying its whole config store once per group: seconds for a page of
    text. (`tests/test_config.py` checks the page equals Hydra's own.)"""
    import string

    import yaml

    root = config.conf_dir()
    template = yaml.safe_load((root / "config.yaml").read_text())["hydra"]["help"]["template"]
    groups = [g for g in sorted(root.iterdir()) if g.is_dir() and g.name != "hydra" and any(g.glob("*.yaml"))]
    listing = "".join(f"{g.name}: {', '.join(sorted(p.stem for p in g.glob('*.yaml')))}\n" for g in groups)
    return string.Template(template).substitute(APP_CONFIG_GROUPS=listing)


def cli() -> None:
    """The `looper` command: `--help` answered at once (`app_help`); a key the schema does not declare is refused
    before Hydra composes (Hydra would answer a plain `key=value` typo with its own error and no suggestion); then
    the run."""
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        print(app_help())
        return
    message = config.unknown_overrides(sys.argv[1:])
    if message:
        print(f"looper: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    main()


if __name__ == "__main__":
    cli()
