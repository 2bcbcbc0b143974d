"""Stage `rollout`: sample trajectories for each training question from every arm, score them for coherence.

Artifact: `trajectories.jsonl` — one record per question x arm x sample, sorted by (question, arm, sample), with the
raw score components so that rewards are recomputed later with the current `reward.*` (the stored `s_wm` is the
plain mean of the active components, `scoring.STORED_WEIGHTS`; pairing, the bandit and the credit recompute it with
`reward.w_*`) — and `stats.json` (per-arm accuracy and mean components, and how fast generation ran:
looper/throughput.py).

Each (question, arm, sample) has its own seed, drawn from the run seed, and sampling is seeded per row
(looper/engine/sampling.py), so the records do not depend on batching, sharding or restarts. Records are written
question by question (flushed) to this process's shard `trajectories.rank<r>.jsonl`; a restart keeps the questions
already complete in it and drops a torn or partial last question. Under `accelerate launch`, process r takes questions
r, r + world, ...; when every process is done, rank 0 merges the shards, sorted and de-duplicated.
"""

import json
import logging
import time
from collections import Counter
from pathlib import Path

from hydra.utils import instantiate
from tqdm.auto import tqdm

from looper import bandit, coherence, distributed, models, throughput, tracking
from looper.artifacts import TRAJECTORIES, read_jsonl
from looper.config import Config
from looper.data import load_splits
from looper.models import SERVED_MODEL, served_reads
from looper.scoring import Sampler, read_complete, score_together, trajectory_records
from looper.seeds import row_seed

log = logging.getLogger(__name__)


def _sample_shard(cfg: Config, sft_dir: Path, problems: list[dict], shard: Path) -> None:
    per_question = sum(arm.samples for arm in cfg.arms.values())
    done = {r["question_id"] for r in read_complete(shard, per_question)}
    todo = [p for p in problems if p["id"] not in done]
    if done:
        log.info("rollout: resuming, %d of %d questions of this process already done", len(done), len(problems))
    if not todo:
        return
    model, tokenizer = models.load_for_generation(str(sft_dir), cfg.model, cfg.lora, cfg.generation)
    sampler = Sampler(cfg, model, tokenizer, shard.parent / f"generation.rank{distributed.rank()}.jsonl")
    scorer = instantiate(cfg.reward.scorer, _partial_=True)
    # several batches' worth of rows per generate call, so slots freed by short trajectories are refilled and the
    # drain at the end of a call (ever fewer rows a step) weighs little (measured in docs/performance.md). Records
    # are written per call, so a crash loses at most one call's work.
    questions_per_batch = max(1, cfg.rollout.batches_per_call * cfg.rollout.batch_size // per_question)
    start, tracker = time.time(), tracking.current()
    with (
        open(shard, "a") as handle,
        tqdm(total=len(problems), initial=len(done), unit="q", desc="rollout: questions sampled") as bar,
    ):
        for first in range(0, len(todo), questions_per_batch):
            chunk = todo[first : first + questions_per_batch]
            keys = [
                (p, name, arm, k, row_seed(cfg.seed, p["id"], name, k))
                for p in chunk
                for name, arm in cfg.arms.items()
                for k in range(arm.samples)
            ]
            left = Counter(p["id"] for p, *_ in keys)  # rows still generating, per question: the bar moves as each ends

            def sampled(i: int, _, keys=keys, left=left) -> None:
                left[keys[i][0]["id"]] -= 1
                if not left[keys[i][0]["id"]]:
                    bar.update(1)

            jobs = [(sampler.prompt(p["question"], arm), arm, seed) for p, _, arm, _, seed in keys]
            outputs = sampler.run(jobs, on_result=sampled)
            trajectories = [
                trajectory_records(
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
    else:  # (the bandit's rounds: looper/bandit.py)
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
    "thompson_sequential": ("rounds", "floor"),  # (bandit_stats: always pooled here, the schema checks)
}
# reward keys a uniform rollout never reads: applied later to the stored components (a bandit allocates by them)
APPLIED_LATER = ("alpha", "beta", "length_penalty", "length_unit", "w_end", "w_path", "w_cf")
NEEDS = ("sft",)  # the artifacts this stage builds on (looper/pipeline.py resolves them)
ENSURE = {"resumable": True, "collective": True}  # kept across crashes; every process samples its shard


def READS(cfg: Config) -> tuple:
    """What determines the trajectories: the arms, the rollout section (less the keys its allocation never reads),
    the problems, the prompt format and limit, how the policy is served, and the reward: under a bandit all of it (it
    allocates by the reward), under uniform allocation only what scoring computes."""
    uniform = cfg.rollout.allocation == "uniform"
    return (
        "seed",
        "data",
        "arms",
        "rollout",
        *(f"-rollout.{key}" for key in UNUSED[cfg.rollout.allocation]),
        *SERVED_MODEL,
        *served_reads(cfg),
        "reward",
        *(f"-reward.{key}" for key in APPLIED_LATER if uniform),
    )


def build(cfg: Config, up: dict, out: Path) -> None:
    """Sample and score trajectories from the SFT policy into `out`."""
    _build(cfg, Path(up["sft"]), out)


def read_trajectories(rollout_dir: Path) -> list[dict]:
    """The records of a rollout artifact."""
    return read_jsonl(rollout_dir / TRAJECTORIES)
