"""Multi-path coherence (the reference scorer) and the reward: the module that reads the `reward` config group.

For the trajectories T of one question, each t with final answer ans(t) (None if none was found) and the set R(t)
of intermediate results of its equations:

- s_end(t)  = |{u in T, u != t : ans(u) = ans(t)}| / (|T| - 1);  0 when ans(t) is None or t is alone.
- s_path(t) = validity(t) * mean_{u != t, ans(u) = ans(t)} Jaccard(R(t), R(u)), where validity(t) is the share of
              t's equations that hold (0 when it has none) and the mean is 0 when no other trajectory agrees.
- s_cf(t)   counterfactual robustness; not computed by this scorer yet (see the rollout issue), so it is inactive
              and its weight drops out of s_wm.
- s_wm(t)   = (w_end*s_end + w_path*s_path [+ w_cf*s_cf]) / (sum of the active weights);  0 if that sum is 0.

reward(t) = alpha * correct + beta * s_wm - length_penalty * num_tokens / length_unit.
"""

from collections import defaultdict
from typing import Optional

from looper.config import RewardConfig
from looper.equations import find_equations

COMPONENTS = ("s_end", "s_path", "s_cf", "s_wm")


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def score_question(trajectories: list[dict]) -> list[dict]:
    """s_end, s_path and s_cf (None: inactive) for each trajectory of one question (dicts with `answer`, `text`)."""
    equations = [find_equations(t["text"]) for t in trajectories]
    results = [{e.result for e in eqs if e.result is not None} for eqs in equations]
    validity = [sum(e.holds for e in eqs) / len(eqs) if eqs else 0.0 for eqs in equations]
    scored = []
    for i, t in enumerate(trajectories):
        others = [j for j in range(len(trajectories)) if j != i]
        agreeing = [j for j in others if t["answer"] is not None and trajectories[j]["answer"] == t["answer"]]
        s_end = len(agreeing) / len(others) if others and t["answer"] is not None else 0.0
        overlap = sum(_jaccard(results[i], results[j]) for j in agreeing) / len(agreeing) if agreeing else 0.0
        scored.append({"s_end": s_end, "s_path": validity[i] * overlap, "s_cf": None,
                       "equations": [[e.lhs, e.rhs, e.holds] for e in equations[i]]})
    return scored


def weighted(components: dict, reward: RewardConfig) -> float:
    """s_wm: the weighted mean of the active components (a None component is inactive and its weight drops out)."""
    terms = [(reward.w_end, components["s_end"]), (reward.w_path, components["s_path"]),
             (reward.w_cf, components["s_cf"])]
    active = [(w, s) for w, s in terms if s is not None]
    total = sum(w for w, _ in active)
    return sum(w * s for w, s in active) / total if total > 0 else 0.0


def score(records: list[dict], reward: RewardConfig) -> list[dict]:
    """Add the coherence components and s_wm to rollout records, grouped by `question_id`; returns new records."""
    by_question: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        by_question[record["question_id"]].append(index)
    out: list[Optional[dict]] = [None] * len(records)
    for indices in by_question.values():
        for index, components in zip(indices, score_question([records[i] for i in indices])):
            record = {**records[index], **components}
            record["s_wm"] = weighted(record, reward)
            out[index] = record
    return out


def reward_of(record: dict, reward: RewardConfig) -> float:
    """alpha * correct + beta * s_wm - length_penalty * num_tokens / length_unit, from stored components."""
    return (reward.alpha * float(record["correct"]) + reward.beta * weighted(record, reward)
            - reward.length_penalty * record["num_tokens"] / reward.length_unit)
