"""Regime W as a bandit: each question's samples go to the arms that earn reward, in one of two schedules.

`rollout.allocation=thompson` (rounds within each question): every question gets `rollout.budget` samples. Round 0
gives every arm its `rollout.floor`; the rest is split evenly over the remaining rounds. In round r > 0 each sample
goes to the arm whose draw from its reward posterior is highest (Thompson sampling).

`rollout.allocation=thompson_sequential` (the study's 8-armed bandit, at any budget, 8 samples over 8 arms included):
the questions are taken in waves, in rollout order. The warm-up wave (the first `rollout.warmup` share of them)
spreads each question's budget evenly over the arms (rotating where the budget does not divide); the rest are split
into `rollout.waves` waves, and each of their questions spends its whole budget on arms drawn from the posteriors
pooled over every earlier wave's questions. No arm has a per-question floor, so a budget smaller than the arm-set
runs too. A record's `round` is its wave.

Why Thompson rather than UCB: pooled statistics are the same for every question of a round, so UCB would send all of
them to one arm, while Thompson spreads the round's samples in proportion to how likely each arm is to be best, and it
stays seeded per question and round.

- Posterior of an arm: Gaussian, mean = its mean reward so far, standard deviation = the pooled standard deviation of
  all rewards over the square root of its count (`rollout.bandit_stats=pooled`: its rewards over all questions, the
  arm's quality; `question` (thompson only): the question's own rewards, with the pooled mean as one
  pseudo-observation).
- Reward of a trajectory for the bandit: `reward.*` applied to components scored round by round, each round's new
  trajectories together with the question's earlier ones, with `s_cf` left out (its continuations would be generated
  once per round); under `reward.scorer_returns=reward`, the scorer's reward. The records themselves are scored once
  at the end with the full scorer, all of a question's trajectories together, exactly as a uniform rollout's are.
- Reproducible: a question's draws in round r are seeded by (run seed, question, round); a trajectory's seed by
  (question, arm, its index among the arm's samples), as in a uniform rollout.
- Resumable and the same under N processes: round r's records go to `rounds.rank<p>.jsonl`, written a question at a
  time; every process finishes round r before any starts r + 1 (a barrier), and round r + 1's posteriors are computed
  from every process's round files, in question order, so they do not depend on the number of processes or on a
  restart. After a crash the complete (question, round) groups are kept and the rest is redone.

Records carry `round` and `allocation`. Must never change a uniform rollout: `rollout.py` runs that.
"""

import dataclasses
import functools
import json
import math
import random
from collections import defaultdict
from pathlib import Path

from hydra.utils import instantiate

from looper import coherence, distributed, models, scoring
from looper.artifacts import recover_jsonl
from looper.config import Config, RewardConfig
from looper.seeds import row_seed

ROUNDS = "rounds.rank*.jsonl"


def budget(cfg: Config) -> int:
    """Samples per question."""
    return cfg.rollout.budget or sum(arm.samples for arm in cfg.arms.values())


