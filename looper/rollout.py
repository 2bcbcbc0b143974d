"""Stage `rollout`: sample trajectories for each training question from every arm, score them for coherence.

Artifact: `trajectories.jsonl` — one record per question x arm x sample, sorted by (question, arm, sample), with the
raw score components so that rewards are recomputed later with the current `reward.*` (the stored `s_wm` uses the
weights of the run that made the artifact; preferences recompute it) — and `stats.json` (per-arm accuracy and mean
components, and how fast generation ran: looper/throughput.py).

Each (question, arm, sample) has its own seed, drawn from the run seed, and sampling is seeded per row
(looper/engine/sampling.py), so the records do not depend on batching, sharding or restarts. Records are written
question by question (flushed) to this process's shard `trajectories.rank<r>.jsonl`; a restart keeps the questions
already complete in it and drops a torn or partial last question. Under `accelerate launch`, process r takes questions
r, r + world, ...; when every process is done, rank 0 merges the shards, sorted and de-duplicated.
"""

import json
import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional

from hydra.utils import instantiate
from tqdm.auto import tqdm

from looper import coherence, distributed, engine, models, throughput, tracking
from looper.answers import completion_flags, extract, is_correct
from looper.artifacts import TRAJECTORIES, read_jsonl, recover_jsonl
from looper.config import ArmConfig, Config, identity
from looper.data import load_splits
from looper.engine.sampling import row_seed

log = logging.getLogger(__name__)


class Sampler:
    """Samples trajectories and continuations from one policy with the rollout's settings."""

    def __init__(self, cfg: Config, model, tokenizer, figures: Optional[Path] = None):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.generator = engine.build(cfg.generation, model, tokenizer, cfg.rollout.batch_size)
        self.max_new_tokens = cfg.rollout.max_new_tokens or cfg.model.max_new_tokens
        self.real_tokens = 0
        self.figures = figures  # where each generate call's figures go (looper/throughput.py)

    def prompt(self, question: str, arm: ArmConfig) -> str:
        return models.build_prompt(self.cfg.model, self.tokenizer, question, arm)

    def run(self, jobs: list[tuple[str, ArmConfig, int]]):
        """Complete (prompt, arm, seed) jobs in batches; returns Generation objects in order."""
        models.check_context(
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
            ]
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
            arm = cfg.arms[t["arm"]]
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


def _score_question(cfg: Config, scorer, problem: dict, trajectories: list[dict], continuations) -> list[dict]:
    """One question's records: its trajectories with what the scorer returns (looper/coherence.py: the components
    protocol, then s_wm from reward.w_*; or the reward protocol, then the scorer's reward)."""
    if cfg.reward.scorer_returns == "reward":
        values = scorer(problem["question"], trajectories, problem["gold"])
        fields = coherence.scorer_rewards(values, trajectories, cfg.reward.scorer["_target_"])
        return [{**t, **f} for t, f in zip(trajectories, fields)]
    components = scorer(
        question=problem["question"],
        gold=problem["gold"],
        trajectories=trajectories,
        generate=continuations,
        extract_answer=lambda text: extract(text, cfg.rollout.answer_scorer, cfg.model.answer_after()),
        reward=cfg.reward,
    )
    records = []
    for t, c in zip(trajectories, components):
        if "reward" in c:
            raise ValueError(
                f"reward.scorer {cfg.reward.scorer['_target_']} returned a `reward` under "
                "reward.scorer_returns=components: set reward.scorer_returns=reward for a scorer that returns rewards"
            )
        record = {**t, **c}
        record["s_wm"] = coherence.weighted(record, cfg.reward)
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
            outcome = _score_question(cfg, scorer, problems[index], trajectories[index], batched(index))
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


def _trajectories(cfg: Config, problem: dict, outputs_by_job: list) -> list[dict]:
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


