"""Per-arm credit: what each arm of a rollout spent and what it earned, uniform or bandit allocation alike.

Owns `arm_credit` (per arm: samples spent, accuracy, mean reward and components under the current `reward.*`, and the
share of preference pairs in which the arm's trajectory was chosen or rejected; per round, the samples each arm got),
its W&B table and chart, and the PNG (`arm_credit.png`). The preferences stage computes it, since that is where the
reward and the pairs exist; must never change a record or a pair.
"""

from collections import Counter
from pathlib import Path
from typing import Optional

from looper.coherence import COMPONENTS, reward_of, weighted
from looper.config import RewardConfig

PNG = "arm_credit.png"  # in the preferences artifact, and copied into the run directory


def _mean(values: list):
    return sum(values) / len(values) if values else None


def arm_credit(trajectories: list[dict], pairs: list[dict], reward: RewardConfig) -> dict:
    """{"arms": {arm: figures}, "rounds": [{arm: samples}, ...]} for a rollout's records and the pairs built from it."""
    arms = list(dict.fromkeys(r["arm"] for r in trajectories))
    chosen = Counter(p["chosen_components"]["arm"] for p in pairs)
    rejected = Counter(p["rejected_components"]["arm"] for p in pairs)
    figures = {}
    for arm in arms:
        rows = [{**r, "s_wm": weighted(r, reward)} for r in trajectories if r["arm"] == arm]
        figures[arm] = {
            "samples": len(rows),
            "share_of_samples": len(rows) / len(trajectories),
            "accuracy": _mean([float(r["correct"]) for r in rows]),
            "mean_reward": _mean([reward_of(r, reward) for r in rows]),
            **{f"mean_{c}": _mean([r[c] for r in rows if r.get(c) is not None]) for c in COMPONENTS},
            "mean_tokens": _mean([r["num_tokens"] for r in rows]),
            "chosen": chosen[arm],
            "rejected": rejected[arm],
            "chosen_share": chosen[arm] / len(pairs) if pairs else None,
            "rejected_share": rejected[arm] / len(pairs) if pairs else None,
        }
    rounds = sorted({r.get("round", 0) for r in trajectories})
    allocation = [
        {arm: sum(1 for r in trajectories if r.get("round", 0) == k and r["arm"] == arm) for arm in arms}
        for k in rounds
    ]
    return {"arms": figures, "rounds": allocation}


def log(tracker, credit: dict, png: Optional[Path]) -> None:
    """The credit as a W&B table (`preferences/arm_credit`), the allocation over rounds as a table and a line chart
    per arm (`preferences/allocation`, `preferences/allocation_chart`), and the PNG (`preferences/arm_credit_png`)."""
    if png is not None:
        tracker.image("preferences/arm_credit_png", png)
    tracker.table("preferences/arm_credit", [{"arm": arm, **figures} for arm, figures in credit["arms"].items()])
    rows = [
        {"round": k, "arm": arm, "samples": n} for k, counts in enumerate(credit["rounds"]) for arm, n in counts.items()
    ]
    tracker.table("preferences/allocation", rows)
    tracker.lines(
        "preferences/allocation_chart",
        list(range(len(credit["rounds"]))),
        {arm: [counts.get(arm, 0) for counts in credit["rounds"]] for arm in credit["arms"]},
        "samples per arm and round",
        "round",
    )
    tracker.summary(
        {
            f"preferences/arm/{arm}/{key}": value
            for arm, figures in credit["arms"].items()
            for key, value in figures.items()
            if isinstance(value, (int, float))
        }
    )


def plot(credit: dict, path: Path) -> Optional[Path]:
    """`arm_credit.png`: samples per arm and round (stacked), and each arm's accuracy, mean reward and pair shares;
    None for a single arm (nothing to compare: the stage's statistics say it all)."""
    if len(credit["arms"]) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(credit["arms"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    bottom = [0] * len(arms)
    for k, counts in enumerate(credit["rounds"]):
        values = [counts.get(arm, 0) for arm in arms]
        left.bar(arms, values, bottom=bottom, label=f"round {k}")
        bottom = [b + v for b, v in zip(bottom, values)]
    left.set_title("samples spent per arm")
    left.set_ylabel("trajectories")
    left.tick_params(axis="x", rotation=45)
    if len(credit["rounds"]) > 1:
        left.legend(fontsize=8)
    width = 0.2
    for j, (key, label) in enumerate(
        [
            ("accuracy", "accuracy"),
            ("mean_reward", "mean reward"),
            ("chosen_share", "share of pairs chosen"),
            ("rejected_share", "share of pairs rejected"),
        ]
    ):
        values = [credit["arms"][arm][key] or 0.0 for arm in arms]
        right.bar([i + (j - 1.5) * width for i in range(len(arms))], values, width, label=label)
    right.set_xticks(range(len(arms)), arms, rotation=45)
    right.set_title("what each arm earned")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