def plan(cfg: Config) -> list[int]:
    """Samples per question in each round: every arm's floor, then the rest as evenly as it divides."""
    first = cfg.rollout.floor * len(cfg.arms)
    rest, later = budget(cfg) - first, cfg.rollout.rounds - 1
    return [first] + [rest // later + (1 if k < rest % later else 0) for k in range(later)]


def sequential(cfg: Config) -> bool:
    """Whether the rounds are waves of questions (`thompson_sequential`) rather than rounds within each question."""
    return cfg.rollout.allocation == "thompson_sequential"


def sizes(cfg: Config) -> list[int]:
    """Samples a question gets in each round: `plan` within questions; a question's whole budget in its wave."""
    return [budget(cfg)] * (cfg.rollout.waves + 1) if sequential(cfg) else plan(cfg)


def waves(cfg: Config, everything: list[dict]) -> dict:
    """{question id: its wave} for `thompson_sequential`: the first `rollout.warmup` share of the questions (at least
    one) is wave 0, the rest split in order into `rollout.waves` waves of as equal size as they divide."""
    total = len(everything)
    warm = min(total, max(1, math.ceil(cfg.rollout.warmup * total)))
    rest = total - warm
    return {p["id"]: 0 if i < warm else 1 + (i - warm) * cfg.rollout.waves // rest for i, p in enumerate(everything)}


def even(cfg: Config, position: int) -> list[str]:
    """A warm-up question's arms: its budget spread evenly over the arms, starting where the previous question's
    stopped (`position`: the question's index in the rollout), so a budget that does not divide still evens out."""
    names = list(cfg.arms)
    count = budget(cfg)
    return [names[(position * count + k) % len(names)] for k in range(count)]


def provisional(cfg: Config) -> RewardConfig:
    """The reward settings a round scores with: `reward.cf_samples=0` (no continuations)."""
    return dataclasses.replace(cfg.reward, cf_samples=0)


def posteriors(cfg: Config, records: list[dict], order: dict) -> tuple[dict, float]:
    """({arm: (sum of rewards, count)}, pooled variance) of `records`, summed in question, arm and sample order (so
    the floats do not depend on which process wrote what)."""
    reward = provisional(cfg)
    ranked = sorted(records, key=lambda r: (order[r["question_id"]], r["arm"], r["sample"]))
    totals = {arm: [0.0, 0] for arm in cfg.arms}
    rewards = []
    for record in ranked:
        value = coherence.reward_of(record, reward)
        totals[record["arm"]][0] += value
        totals[record["arm"]][1] += 1
        rewards.append(value)
    mean = sum(rewards) / len(rewards) if rewards else 0.0
    variance = sum((v - mean) ** 2 for v in rewards) / max(len(rewards) - 1, 1)
    return {arm: (s, n) for arm, (s, n) in totals.items()}, max(variance, 1e-4)


def allocate(
    cfg: Config, question_id: str, round_: int, count: int, pooled: dict, variance: float, own: dict
) -> list[str]:
    """The arms of a question's `count` samples in `round_` (> 0), by Thompson sampling."""
    rng = random.Random(row_seed(cfg.seed, question_id, "allocation", round_))
    spread = math.sqrt(variance)
    beliefs = {}
    for arm, (total, n) in pooled.items():
        prior = total / n if n else 0.0
        if cfg.rollout.bandit_stats == "question":
            own_total, own_n = own.get(arm, (0.0, 0))
            beliefs[arm] = ((prior + own_total) / (1 + own_n), 1 + own_n)
        else:
            beliefs[arm] = (prior, max(n, 1))
    chosen = []
    for _ in range(count):
        draws = {arm: mean + spread / math.sqrt(n) * rng.gauss(0.0, 1.0) for arm, (mean, n) in beliefs.items()}
        chosen.append(max(draws, key=lambda arm: (draws[arm], arm)))
    return chosen


def read_rounds(out: Path, before: int) -> list[dict]:
    """Every process's records of the rounds before `before` in `out`. The other processes may be appending their
    records of round `before` meanwhile, so a line not yet ended by its newline is left out, like those records."""
    records = []
    for path in sorted(out.glob(ROUNDS)):
        text = path.read_text()
        records += [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line]
    return [r for r in records if r["round"] < before]


def complete_groups(path: Path, sizes: list[int]) -> list[dict]:
    """The records of `path` whose (question, round) group is complete; a torn line or a partial group is dropped."""

    def whole(records: list[dict]) -> list[dict]:
        counts = defaultdict(int)
        for r in records:
            counts[r["question_id"], r["round"]] += 1
        return [r for r in records if counts[r["question_id"], r["round"]] == sizes[r["round"]]]

    return recover_jsonl(path, whole)


def run_rounds(
    cfg: Config, problems: list[dict], everything: list[dict], out: Path, sampler, scorer, sample, per_call: int
) -> dict:
    """Spend this process's questions' budgets round by round (`problems`: this process's; `everything`: all of the
    rollout's, for the question order). `sample(chunk, arms, earlier, round_)` generates a chunk's trajectories
    ({question id: [trajectory, ...]}; `arms`: each question's arm names this round; `earlier`: its records so far),
    `per_call` questions at a time; `sampler()` gives the rollout's Sampler. Returns {question id: its trajectories of
    every round}, without the provisional components."""
    sizes_, order = sizes(cfg), {p["id"]: i for i, p in enumerate(everything)}
    wave = waves(cfg, everything) if sequential(cfg) else None
    path = out / f"rounds.rank{distributed.rank()}.jsonl"
    mine = defaultdict(list)
    for record in complete_groups(path, sizes_):
        mine[record["question_id"]].append(record)
    round_reward = provisional(cfg)
    for round_ in range(len(sizes_)):
        todo = [
            p
            for p in problems
            if (wave is None or wave[p["id"]] == round_) and not any(r["round"] == round_ for r in mine[p["id"]])
        ]
        if todo:
            # (round 0 reads nothing: another process may still be rewriting its file after a crash, `complete_groups`)
            pooled, variance = posteriors(cfg, read_rounds(out, round_) if round_ else [], order)
            arms = {}
            for p in todo:
                if round_ == 0 and wave is not None:
                    arms[p["id"]] = even(cfg, order[p["id"]])
                elif round_ == 0:
                    arms[p["id"]] = [name for name in cfg.arms for _ in range(cfg.rollout.floor)]
                else:
                    own, _ = posteriors(cfg, mine[p["id"]], order)
                    arms[p["id"]] = allocate(cfg, p["id"], round_, sizes_[round_], pooled, variance, own)
            with open(path, "a") as handle:
                for first in range(0, len(todo), per_call):
                    chunk = todo[first : first + per_call]
                    new = sample(chunk, arms, mine, round_)
                    for problem in chunk:
                        before = mine[problem["id"]]
                        trajectories = before + new[problem["id"]]
                        continuations = sampler().continuations(problem, trajectories)
                        scored = scoring.score_question(cfg, scorer, problem, trajectories, continuations, round_reward)
                        fresh = scored[len(before) :]
                        handle.write("".join(json.dumps(r) + "\n" for r in fresh))  # one write per question and round
                        handle.flush()
                        before.extend(fresh)
        distributed.barrier()  # every process has finished this round before any reads it
    components = set(coherence.COMPONENTS) | {"equations", "reward"}
    return {p["id"]: [{k: v for k, v in r.items() if k not in components} for r in mine[p["id"]]] for p in problems}


def sample_shard(cfg: Config, sft_dir: Path, problems: list[dict], everything: list[dict], shard: Path) -> None:
    """A bandit rollout of this process's `problems` into `shard`: the rounds, then every question's trajectories
    scored together with the full scorer (resumable: questions already in the shard are kept)."""
    total = budget(cfg)
    done = {r["question_id"] for r in scoring.read_complete(shard, total)}

    @functools.cache
    def sampler():  # (loaded once, and only when something is left to generate or score)
        model, tokenizer = models.load_for_generation(str(sft_dir), cfg.model, cfg.lora, cfg.generation)
        return scoring.Sampler(cfg, model, tokenizer, shard.parent / f"generation.rank{distributed.rank()}.jsonl")

    def sample(chunk: list[dict], arms: dict, earlier: dict, round_: int) -> dict:
        keys = []
        for problem in chunk:
            index = defaultdict(int, {a: sum(1 for r in earlier[problem["id"]] if r["arm"] == a) for a in cfg.arms})
            for name in arms[problem["id"]]:
                keys.append((problem, name, index[name], row_seed(cfg.seed, problem["id"], name, index[name])))
                index[name] += 1
        jobs = [(sampler().prompt(p["question"], cfg.arms[name]), cfg.arms[name], seed) for p, name, _, seed in keys]
        outputs = sampler().run(jobs)
        new = {}
        for problem in chunk:
            mine = [
                ((name, cfg.arms[name], k, seed), out) for (p, name, k, seed), out in zip(keys, outputs) if p is problem
            ]
            new[problem["id"]] = [
                {**t, "round": round_, "allocation": cfg.rollout.allocation}
                for t in scoring.trajectory_records(cfg, problem, mine)
            ]
        return new

    scorer = instantiate(cfg.reward.scorer, _partial_=True)
    per_call = max(1, cfg.rollout.batches_per_call * cfg.rollout.batch_size // total)
    trajectories = run_rounds(cfg, problems, everything, shard.parent, sampler, scorer, sample, per_call)
    todo = [p for p in problems if p["id"] not in done]
    with open(shard, "a") as handle:
        for first in range(0, len(todo), per_call):
            chunk = todo[first : first + per_call]
            for records in scoring.score_together(
                cfg, sampler(), scorer, chunk, [trajectories[p["id"]] for p in chunk]
            ):
                handle.write("".join(json.dumps(r) + "\n" for r in records))  # one write per question
                handle.flush()
