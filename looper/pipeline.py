"""The stage graph, declared once: which stage builds on which, what each reads, resolved into cached artifacts.

Each stage module under `looper/stages/` (base, sft, rollout, preferences, dpo, export, evaluation) declares:

- `NEEDS`: the artifacts it builds on (a tuple, or a function of the config that names them);
- `READS`: the config it reads (a tuple of keys, or a function of the config returning one): a section name stands
  for all its fields, a dotted key for one, and `-key` takes a key back out of a section named before it;
- `ENSURE`: how the store builds it (`resumable`, `collective`);
- `build(cfg, up, out)`: how to make it into `out`, given its upstream artifacts `up`.

An artifact's identity (`spec`) is derived here, and only here: its upstreams' identities and the value of every key
it reads, except the fields the schema marks `identity=False` (speed, logging: settings that never change an output).
So a setting enters exactly the identities of the stages that read it; `tests/test_identity.py` runs every build under
a config that records each key read and fails on a read the declaration misses. `Pipeline.artifact(name)` resolves a
stage's upstreams first, each once per run, and returns the stage's artifact from the cache or builds it; `base` is
served from `model.name_or_path` where that is set. Evaluation cells (a target on a dataset) are nodes of the same
kind (`Pipeline.evaluate`). No stage imports another; only this module knows the graph.
"""

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

from looper import throughput, tracking
from looper.artifacts import ArtifactStore, to_plain
from looper.config import Config, identity
from looper.stages import base, dpo, evaluation, export, grpo, preferences, rollout, sft

STAGES = {
    "base": base,
    "sft": sft,
    "rollout": rollout,
    "preferences": preferences,
    "dpo": dpo,
    "grpo": grpo,
    "export": export,
}
PIPELINE = ("sft", "rollout", "preferences", "dpo")  # what `stage=pipeline` builds before evaluating
TARGETS = ("base", "sft", "dpo", "grpo")  # eval targets that name an artifact of this graph


def declared(value, cfg: Config, *args) -> tuple:
    """A stage's `NEEDS` or `READS` for this config (either is a tuple or a function of the config)."""
    return tuple(value(cfg, *args) if callable(value) else value)


def lookup(cfg: Config, key: str):
    """The value of a dotted config key (`arms.<name>` reads into the arms dict)."""
    value = cfg
    for part in key.split("."):
        value = value[part] if isinstance(value, dict) else getattr(value, part)
    return value


def settings(cfg: Config, reads: tuple) -> dict:
    """{key: value} of each read key, a section expanded to its fields but those marked `identity=False` and those
    taken back out (`-key`)."""
    dropped = {key[1:] for key in reads if key.startswith("-")}
    out = {}
    for key in (k for k in reads if not k.startswith("-")):
        value = lookup(cfg, key)
        if dataclasses.is_dataclass(value):
            out.update({f"{key}.{k}": v for k, v in identity(value).items() if f"{key}.{k}" not in dropped})
        else:
            out[key] = value
    return to_plain(out)


def spec(cfg: Config, store: ArtifactStore, reads: tuple, up: dict, **cell) -> dict:
    """An artifact's identity: its upstream artifacts (by content: `ArtifactStore.identity`), the keys it reads and,
    for an evaluation, which cell it is."""
    return {
        "needs": {name: store.identity(str(path), cfg.model.revision) for name, path in up.items()},
        "reads": settings(cfg, reads),
        **cell,
    }


def stage_spec(cfg: Config, store: ArtifactStore, name: str, up: dict) -> dict:
    """The identity of stage `name`'s artifact over the upstream artifacts `up`."""
    return spec(cfg, store, declared(STAGES[name].READS, cfg), up)


def eval_spec(cfg: Config, store: ArtifactStore, path: str, dataset: str) -> dict:
    """The identity of one evaluation cell: the model at `path` on `dataset`, scored by the scorers that run."""
    reads = declared(evaluation.READS, cfg, dataset)
    return spec(cfg, store, reads, {"target": path}, dataset=dataset, scorers=evaluation.active_scorers(cfg))


