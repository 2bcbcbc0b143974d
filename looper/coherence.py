"""Multi-path coherence (the reference scorer) and the reward: the module that reads the `reward` config group.

For the trajectories T of one question, each t with final answer ans(t) (None if none was found) and the set R(t)
of intermediate results of its equations (looper/equations.py):

- s_end(t)  = |{u in T, u != t : ans(u) = ans(t)}| / (|T| - 1);  0 when ans(t) is None or t is alone. Answers are
              equal as numbers (`18.50` = `18.5`: answers.same_answer, the equality `is_correct` uses).
- s_path(t) = validity(t) * mean_{u != t, ans(u) = ans(t)} Jaccard(R(t), R(u)), where validity(t) is the share of
              t's equations that hold (0 when it has none) and the mean is 0 when no other trajectory agrees.
- s_cf(t)   = share of `reward.cf_samples` continuations, resampled from t's prompt plus the first `reward.cf_cut`
              of its reasoning (cut back to a word boundary: `cut`), whose final answer equals ans(t); 0 when ans(t)
              is None;
              None (inactive) when cf_samples is 0.
- s_wm(t)   = (w_end*s_end + w_path*s_path + w_cf*s_cf) / (sum of the weights of the active components); 0 if that
              sum is 0.

reward(t) = alpha * correct + beta * s_wm - length_penalty * num_tokens / length_unit.

The scorer protocol. `reward.scorer._target_` names a function called once per question as

    scorer(question=str, gold=str, trajectories=list[dict], generate=Generate, extract_answer=Callable, reward=
           RewardConfig, **other keys of reward.scorer) -> list[dict]

where each trajectory dict has at least `text`, `reasoning`, `answer`, `correct`, `arm`, `family`, `sample`;
`generate(requests, n)` takes [(trajectory index, text prefix), ...] and returns, per request, n sampled
continuations of that trajectory's prompt + prefix (seeded, with its arm's temperature); `extract_answer(text)` is the
rollout's answer parser. It returns one dict per trajectory, in order, with `s_end`, `s_path` and `s_cf` (a float, or
None for an inactive component) and any extra keys to store (the reference scorer adds `equations`).

The reward protocol (`reward.scorer_returns=reward`), the study plans' `compute_reward(question, arm_outputs,
gold_answer)`: the function is called once per question as

    scorer(question, trajectories, gold, **other keys of reward.scorer) -> list[float | dict]

and returns one reward per trajectory, in order: a number, or a dict with `reward` (a number), optionally `s_wm` (the
scorer's own coherence figure, used by correctness-first pairs) and any extra keys to store. The record then carries
that `reward`, and pairing, per-arm credit and the bandit use it as it is: `reward.alpha`, `beta`, the length penalty
and the `w_*` weights do not apply, and `s_end`, `s_path`, `s_cf` are None.
"""

import math
import re
from collections import defaultdict
from typing import Callable, Optional

from looper.answers import same_answer
from looper.config import RewardConfig
from looper.equations import find_equations

COMPONENTS = ("s_end", "s_path", "s_cf", "s_wm")
Generate = Callable[[list[tuple[int, str]], int], list[list[str]]]

_FINAL_LINE = re.compile(r"(####|answer:)", re.IGNORECASE)


def split_reasoning(text: str, think_close: Optional[str] = None) -> str:
    """The reasoning of a trajectory: its text before the last `####` or `answer:` marker (all of it if none); for a
    reasoning model (`think_close` set), its think block: the text before the last `think_close` (all of it if the
    block never closed)."""
    if think_close is not None:
        return text.rsplit(think_close, 1)[0].rstrip() if think_close in text else text
    matches = list(_FINAL_LINE.finditer(text))
    return text[: matches[-1].start()].rstrip(" \n*#") if matches else text


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def cut(reasoning: str, fraction: float) -> str:
    """The first `fraction` of the reasoning, cut back to a token boundary: just before the last whitespace at or
    before that point (tokenizers attach a space to the word after it, so `alpha beta| gamma` continues with the
    model's own ` gamma` token), never inside a `<<...>>` annotation; '' (resample from the start) when there is
    no such boundary. One pass, linear in the text (a trace of a million `<<` included)."""
    position = int(len(reasoning) * fraction)
    last_open = last_close = best = -1  # the last `<<` and `>>` wholly before index i; the last good whitespace
    for i in range(min(position, len(reasoning) - 1) + 1):
        pair = reasoning[i - 2 : i] if i >= 2 else ""
        if pair == "<<":
            last_open = i - 2
        elif pair == ">>":
            last_close = i - 2
        if i > 0 and reasoning[i] in " \n" and not (last_open >= 0 and last_close < last_open):
            best = i
    return reasoning[:best].rstrip() if best > 0 else ""


