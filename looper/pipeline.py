"""The stage graph, declared once: which stage builds on which, resolved into cached artifacts.

Each stage module (sft, rollout, preferences, dpo, export) exposes `NEEDS` (the artifacts it builds on, or a function
of the config that names them), `spec(cfg, up,
store)` (what identifies its artifact, given its upstream artifacts `up`), `build(cfg, up, out)` (how to make it) and
`ENSURE` (how the store builds it: `resumable`, `collective`). `Pipeline.artifact(name)` resolves a stage's upstreams
first, each once per run, and returns the stage's artifact from the cache or builds it. `base` is the base model
(`models.base_model_path`). Evaluation sits on top: each target (base, sft, dpo or a directory) is resolved here and
handed to `evaluation.run`. No stage imports another; only this module knows the graph.
"""

import json
from pathlib import Path
from typing import Optional, Union

from looper import dpo, evaluation, export, models, preferences, rollout, sft, throughput, tracking
from looper.artifacts import ArtifactStore
from looper.config import Config

STAGES = {"sft": sft, "rollout": rollout, "preferences": preferences, "dpo": dpo, "export": export}
PIPELINE = ("sft", "rollout", "preferences", "dpo")  # what `stage=pipeline` builds before evaluating
TARGETS = ("base", "sft", "dpo")  # eval targets that name an artifact of this graph


class Pipeline:
    """The artifacts of one run's config, resolved through the stage graph."""

    def __init__(self, cfg: Config, store: ArtifactStore):
        self.cfg, self.store = cfg, store
        self.resolved: dict[str, str] = {}

    def artifact(self, name: str) -> Union[Path, str]:
        """The artifact of stage `name`, building it and its upstreams where needed; for `base`, the base model's
        directory or hub id (a string: a hub id is not a path)."""
        if name not in self.resolved:
            if name == "base":
                self.resolved[name] = models.base_model_path(self.cfg, self.store)
            else:
                stage = STAGES[name]
                needs = stage.NEEDS(self.cfg) if callable(stage.NEEDS) else stage.NEEDS
                up = {need: self.artifact(need) for need in needs}  # (their runs finish before this one opens)
                if name == "export":  # its model card reports the source's evaluations (cached like any other)
                    up["evaluations"] = self.evaluations(self.cfg.export.source)
                with tracking.stage_run(self.cfg, name) as tracker:  # open while the stage works: live curves
                    path = self.store.ensure(
                        name,
                        stage.spec(self.cfg, up, self.store),
                        lambda out: stage.build(self.cfg, up, out),
                        **stage.ENSURE,
                        what=f"({self.cfg.model.name})",
                    )
                    self._lineage(tracker, name, path, {need: up[need] for need in needs})
                self.resolved[name] = str(path)
        return Path(self.resolved[name]) if name != "base" else self.resolved[name]

    def _lineage(self, tracker, name: str, path: Path, up: dict) -> None:
        """The stage's W&B artifact and its inputs: the run uses its upstream artifacts and logs the one it made, or
        uses the cached one it reused (and shows that artifact's top-level statistics)."""
        for need, upstream in up.items():
            if need != "base" or Path(upstream).is_dir():  # (a hub id is not a local artifact)
                tracker.used(need, Path(upstream))
        if path in self.store.made:
            tracker.produced(name, path)
            return
        tracker.used(name, path)
        stats = json.loads((path / "stats.json").read_text()) if (path / "stats.json").exists() else {}
        tracker.summary(
            {
                f"{name}/reused_artifact": str(path),
                **{f"{name}/{k}": v for k, v in stats.items() if isinstance(v, (int, float))},
                **throughput.metrics(name, stats.get("generation", {})),
            }
        )

    def evaluations(self, target: str) -> list[dict]:
        """The summaries of `target` evaluated on each of `eval.datasets`."""
        paths = [
            evaluation.evaluate(self.cfg, self.store, target, self.target_path(target), dataset)
            for dataset in self.cfg.eval.datasets
        ]
        return [json.loads((path / "summary.json").read_text()) for path in paths]

    def target_path(self, target: str) -> str:
        """The model directory (or hub id) of an eval target, building it first when it is a stage's artifact."""
        if target in TARGETS:
            return str(self.artifact(target))
        if not Path(target).exists():
            raise FileNotFoundError(f"eval.targets: {target!r} is not base, sft, dpo or an existing directory")
        return str(Path(target).resolve())

    def run(self, stage: str, run_dir: Optional[Path] = None) -> Optional[list[dict]]:
        """Run `stage`: one stage (its upstreams first), `eval` (every target, then the report) or `pipeline` (every
        stage, then eval). Returns eval's per-artifact summaries when eval ran."""
        for name in PIPELINE if stage == "pipeline" else [stage] if stage != "eval" else []:
            self.artifact(name)
        if stage not in ("pipeline", "eval"):
            return None
        return evaluation.run(self.cfg, self.store, self.target_path, run_dir)


def artifact(cfg: Config, store: ArtifactStore, name: str) -> Path:
    """The artifact of stage `name` for `cfg` (built where the cache lacks it): `Pipeline(cfg, store).artifact`."""
    return Pipeline(cfg, store).artifact(name)


def evaluate(cfg: Config, store: ArtifactStore, target: str, dataset: str) -> Path:
    """One eval cell: `target` (resolved through the graph) on `dataset`; returns the eval artifact."""
    return evaluation.evaluate(cfg, store, target, Pipeline(cfg, store).target_path(target), dataset)
