"""Sampling and scoring the trajectories of a rollout: what the uniform rollout (`looper/stages/rollout.py`) and the
bandit's rounds (`looper/bandit.py`) share.

Owns `Sampler` (the arms' prompts through one `Generator`, with generation figures), `Continuations` (the s_cf
resampling a scorer asks for), `score_question` (one question's records from the configured scorer), `score_together`
(several questions' scorers side by side, their continuation requests batched), `trajectory_records` (a question's
raw records from its outputs) and `read_complete` (a shard's whole questions after a crash). Must never decide which
arm samples how often: the allocation's module does.
"""

import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from looper import coherence, engine, prompts, throughput
from looper.answers import completion_flags, extract, is_correct
from looper.artifacts import recover_jsonl
from looper.config import ArmConfig, Config, RewardConfig
from looper.seeds import row_seed

log = logging.getLogger(__name__)

# the weights of the s_wm a record stores: the plain mean of its active components. Pairing, the bandit and the credit
# recompute s_wm with the run's `reward.w_*`, so the weights stay out of a uniform rollout's identity and a sweep over
# them reuses its trajectories.
STORED_WEIGHTS = RewardConfig(w_end=1.0, w_path=1.0, w_cf=1.0)


class Sampler:
    """Samples trajectories and continuations from one policy with the rollout's settings (`batch_size`,
    `max_new_tokens`, `arms`: another stage's, where it is not the rollout: online RL)."""

    def __init__(
        self,
        cfg: Config,
        model,
        tokenizer,
        figures: Optional[Path] = None,
        batch_size: Optional[int] = None,
        max_new_tokens: Optional[int] = None,
        arms: Optional[dict] = None,
    ):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.generator = engine.build(cfg.generation, model, tokenizer, batch_size or cfg.rollout.batch_size)
        self.max_new_tokens = max_new_tokens or cfg.rollout.max_new_tokens or cfg.model.max_new_tokens
        self.arms = arms if arms is not None else cfg.arms  # (continuations sample from their trajectory's arm)
        self.real_tokens = 0
        self.figures = figures  # where each generate call's figures go (looper/throughput.py)

    def prompt(self, question: str, arm: ArmConfig) -> str:
        return prompts.build_prompt(self.cfg.model, self.tokenizer, question, arm)

    def run(self, jobs: list[tuple[str, ArmConfig, int]], on_result=None, logprobs: bool = False):
        """Complete (prompt, arm, seed) jobs in batches; returns Generation objects in order (`on_result(i,
        generation)`: called as job i finishes, for progress; `logprobs`: with their ids and log-probs)."""
        prompts.check_context(
            self.generator.model,
            self.tokenizer,
            list(dict.fromkeys(p for p, _, _ in jobs)),
            self.max_new_tokens,
            "rollout",
        )
        outputs, figures = self.generator.generate(
            [
                engine.Request(prompt, self.max_new_tokens, arm.temperature, arm.top_p, seed)
                for prompt, arm, seed in jobs
            ],
            on_result=on_result,
            logprobs=logprobs,
        )
        self.real_tokens += sum(o.num_tokens for o in outputs)
        if self.figures is not None:
            throughput.record(self.figures, figures)
        return outputs

    def continuations(self, problem: dict, trajectories: list[dict]) -> "Continuations":
        """The `generate` callable of the scorer protocol for one question's trajectories."""
        return Continuations(self, problem, trajectories)


class Continuations:
    """`generate(requests, n)` of the scorer protocol: n seeded continuations of each (trajectory index, prefix)."""

    def __init__(self, sampler: Sampler, problem: dict, trajectories: list[dict]):
        self.sampler, self.problem, self.trajectories = sampler, problem, trajectories

    def jobs(self, requests: list[tuple[int, str]], n: int) -> list[tuple]:
        cfg, out = self.sampler.cfg, []
        for index, prefix in requests:
            t = self.trajectories[index]
            arm = self.sampler.arms[t["arm"]]
            out += [
                (
                    self.sampler.prompt(self.problem["question"], arm) + prefix,
                    arm,
                    row_seed(cfg.seed, t["question_id"], t["arm"], t["sample"], "cf", k),
                )
                for k in range(n)
            ]
        return out

    @staticmethod
    def split(texts: list[str], requests: int, n: int) -> list[list[str]]:
        return [texts[i * n : (i + 1) * n] for i in range(requests)]

    def __call__(self, requests: list[tuple[int, str]], n: int) -> list[list[str]]:
        return self.split([o.text for o in self.sampler.run(self.jobs(requests, n))], len(requests), n)