def _sample_shard(cfg: Config, sft_dir: Path, problems: list[dict], shard: Path) -> None:
    per_question = sum(arm.samples for arm in cfg.arms.values())
    done = {r["question_id"] for r in read_complete(shard, per_question)}
    todo = [p for p in problems if p["id"] not in done]
    if done:
        log.info("rollout: resuming, %d of %d questions of this process already done", len(done), len(problems))
    if not todo:
        return
    model, tokenizer = models.load_for_generation(str(sft_dir), cfg.model, cfg.lora, cfg.generation.dequantize)
    sampler = Sampler(cfg, model, tokenizer, shard.parent / f"generation.rank{distributed.rank()}.jsonl")
    scorer = instantiate(cfg.reward.scorer, _partial_=True)
    # several batches' worth of rows per generate call, so slots freed by short trajectories are refilled and the
    # drain at the end of a call (ever fewer rows a step) weighs little (measured in docs/performance.md). Records
    # are written per call, so a crash loses at most one call's work.
    questions_per_batch = max(1, cfg.rollout.batches_per_call * cfg.rollout.batch_size // per_question)
    start, tracker = time.time(), tracking.current()
    with open(shard, "a") as handle, tqdm(total=len(problems), initial=len(done), unit="q", desc="rollout") as bar:
        for first in range(0, len(todo), questions_per_batch):
            chunk = todo[first : first + questions_per_batch]
            keys = [
                (p, name, arm, k, row_seed(cfg.seed, p["id"], name, k))
                for p in chunk
                for name, arm in cfg.arms.items()
                for k in range(arm.samples)
            ]
            outputs = sampler.run([(sampler.prompt(p["question"], arm), arm, seed) for p, _, arm, _, seed in keys])
            trajectories = [
                _trajectories(
                    cfg,
                    problem,
                    [
                        ((name, arm, k, seed), out)
                        for (p, name, arm, k, seed), out in zip(keys, outputs)
                        if p is problem
                    ],
                )
                for problem in chunk
            ]
            for records in score_together(cfg, sampler, scorer, chunk, trajectories):
                handle.write("".join(json.dumps(r) + "\n" for r in records))  # one write per question
                handle.flush()
                bar.update(1)
            elapsed = max(time.time() - start, 1e-9)
            bar.set_postfix(
                q_per_s=f"{(bar.n - len(done)) / elapsed:.2f}", tok_per_s=f"{sampler.real_tokens / elapsed:.0f}"
            )
            accuracy = [r["correct"] for records in trajectories for r in records]
            tracker.log(  # live progress of this process's shard (the W&B run is rank 0's)
                {
                    "rollout/progress/questions": bar.n,
                    "rollout/progress/share": bar.n / len(problems),
                    "rollout/progress/tokens_per_s": sampler.real_tokens / elapsed,
                    "rollout/progress/accuracy": sum(accuracy) / max(len(accuracy), 1),
                }
            )


def merge_shards(out: Path, problems: list[dict], arm_names: list[str]) -> list[dict]:
    """All shards' records, de-duplicated by (question, arm, sample) and sorted in question and arm order."""
    question_order = {p["id"]: i for i, p in enumerate(problems)}
    arm_order = {name: i for i, name in enumerate(arm_names)}
    unique = {}
    for shard in sorted(out.glob("trajectories.rank*.jsonl")):
        for line in shard.read_text().splitlines():
            record = json.loads(line)
            unique.setdefault((record["question_id"], record["arm"], record["sample"]), record)
    return sorted(unique.values(), key=lambda r: (question_order[r["question_id"]], arm_order[r["arm"]], r["sample"]))


def _mean(values: list):
    return sum(values) / len(values) if values else None


def arm_stats(records: list[dict]) -> dict:
    """Per-arm and overall accuracy, answer agreement (mean s_end), mean tokens and mean components."""

    def summary(rows):
        return {
            "trajectories": len(rows),
            "accuracy": _mean([r["correct"] for r in rows]),
            "answered": _mean([r["answer"] is not None for r in rows]),
            "truncated": _mean([r["finish_reason"] == "length" for r in rows]),
            "mean_tokens": _mean([r["num_tokens"] for r in rows]),
            **{f"mean_{c}": _mean([r[c] for r in rows if r.get(c) is not None]) for c in coherence.COMPONENTS},
        }

    arms = list(dict.fromkeys(r["arm"] for r in records))
    by_question = coherence.group_by_question(records)
    return {
        "questions": len(by_question),
        "questions_with_a_correct_trajectory": sum(any(r["correct"] for r in rs) for rs in by_question.values()),
        "overall": summary(records),
        "arms": {a: summary([r for r in records if r["arm"] == a]) for a in arms},
    }


def _log(tracker, stats: dict, records: list[dict]) -> None:
    tracker.summary(
        {
            "rollout/accuracy": stats["overall"]["accuracy"],
            "rollout/questions": stats["questions"],
            "rollout/truncated": stats["overall"].get("truncated"),
        }
    )
    tracker.summary(throughput.metrics("rollout", stats.get("generation", {})))
    tracker.summary(
        {
            f"rollout/{arm}/{key}": value
            for arm, s in stats["arms"].items()
            for key, value in s.items()
            if key in ("accuracy", "mean_s_end", "mean_s_wm", "mean_tokens")
        }
    )

    tracker.histograms(
        {f"rollout/hist_{c}": [r[c] for r in records if r.get(c) is not None] for c in coherence.COMPONENTS}
    )
    columns = (
        "question_id",
        "arm",
        "family",
        "sample",
        "text",
        "answer",
        "correct",
        "num_tokens",
        "truncated",
        "s_end",
        "s_path",
        "s_cf",
        "s_wm",
    )
    tracker.table("rollout/trajectories", [{c: r.get(c) for c in columns} for r in records[:200]])


def _build(cfg: Config, sft_dir: Path, out: Path) -> None:
    problems = load_splits(cfg.data)["train"][: cfg.rollout.num_questions]
    rank, world = distributed.rank(), distributed.world_size()
    shard = out / f"trajectories.rank{rank}.jsonl"
    if cfg.rollout.allocation == "uniform":
        _sample_shard(cfg, sft_dir, problems[rank::world], shard)
    else:
        from looper import bandit  # (the bandit's rounds: looper/bandit.py)

        bandit.sample_shard(cfg, sft_dir, problems[rank::world], problems, shard)
    distributed.barrier()
    if not distributed.is_main_process():
        return
    records = merge_shards(out, problems, list(cfg.arms))
    with open(out / TRAJECTORIES, "w") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in records))
    stats = {**arm_stats(records), "generation": throughput.summary(out)}
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    _log(tracking.current(), stats, records)
    log.info(
        "rollout: %d trajectories over %d questions (%d processes), accuracy %.3f",
        len(records),
        stats["questions"],
        world,
        stats["overall"]["accuracy"],
    )
    throughput.report_truncation(
        "rollout", stats["overall"]["truncated"], "rollout.max_new_tokens", cfg.model.reasoning == "think"
    )