class Pipeline:
    """The artifacts of one run's config, resolved through the stage graph."""

    def __init__(self, cfg: Config, store: ArtifactStore):
        self.cfg, self.store = cfg, store
        self.resolved: dict[str, str] = {}

    def artifact(self, name: str) -> Union[Path, str]:
        """The artifact of stage `name`, building it and its upstreams where needed; for `base`, the base model's
        directory or hub id (a string: a hub id is not a path)."""
        if name not in self.resolved:
            if name == "base" and base.external(self.cfg):
                self.resolved[name] = base.external(self.cfg)
                return self.resolved[name]
            stage = STAGES[name]
            needs = declared(stage.NEEDS, self.cfg)
            up = {need: self.artifact(need) for need in needs}
            identity_up = dict(up)
            if name == "export":  # its model card reports the source's evaluations (cached like any other)
                up["evaluations"] = self.evaluations(self.cfg.export.source)
                identity_up.update({f"eval/{p.name}": p for p in up["evaluations"]})
            key = stage_spec(self.cfg, self.store, name, identity_up)
            path = self._ensure(stage, name, key, up)
            if name == "base":  # (not in the lineage: the tiny model, built once, or the model named)
                self.resolved[name] = str(path)
                return self.resolved[name]
            self._lineage(tracking.current(), name, path, {need: up[need] for need in needs})
            self.resolved[name] = str(path)
        return Path(self.resolved[name]) if name != "base" else self.resolved[name]

    def _ensure(self, stage, name: str, key: dict, up: dict) -> Path:
        return self.store.ensure(
            name, key, lambda out: stage.build(self.cfg, up, out), **stage.ENSURE, what=f"({self.cfg.model.name})"
        )

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

    def evaluate(self, target: str, dataset: str, path: Optional[str] = None) -> Path:
        """The eval artifact of `target` (base, sft, dpo, grpo or a model directory; `path`: where it is, if known) on
        `dataset`, built where the cache lacks it."""
        path = path or self.target_path(target)
        return self.store.ensure(
            "eval",
            eval_spec(self.cfg, self.store, path, dataset),
            lambda out: evaluation.build(self.cfg, target, path, dataset, out),
            **evaluation.ENSURE,
            what=f"{target} ({self.cfg.model.name}) on {dataset}",
        )

    def evaluations(self, target: str) -> list[Path]:
        """The eval artifacts of `target` on each of `eval.datasets`."""
        return [self.evaluate(target, dataset) for dataset in self.cfg.eval.datasets]

    def target_path(self, target: str) -> str:
        """The model directory (or hub id) of an eval target, building it first when it is a stage's artifact."""
        if target in TARGETS:
            return str(self.artifact(target))
        if not Path(target).exists():
            raise FileNotFoundError(f"eval.targets: {target!r} is not base, sft, dpo, grpo or an existing directory")
        return str(Path(target).resolve())

    def run(self, stage: str, run_dir: Optional[Path] = None) -> Optional[list[dict]]:
        """Run `stage`: one stage (its upstreams first), `eval` (every target, then the report) or `pipeline` (every
        stage, then eval). Returns eval's per-artifact summaries when eval ran."""
        for name in PIPELINE if stage == "pipeline" else [stage] if stage != "eval" else []:
            self.artifact(name)
        if stage not in ("pipeline", "eval"):
            return None
        return evaluation.run(self.cfg, self.store, self.target_path, self.evaluate, run_dir)


def artifact(cfg: Config, store: ArtifactStore, name: str) -> Path:
    """The artifact of stage `name` for `cfg` (built where the cache lacks it): `Pipeline(cfg, store).artifact`."""
    return Pipeline(cfg, store).artifact(name)


def evaluate(cfg: Config, store: ArtifactStore, target: str, dataset: str) -> Path:
    """One eval cell: `target` (resolved through the graph) on `dataset`; returns the eval artifact."""
    return Pipeline(cfg, store).evaluate(target, dataset)
