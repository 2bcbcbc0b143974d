"""Stage `preferences`: DPO pairs from scored trajectories, rewards recomputed from their stored components.

Strategies (`preferences.strategy`), per question, with at most `preferences.max_pairs_per_question` pairs of each
type and never two identical texts in a pair:

- `correctness_first`: correctness pairs first — the correct trajectories by falling reward against the incorrect ones
  by rising reward (best correct vs worst incorrect, then the next of each); then coherence pairs among the correct
  trajectories — most coherent (s_wm) against least coherent, next against next, while the s_wm gap is at least
  `preferences.margin`.
- `reward_extremes`: highest-reward against lowest-reward trajectory (then the next of each) while the reward gap is at
  least `preferences.margin`.

Under `reward.scorer_returns=reward` the reward is the scorer's own, stored in each record (looper/coherence.py), and
coherence pairs rank by the scorer's s_wm, or by that reward where it gives none. `rewards.jsonl` records, for every
trajectory, the s_wm and reward it was paired by and the pairs it is in.

reward = alpha * correct + beta * s_wm - length_penalty * num_tokens / length_unit, with s_wm recomputed from the
stored components with the current `reward.w_*`. The pair's prompt is the model's plain prompt for the question (no
arm): DPO teaches the policy to answer the plain question the way the better path did.
"""

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

from looper import credit, models, prompts, tracking
from looper.artifacts import PAIRS, TRAJECTORIES, read_jsonl
from looper.coherence import group_by_question, reward_of, weighted
from looper.config import Config, PreferencesConfig, RewardConfig

log = logging.getLogger(__name__)

REWARDS = "rewards.jsonl"  # per trajectory: the s_wm and reward it was paired by, and its pairs
COMPONENT_KEYS = ("correct", "s_end", "s_path", "s_cf", "s_wm", "num_tokens", "arm")


def _pairs(high: list[dict], low: list[dict], cap: int, gap, margin: float) -> list[tuple[dict, dict]]:
    """Pair high[i] with low[i] while the gap is positive (a tie is no preference) and at least `margin`, up to
    `cap` pairs; a record is never paired with itself and identical texts are skipped."""
    pairs, used = [], set()
    for chosen, rejected in zip(high, low):
        difference = gap(chosen, rejected)
        if len(pairs) == cap or difference <= 0 or difference < margin:
            break
        if chosen is rejected or id(chosen) in used or id(rejected) in used:
            break  # the two lists have met in the middle
        if chosen["text"] == rejected["text"]:
            continue
        pairs.append((chosen, rejected))
        used.update((id(chosen), id(rejected)))
    return pairs


def _coherence(record: dict) -> float:
    """What coherence pairs rank correct trajectories by: s_wm, or the reward where a reward-protocol scorer gave no
    s_wm of its own."""
    return record["s_wm"] if record["s_wm"] is not None else record["reward"]


def question_pairs(records: list[dict], reward: RewardConfig, settings: PreferencesConfig) -> tuple[list, str]:
    """(pairs as (chosen, rejected, pair_type), reason when there is none) for one question's scored records."""
    scored = [{**r, "s_wm": weighted(r, reward), "reward": reward_of(r, reward)} for r in records]
    cap = settings.max_pairs_per_question
    if settings.strategy == "reward_extremes":
        ranked = sorted(scored, key=lambda r: -r["reward"])
        found = [
            (c, r, "reward")
            for c, r in _pairs(ranked, ranked[::-1], cap, lambda a, b: a["reward"] - b["reward"], settings.margin)
        ]
        return found, "" if found else "reward_gap_below_margin"
    correct = [r for r in scored if r["correct"]]
    wrong = [r for r in scored if not r["correct"]]
    found = [
        (c, r, "correctness")
        for c, r in _pairs(
            sorted(correct, key=lambda r: -r["reward"]),
            sorted(wrong, key=lambda r: r["reward"]),
            cap,
            lambda a, b: 1.0,
            0.0,
        )
    ]
    by_coherence = sorted(correct, key=lambda r: -_coherence(r))
    found += [
        (c, r, "coherence")
        for c, r in _pairs(
            by_coherence, by_coherence[::-1], cap, lambda a, b: _coherence(a) - _coherence(b), settings.margin
        )
    ]
    if found:
        return found, ""
    if not correct:
        return found, "all_wrong"
    return found, "all_correct_and_coherence_gap_below_margin" if not wrong else "identical_texts"


def _key(record: dict) -> tuple:
    return record["question_id"], record["arm"], record.get("sample")