# rollout keys an allocation never reads: kept out of its identity, so setting them rebuilds nothing
UNUSED = {
    "uniform": ("budget", "rounds", "floor", "warmup", "waves", "bandit_stats"),
    "thompson": ("warmup", "waves"),
    "thompson_sequential": ("rounds", "floor", "bandit_stats"),
}
NEEDS = ("sft",)  # the artifacts this stage builds on (looper/pipeline.py resolves them)
ENSURE = {"resumable": True, "collective": True}  # kept across crashes; every process samples its shard


def spec(cfg: Config, up: dict, store=None) -> dict:
    """What determines the trajectories: the policy (and, over a quantized base, how it is served), arms, sampling,
    decoding and the scorer; under uniform allocation not alpha, beta, the length penalty or the w_* weights (applied
    later to the stored components; a bandit allocates by them, so there they count), nor a setting marked
    `identity=False` in the schema (batching, the scorer's time budget: no record depends on them)."""
    return {
        "sft": Path(up["sft"]).name,
        "arms": cfg.arms,
        "rollout": {k: v for k, v in identity(cfg.rollout).items() if k not in UNUSED[cfg.rollout.allocation]},
        "generation": identity(cfg.generation),
        "model": identity(cfg.model),
        "data": identity(cfg.data),
        "seed": cfg.seed,
        # a bandit allocates by the full reward, so its trajectories depend on all of it; a uniform rollout's only on
        # the keys computed while scoring (the rest is applied later to the stored components)
        "scoring": identity(cfg.reward, scoring=cfg.rollout.allocation == "uniform"),
        **({"served": served} if (served := models.served_as(cfg.lora, cfg.generation.dequantize)) else {}),
    }


def build(cfg: Config, up: dict, out: Path) -> None:
    """Sample and score trajectories from the SFT policy into `out`."""
    _build(cfg, Path(up["sft"]), out)


def read_trajectories(rollout_dir: Path) -> list[dict]:
    """The records of a rollout artifact."""
    return read_jsonl(rollout_dir / TRAJECTORIES)
