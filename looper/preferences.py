"""Stage `preferences`: DPO pairs from scored trajectories, rewards recomputed from their stored components.

Correctness pairs: per question, the correct trajectories by descending reward are paired with the incorrect ones by
ascending reward (best correct vs worst incorrect first), up to `preferences.max_pairs_per_question`; identical
texts are never paired. The pair's prompt is the model's plain prompt for the question (no arm): DPO teaches the
policy to answer the plain question the way the best arm did.
"""

import json
import logging
from collections import defaultdict
from pathlib import Path

from looper import models, rollout, sft
from looper.artifacts import ArtifactStore
from looper.coherence import reward_of
from looper.config import Config
from looper.tracking import stage_run

log = logging.getLogger(__name__)


def correctness_pairs(trajectories: list[dict], cfg: Config) -> tuple[list[dict], dict]:
    """(pairs without prompts, count of questions without a pair by reason) from one rollout's records."""
    by_question: dict[str, list[dict]] = defaultdict(list)
    for record in trajectories:
        by_question[record["question_id"]].append({**record, "reward": reward_of(record, cfg.reward)})
    pairs, unpaired = [], defaultdict(int)
    for question_id, records in by_question.items():
        correct = sorted((r for r in records if r["correct"]), key=lambda r: -r["reward"])
        wrong = sorted((r for r in records if not r["correct"]), key=lambda r: r["reward"])
        if not correct or not wrong:
            unpaired["all_correct" if correct else "all_wrong"] += 1
            continue
        made = 0
        for chosen, rejected in zip(correct, wrong):
            if made == cfg.preferences.max_pairs_per_question:
                break
            if chosen["text"] == rejected["text"]:
                continue
            pairs.append(_pair(question_id, chosen, rejected, "correctness", made))
            made += 1
        if made == 0:
            unpaired["identical_texts"] += 1
    return pairs, dict(unpaired)


def _pair(question_id: str, chosen: dict, rejected: dict, pair_type: str, index: int) -> dict:
    components = ("correct", "s_end", "s_path", "s_cf", "s_wm", "num_tokens", "arm")
    return {"id": f"{question_id}/{pair_type}/{index}", "question_id": question_id, "question": chosen["question"],
            "chosen": chosen["text"], "rejected": rejected["text"], "pair_type": pair_type,
            "chosen_reward": chosen["reward"], "rejected_reward": rejected["reward"],
            "chosen_components": {k: chosen[k] for k in components},
            "rejected_components": {k: rejected[k] for k in components}}


def _build(cfg: Config, rollout_dir: Path, sft_dir: Path, out: Path) -> None:
    tokenizer = models.load_tokenizer(str(sft_dir), cfg.model)
    pairs, unpaired = correctness_pairs(rollout.read_trajectories(rollout_dir), cfg)
    with open(out / "pairs.jsonl", "w") as handle:
        for pair in pairs:
            pair["prompt"] = models.build_prompt(cfg.model, tokenizer, pair["question"])
            handle.write(json.dumps(pair) + "\n")
    gaps = [p["chosen_reward"] - p["rejected_reward"] for p in pairs]
    stats = {"pairs": len(pairs), "pairs_by_type": {"correctness": len(pairs)}, "questions_without_pair": unpaired,
             "mean_reward_gap": sum(gaps) / len(gaps) if gaps else None}
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    with stage_run(cfg, "preferences") as tracker:
        tracker.summary({f"preferences/{k}": v for k, v in stats.items() if not isinstance(v, dict)})
    log.info("preferences: %d pairs; questions without a pair: %s", len(pairs), unpaired or "none")
    if not pairs:
        raise RuntimeError(f"no preference pairs from {rollout_dir}: every question's trajectories were all correct "
                           f"or all wrong ({unpaired}); sample more per arm (arms.<arm>.samples) or more questions")


def run(cfg: Config, store: ArtifactStore) -> Path:
    """Build DPO pairs from the rollout artifact; returns the artifact directory."""
    rollout_dir = rollout.run(cfg, store)
    sft_dir = sft.run(cfg, store)  # already built by the rollout: a cache lookup
    spec = {"rollout": rollout_dir.name, "reward": cfg.reward, "preferences": cfg.preferences, "model": cfg.model}
    return store.ensure("preferences", spec, lambda out: _build(cfg, rollout_dir, sft_dir, out))
