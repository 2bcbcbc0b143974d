"""A scorer plugged in through config alone (`reward.scorer._target_=tests.scorers.length_scorer`)."""


def length_scorer(*, question, gold, trajectories, generate, extract_answer, reward, unit=10):
    """Toy scorer: 'coherence' is 1 for the shortest text; `unit` comes from the config (reward.scorer.unit)."""
    shortest = min(len(t["text"]) for t in trajectories)
    return [
        {"s_end": float(len(t["text"]) == shortest), "s_path": unit / 100.0, "s_cf": None, "scored_by": "length"}
        for t in trajectories
    ]


def stuck_scorer(*, question, gold, trajectories, generate, extract_answer, reward, seconds=30.0):
    """A scorer that computes far too long (a pathological trajectory, a scorer bug)."""
    import time

    time.sleep(seconds)
    return [{"s_end": 0.0, "s_path": 0.0, "s_cf": None} for _ in trajectories]


def arm_scorer(*, question, gold, trajectories, generate, extract_answer, reward, favourite="equations"):
    """Scripted coherence: a trajectory of the `favourite` arm agrees fully (s_end 1), any other one not at all."""
    return [{"s_end": float(t["arm"] == favourite), "s_path": 0.0, "s_cf": None} for t in trajectories]


def longest_wins(question, trajectories, gold, per_char=0.01):
    """A scorer in the study plans' shape (`compute_reward(question, arm_outputs, gold_answer)`): one reward per
    trajectory, here its length in characters times `per_char` (reward.scorer.per_char)."""
    return [per_char * len(t["text"]) for t in trajectories]