def score_question(
    cfg: Config, scorer, problem: dict, trajectories: list[dict], continuations, reward: Optional[RewardConfig] = None
) -> list[dict]:
    """One question's records: its trajectories with what the scorer returns (looper/coherence.py: the components
    protocol, then s_wm as the plain mean of the active components, `STORED_WEIGHTS`; or the reward protocol, then
    the scorer's reward). `reward`: the reward
    settings to score with, where they are not `cfg.reward` (a bandit's provisional rounds)."""
    reward = reward or cfg.reward
    if reward.scorer_returns == "reward":
        values = scorer(problem["question"], trajectories, problem["gold"])
        fields = coherence.scorer_rewards(values, trajectories, reward.scorer["_target_"])
        return [{**t, **f} for t, f in zip(trajectories, fields)]
    components = scorer(
        question=problem["question"],
        gold=problem["gold"],
        trajectories=trajectories,
        generate=continuations,
        extract_answer=lambda text: extract(text, cfg.rollout.answer_scorer, cfg.model.answer_after()),
        reward=reward,
    )
    records = []
    for t, c in zip(trajectories, components):
        if "reward" in c:
            raise ValueError(
                f"reward.scorer {reward.scorer['_target_']} returned a `reward` under "
                "reward.scorer_returns=components: set reward.scorer_returns=reward for a scorer that returns rewards"
            )
        record = {**t, **c}
        record["s_wm"] = coherence.weighted(record, STORED_WEIGHTS)
        records.append(record)
    return records


def score_together(
    cfg: Config, sampler: Sampler, scorer, problems: list[dict], trajectories: list[list[dict]]
) -> list[list[dict]]:
    """Score several questions side by side: each question's scorer runs in a thread of its own, and whenever every
    scorer still running is waiting for continuations (s_cf), all their requests are decoded in one batched call.
    So resampling costs a few large batches per chunk instead of a small one per question. Rows are seeded one by
    one, so the records are exactly those of scoring the questions one at a time. A scorer that computes for longer
    than `rollout.scorer_timeout_s` (time spent waiting for continuations not counted) fails the run, naming its
    question: a scorer stuck on one trajectory never stalls a rollout silently."""
    lock = threading.Condition()
    waiting: dict[int, tuple] = {}  # question index -> (jobs, slot for the outputs)
    finished: dict[int, object] = {}  # question index -> records, or the exception its scorer raised
    busy_since: dict[int, float] = {}  # question index -> when its scorer last started computing
    budget = cfg.rollout.scorer_timeout_s

    def batched(index: int):
        direct = sampler.continuations(problems[index], trajectories[index])

        def continue_(requests: list[tuple[int, str]], n: int) -> list[list[str]]:
            result: list = []
            with lock:
                waiting[index] = (direct.jobs(requests, n), result)
                busy_since.pop(index, None)
                lock.notify_all()
                lock.wait_for(lambda: index not in waiting)
                busy_since[index] = time.monotonic()
            return direct.split([o.text for o in result], len(requests), n)

        return continue_

    def work(index: int):
        try:
            outcome = score_question(cfg, scorer, problems[index], trajectories[index], batched(index))
        except BaseException as error:  # re-raised in the calling thread
            outcome = error
        with lock:
            finished[index] = outcome
            busy_since.pop(index, None)
            lock.notify_all()

    def overdue() -> Optional[int]:
        now = time.monotonic()
        return next((i for i, since in busy_since.items() if now - since > budget), None)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(problems))]
    with lock:
        busy_since.update({i: time.monotonic() for i in range(len(problems))})
    for thread in threads:
        thread.start()
    while True:
        with lock:
            while len(waiting) + len(finished) < len(problems):
                lock.wait(timeout=min(budget, 5.0))
                stuck = overdue()
                if stuck is not None:
                    raise RuntimeError(
                        f"rollout: the coherence scorer ({cfg.reward.scorer['_target_']}) spent more than "
                        f"rollout.scorer_timeout_s={budget:g} s on question {problems[stuck]['id']!r} without "
                        f"finishing: a scorer bug or a trajectory it cannot handle (raise the key only for a scorer "
                        f"that is slow by design)"
                    )
            if len(finished) == len(problems):
                break
            batch = dict(waiting)
        outputs = sampler.run([job for jobs, _ in batch.values() for job in jobs])
        with lock:
            for index, (jobs, result) in batch.items():
                result.extend(outputs[: len(jobs)])
                outputs = outputs[len(jobs) :]
                del waiting[index]
            lock.notify_all()
    for index in range(len(problems)):
        if isinstance(finished[index], BaseException):
            raise finished[index]
    return [finished[i] for i in range(len(problems))]


def trajectory_records(cfg: Config, problem: dict, outputs_by_job: list) -> list[dict]:
    out, after = [], cfg.model.answer_after()
    for (arm_name, arm, sample, seed), output in outputs_by_job:
        truncated = output.finish_reason == "length"
        out.append(
            {
                "question_id": problem["id"],
                "arm": arm_name,
                "family": arm.family,
                "sample": sample,
                "seed": seed,
                "question": problem["question"],
                "gold": problem["gold"],
                "text": output.text,
                "reasoning": coherence.split_reasoning(output.text, after),
                "answer": extract(output.text, cfg.rollout.answer_scorer, after, truncated),
                "correct": is_correct(output.text, problem["gold"], cfg.rollout.answer_scorer, after, truncated),
                "num_tokens": output.num_tokens,
                "finish_reason": output.finish_reason,
                **completion_flags(output.text, output.finish_reason, after),
            }
        )
    return out


def read_complete(path: Path, expected: int) -> list[dict]:
    """The records of a shard whose questions are complete (`expected` records each); a torn last line or a partly
    written last question is dropped, and the file is rewritten without it."""

    def whole_questions(records: list[dict]) -> list[dict]:
        counts = Counter(r["question_id"] for r in records)
        return [r for r in records if counts[r["question_id"]] == expected]

    return recover_jsonl(path, whole_questions)