def s_end_and_path(trajectories: list[dict]) -> list[dict]:
    """s_end, s_path and the checked equations of each trajectory of one question (pure; no model needed)."""
    equations = [find_equations(t["reasoning"]) for t in trajectories]
    results = [{e.result for e in eqs if e.result is not None} for eqs in equations]
    validity = [sum(e.holds for e in eqs) / len(eqs) if eqs else 0.0 for eqs in equations]
    scored = []
    for i, t in enumerate(trajectories):
        others = [j for j in range(len(trajectories)) if j != i]
        agreeing = [j for j in others if same_answer(trajectories[j]["answer"], t["answer"])]
        s_end = len(agreeing) / len(others) if others and t["answer"] is not None else 0.0
        overlap = sum(_jaccard(results[i], results[j]) for j in agreeing) / len(agreeing) if agreeing else 0.0
        scored.append(
            {
                "s_end": s_end,
                "s_path": validity[i] * overlap,
                "equations": [[e.lhs, e.rhs, e.holds] for e in equations[i]],
            }
        )
    return scored


def s_cf(
    trajectories: list[dict],
    generate: Optional[Generate],
    extract_answer: Callable[[str], Optional[str]],
    reward: RewardConfig,
) -> list[Optional[float]]:
    """Counterfactual robustness of each trajectory (None for all when reward.cf_samples is 0)."""
    if reward.cf_samples == 0 or generate is None:
        return [None] * len(trajectories)
    answered = [i for i, t in enumerate(trajectories) if t["answer"] is not None]
    prefixes = {i: cut(trajectories[i]["reasoning"], reward.cf_cut) for i in answered}
    continuations = generate([(i, prefixes[i]) for i in answered], reward.cf_samples) if answered else []
    scores: list[Optional[float]] = [0.0] * len(trajectories)
    for i, texts in zip(answered, continuations):
        same = sum(same_answer(extract_answer(prefixes[i] + text), trajectories[i]["answer"]) for text in texts)
        scores[i] = same / len(texts)
    return scores


def reference_scorer(
    *,
    question: str,
    gold: str,
    trajectories: list[dict],
    generate: Optional[Generate],
    extract_answer: Callable[[str], Optional[str]],
    reward: RewardConfig,
) -> list[dict]:
    """The reference coherence scorer (formulas in the module docstring)."""
    del question, gold  # part of the protocol; the reference scorer judges coherence among the paths only
    scored = s_end_and_path(trajectories)
    for components, value in zip(scored, s_cf(trajectories, generate, extract_answer, reward)):
        components["s_cf"] = value
    return scored


def scorer_rewards(values: list, trajectories: list[dict], target: str) -> list[dict]:
    """The records' fields from a reward-protocol scorer's return value (see the module docstring), checked: one
    finite number per trajectory, or a dict with one. `target` names the scorer in errors."""
    if not isinstance(values, (list, tuple)) or len(values) != len(trajectories):
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(
            f"reward.scorer {target} (reward.scorer_returns=reward) returned {got} values for {len(trajectories)} "
            "trajectories: return one reward per trajectory, in order"
        )
    out = []
    for i, value in enumerate(values):
        fields = dict(value) if isinstance(value, dict) else {"reward": value}
        number = fields.get("reward")
        coherent = fields.get("s_wm")
        for name, x, required in (("reward", number, True), ("s_wm", coherent, False)):
            if (x is None and required) or (
                x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x))
            ):
                raise ValueError(
                    f"reward.scorer {target} (reward.scorer_returns=reward) gave trajectory {i} the {name} {x!r}: "
                    "expected a finite number"
                )
        out.append({**fields, "s_end": None, "s_path": None, "s_cf": None, "reward": float(number), "s_wm": coherent})
    return out


def weighted(components: dict, reward: RewardConfig) -> Optional[float]:
    """s_wm: the weighted mean of the active components (a None component is inactive and its weight drops out); for a
    record a reward-protocol scorer scored (it carries its `reward`), the scorer's own s_wm, or None."""
    if components.get("reward") is not None:
        return components.get("s_wm")
    terms = [
        (reward.w_end, components["s_end"]),
        (reward.w_path, components["s_path"]),
        (reward.w_cf, components["s_cf"]),
    ]
    active = [(w, s) for w, s in terms if s is not None]
    total = sum(w for w, _ in active)
    return sum(w * s for w, s in active) / total if total > 0 else 0.0


def reward_of(record: dict, reward: RewardConfig) -> float:
    """alpha * correct + beta * s_wm - length_penalty * num_tokens / length_unit, from stored components; the stored
    `reward` of a record a reward-protocol scorer scored."""
    if record.get("reward") is not None:
        return record["reward"]
    return (
        reward.alpha * float(record["correct"])
        + reward.beta * weighted(record, reward)
        - reward.length_penalty * record["num_tokens"] / reward.length_unit
    )


def group_by_question(records: list[dict]) -> dict[str, list[dict]]:
    """Records grouped by `question_id`, in first-seen order."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        groups[record["question_id"]].append(record)
    return groups
