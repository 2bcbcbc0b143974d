"""Stage `rollout`: sample trajectories for each training question from every arm of the arm-set, and score them.

Artifact: `trajectories.jsonl` (one record per question x arm x sample, raw score components kept so that rewards
are recomputed later with the current `reward.*`) and `stats.json` (per-arm accuracy, tokens, components).
"""

import json
import logging
from pathlib import Path

from looper import coherence, models
from looper.answers import extract, is_correct
from looper.artifacts import ArtifactStore
from looper.config import Config
from looper.data import load_splits
from looper.generation import generate
from looper import sft
from looper.tracking import stage_run

log = logging.getLogger(__name__)


def _sample(cfg: Config, model, tokenizer, problems: list[dict]) -> list[dict]:
    """Raw trajectories (text, answer, correct) for every question x arm x sample."""
    records = []
    max_new_tokens = cfg.rollout.max_new_tokens or cfg.model.max_new_tokens
    for arm_index, (arm_name, arm) in enumerate(cfg.arms.items()):
        jobs = [(problem, sample) for problem in problems for sample in range(arm.samples)]
        prompts = [models.build_prompt(cfg.model, tokenizer, problem["question"], arm) for problem, _ in jobs]
        seed = cfg.seed * 1000 + arm_index
        outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                           batch_size=cfg.rollout.batch_size, temperature=arm.temperature, top_p=arm.top_p, seed=seed,
                           add_special_tokens=cfg.model.prompt_format != "chat", desc=f"rollout {arm_name}")
        for (problem, sample), output in zip(jobs, outputs):
            records.append({
                "question_id": problem["id"], "arm": arm_name, "family": arm.family, "sample": sample,
                "seed": seed, "question": problem["question"], "gold": problem["gold"], "text": output.text,
                "answer": extract(output.text, cfg.rollout.answer_scorer),
                "correct": is_correct(output.text, problem["gold"], cfg.rollout.answer_scorer),
                "num_tokens": output.num_tokens, "finish_reason": output.finish_reason})
    return records


def _mean(values: list) -> "float | None":
    return sum(values) / len(values) if values else None


def arm_stats(records: list[dict]) -> dict:
    """Per-arm and overall accuracy, mean tokens and mean coherence components."""
    def summary(rows):
        n = len(rows)
        return {"trajectories": n, "accuracy": sum(r["correct"] for r in rows) / n,
                "mean_tokens": sum(r["num_tokens"] for r in rows) / n,
                **{f"mean_{c}": _mean([r[c] for r in rows if r[c] is not None]) for c in coherence.COMPONENTS}}

    arms = sorted({r["arm"] for r in records})
    return {"overall": summary(records), "arms": {a: summary([r for r in records if r["arm"] == a]) for a in arms}}


def _build(cfg: Config, sft_dir: Path, out: Path) -> None:
    problems = load_splits(cfg.data)["train"][: cfg.rollout.num_questions]
    model, tokenizer = models.load_target(str(sft_dir), cfg.model)
    with stage_run(cfg, "rollout") as tracker:
        records = coherence.score(_sample(cfg, model, tokenizer, problems), cfg.reward)
        with open(out / "trajectories.jsonl", "w") as handle:
            for record in records:
                handle.write(json.dumps(record) + "\n")
        stats = arm_stats(records)
        (out / "stats.json").write_text(json.dumps(stats, indent=2))
        tracker.summary({f"rollout/{arm}/accuracy": s["accuracy"] for arm, s in stats["arms"].items()})
        tracker.summary({"rollout/accuracy": stats["overall"]["accuracy"]})
        tracker.table("rollout/samples", records[:50])
    log.info("rollout: %d trajectories over %d questions, accuracy %.3f", len(records), len(problems),
             stats["overall"]["accuracy"])


def rollout_spec(cfg: Config, sft_dir: Path) -> dict:
    """What determines the trajectories: not alpha, beta, length penalty or w_* (applied later, to components)."""
    return {"sft": sft_dir.name, "arms": cfg.arms, "rollout": cfg.rollout, "model": cfg.model, "data": cfg.data,
            "seed": cfg.seed}


def run(cfg: Config, store: ArtifactStore) -> Path:
    """Sample and score trajectories from the SFT policy; returns the artifact directory."""
    sft_dir = sft.run(cfg, store)
    return store.ensure("rollout", rollout_spec(cfg, sft_dir), lambda out: _build(cfg, sft_dir, out))


def read_trajectories(rollout_dir: Path) -> list[dict]:
    """The records of a rollout artifact."""
    with open(rollout_dir / "trajectories.jsonl") as handle:
        return [json.loads(line) for line in handle if line.strip()]