def build_pairs(trajectories: list[dict], reward: RewardConfig, settings: PreferencesConfig):
    """(pairs without prompts, {reason: questions without a pair}, {trajectory key: ids of the pairs it is in}) for
    all questions of a rollout."""
    pairs, unpaired, membership = [], Counter(), defaultdict(list)
    for question_id, records in group_by_question(trajectories).items():
        found, reason = question_pairs(records, reward, settings)
        if not found:
            unpaired[reason] += 1
        for index, (chosen, rejected, pair_type) in enumerate(found):
            pair_id = f"{question_id}/{pair_type}/{index}"
            membership[_key(chosen)].append(pair_id)
            membership[_key(rejected)].append(pair_id)
            pairs.append(
                {
                    "id": pair_id,
                    "question_id": question_id,
                    "question": chosen["question"],
                    "chosen": chosen["text"],
                    "rejected": rejected["text"],
                    "pair_type": pair_type,
                    "chosen_reward": chosen["reward"],
                    "rejected_reward": rejected["reward"],
                    "chosen_components": {k: chosen.get(k) for k in COMPONENT_KEYS},
                    "rejected_components": {k: rejected.get(k) for k in COMPONENT_KEYS},
                }
            )
    return pairs, dict(unpaired), dict(membership)


def trajectory_rewards(trajectories: list[dict], reward: RewardConfig, membership: dict) -> list[dict]:
    """One row per trajectory: its key, correctness, the s_wm and reward it was paired by, and its pairs' ids."""
    return [
        {
            "question_id": r["question_id"],
            "arm": r["arm"],
            "sample": r.get("sample"),
            "correct": r["correct"],
            "s_wm": weighted(r, reward),
            "reward": reward_of(r, reward),
            "pairs": membership.get(_key(r), []),
        }
        for r in trajectories
    ]


def pair_stats(pairs: list[dict], unpaired: dict, questions: int) -> dict:
    """Pairs by type, questions without a pair and why, and the reward gaps."""
    gaps = sorted(p["chosen_reward"] - p["rejected_reward"] for p in pairs)
    return {
        "pairs": len(pairs),
        "pairs_by_type": dict(Counter(p["pair_type"] for p in pairs)),
        "questions": questions,
        "questions_without_pair": unpaired,
        "reward_gap": {"mean": sum(gaps) / len(gaps), "min": gaps[0], "median": gaps[len(gaps) // 2], "max": gaps[-1]}
        if gaps
        else None,
    }


PAIR_ROWS = 500  # pairs shown in the W&B table


def pair_row(pair: dict) -> dict:
    """A pair as one flat table row: question, type, both texts, both arms, rewards and components."""
    row = {"question_id": pair["question_id"], "question": pair["question"], "pair_type": pair["pair_type"]}
    for side in ("chosen", "rejected"):
        components = pair[f"{side}_components"]
        row |= {f"{side}_arm": components.get("arm"), side: pair[side], f"{side}_reward": pair[f"{side}_reward"]}
        row |= {f"{side}_{k}": v for k, v in components.items() if k != "arm"}
    return row


def _build(cfg: Config, rollout_dir: Path, sft_dir: Path, out: Path) -> None:
    tokenizer = models.load_tokenizer(str(sft_dir), cfg.model)
    trajectories = read_jsonl(rollout_dir / TRAJECTORIES)
    pairs, unpaired, membership = build_pairs(trajectories, cfg.reward, cfg.preferences)
    with open(out / PAIRS, "w") as handle:
        for pair in pairs:
            pair["prompt"] = prompts.build_prompt(cfg.model, tokenizer, pair["question"])
            handle.write(json.dumps(pair) + "\n")
    rows = trajectory_rewards(trajectories, cfg.reward, membership)
    (out / REWARDS).write_text("".join(json.dumps(row) + "\n" for row in rows))
    stats = pair_stats(pairs, unpaired, len(group_by_question(trajectories)))
    stats["arm_credit"] = credit.arm_credit(trajectories, pairs, cfg.reward)
    png = credit.plot(stats["arm_credit"], out / credit.PNG)
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    tracker = tracking.current()  # the stage's W&B run (looper/pipeline.py opens it)
    tracker.summary(
        {
            "preferences/pairs": stats["pairs"],
            **{f"preferences/pairs_{k}": v for k, v in stats["pairs_by_type"].items()},
            **{f"preferences/unpaired_{k}": v for k, v in unpaired.items()},
            **{f"preferences/reward_gap_{k}": v for k, v in (stats["reward_gap"] or {}).items()},
        }
    )
    credit.log(tracker, stats["arm_credit"], png)
    tracker.table("preferences/pairs", [pair_row(pair) for pair in pairs[:PAIR_ROWS]])
    log.info(
        "preferences: %d pairs %s; questions without a pair: %s", len(pairs), stats["pairs_by_type"], unpaired or "none"
    )
    if not pairs:
        raise RuntimeError(
            f"no preference pairs from {rollout_dir} ({unpaired}): sample more per arm "
            "(arms.<arm>.samples), more questions, or lower preferences.margin"
        )


NEEDS = ("rollout", "sft")  # the artifacts this stage builds on (looper/pipeline.py resolves them)
ENSURE: dict = {}

READS = ("reward", "preferences", "model")  # the config it reads: the reward, the pairing, the prompt format


def build(cfg: Config, up: dict, out: Path) -> None:
    """Build the DPO pairs of the rollout's trajectories into `out` (prompts in the SFT tokenizer's format)."""
    _build(cfg, Path(up["rollout"]), Path(up["sft"]), out)
