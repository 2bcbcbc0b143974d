"""Artifact identities are what each stage reads: every build, run under a config that records each key read, reads
nothing its declaration (`READS` in looper/stages/) leaves out of its identity."""

import dataclasses
from contextlib import contextmanager
from pathlib import Path

import pytest

from looper import pipeline
from looper.stages import base, dpo, evaluation, export, preferences, rollout, sft
from tests.conftest import compose


@contextmanager
def recording(cfg):
    """Record the dotted key of every config field read (a section's navigation itself not counted) while inside."""
    where, classes = {}, set()

    def walk(node, path: str) -> None:
        if dataclasses.is_dataclass(node):
            where[id(node)], _ = path, classes.add(type(node))
            for f in dataclasses.fields(node):
                walk(getattr(node, f.name), f"{path}.{f.name}".lstrip("."))
        elif isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}")

    walk(cfg, "")
    reads: set[str] = set()

    def spy(cls):
        names = {f.name for f in dataclasses.fields(cls)}

        def __getattribute__(self, name):
            value = object.__getattribute__(self, name)
            if name in names and id(self) in where and not dataclasses.is_dataclass(value):
                reads.add(f"{where[id(self)]}.{name}".lstrip("."))
            return value

        return __getattribute__

    for cls in classes:
        cls.__getattribute__ = spy(cls)
    try:
        yield reads
    finally:
        for cls in classes:
            del cls.__getattribute__


def not_identity(cfg) -> set[str]:
    """The keys the schema marks `identity=False`: a build may read them (speed, logging) without declaring them."""
    out = set()

    def walk(node, path: str) -> None:
        if dataclasses.is_dataclass(node):
            for f in dataclasses.fields(node):
                key = f"{path}.{f.name}".lstrip(".")
                if not f.metadata.get("identity", True):
                    out.add(key)
                walk(getattr(node, f.name), key)

    walk(cfg, "")
    return out


def undeclared(cfg, reads: set[str], declared: tuple) -> list[str]:
    """The keys read that the declaration does not cover: not under a declared key, or taken back out (`-key`)."""
    keys = [d for d in declared if not d.startswith("-")]
    dropped = [d[1:] for d in declared if d.startswith("-")]
    under = lambda key, prefixes: any(key == p or key.startswith(p + ".") for p in prefixes)
    return sorted(r for r in reads - not_identity(cfg) if not under(r, keys) or under(r, dropped))


def never_read(cfg, reads: set[str], declared: tuple) -> list[str]:
    """Declared keys (sections expanded) that the build never read: listed, so a stale declaration shows."""
    keys = pipeline.settings(cfg, declared)
    return sorted(k for k in keys if not any(r == k or r.startswith(k + ".") for r in reads))


def build_recorded(stage, cfg, up: dict, out: Path, *args) -> tuple[set, tuple]:
    """Run `stage`'s build into `out` under a recording config; (keys read, keys declared)."""
    declared = pipeline.declared(stage.READS, cfg, *args)
    out.mkdir(parents=True, exist_ok=True)
    with recording(cfg) as reads:
        if stage is evaluation:
            evaluation.build(cfg, "sft", str(up["sft"]), args[0], out)
        else:
            stage.build(cfg, up, out)
    return set(reads), declared


def check(name: str, cfg, reads: set, declared: tuple) -> list[str]:
    """Fail on an undeclared read; return the declared keys never read (shown with -rA / in the failure)."""
    missing = undeclared(cfg, reads, declared)
    assert not missing, f"{name} reads keys outside its identity (declare them in READS): {missing}"
    return never_read(cfg, reads, declared)


def test_the_recording_sees_a_read_outside_the_declaration(fast_cfg):
    cfg = fast_cfg()
    with recording(cfg) as reads:
        cfg.reward.alpha, cfg.arms["plain"].temperature, cfg.sft.logging_steps
    assert reads == {"reward.alpha", "arms", "arms.plain.temperature", "sft.logging_steps"}  # (the arm names too)
    assert undeclared(cfg, reads, ("arms", "reward", "-reward.alpha")) == ["reward.alpha"]  # taken back out
    assert undeclared(cfg, reads, ("arms",)) == ["reward.alpha"]  # logging_steps: identity=False, allowed
    assert type(cfg.reward).__getattribute__ is object.__getattribute__  # (the spy is gone)


def test_every_stage_reads_only_what_its_identity_holds(fast_cfg, tiny_sft, tmp_path):
    _, _, base_dir, sft_dir = tiny_sft
    cfg = fast_cfg("lora=r64", "lora.r=4", "rollout.num_questions=8", "eval.num_questions=4", "dpo.max_steps=2")
    unread = {}
    reads, declared = build_recorded(base, fast_cfg("model.tiny.pretrain_steps=2"), {}, tmp_path / "base")
    unread["base"] = check("base", cfg, reads, declared)
    up = {"base": base_dir}
    for name, stage in (("sft", sft), ("rollout", rollout), ("preferences", preferences), ("dpo", dpo)):
        up[name] = tmp_path / name
        if name == "rollout":  # (downstream from the session's SFT model: a few steps of a fresh one answer nothing)
            up["sft"] = sft_dir
        reads, declared = build_recorded(stage, cfg, {n: up[n] for n in pipeline.declared(stage.NEEDS, cfg)}, up[name])
        unread[name] = check(name, cfg, reads, declared)
    reads, declared = build_recorded(evaluation, cfg, up, tmp_path / "eval", "synthetic_test")
    unread["eval"] = check("eval", cfg, reads, declared)
    export_cfg = fast_cfg("lora=r64", "lora.r=4", "export.source=sft", "export.dtype=float32")
    reads, declared = build_recorded(export, export_cfg, {"sft": sft_dir}, tmp_path / "export")
    unread["export"] = check("export", export_cfg, reads, declared)
    print("declared, never read on the tiny setup:", unread)  # (a stale declaration shows here)


@pytest.mark.parametrize("allocation", ["thompson", "thompson_sequential"])
def test_a_bandit_rollout_reads_only_what_its_identity_holds(tiny_sft, tmp_path, allocation):
    _, _, base_dir, sft_dir = tiny_sft
    cfg = compose(  # (the fast setup's arm override is the `single` arm-set's)
        f"paths.artifacts={Path(base_dir).parent.parent}",
        "debug=fast",
        "arms=regime_w",
        f"rollout.allocation={allocation}",
        "rollout.budget=16",
        "rollout.rounds=2",
        "rollout.num_questions=4",
    )
    reads, declared = build_recorded(rollout, cfg, {"sft": sft_dir}, tmp_path / "rollout")
    print("declared, never read:", check("rollout", cfg, reads, declared))
    assert "reward.beta" in reads  # (the bandit allocates by the whole reward)
