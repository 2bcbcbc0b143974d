"""Stage `eval`: batched evaluation of `eval.targets` on `eval.datasets`, every scorer side by side.

Greedy by default (the study's protocol); `eval.temperature` > 0 samples `eval.samples` answers per question, each
row seeded by (run seed, question, sample) like rollouts. A reasoning model's answers are read after its think block
(looper/answers.py); every record says whether it was `truncated` at the token limit. A sweep's objective is read from
a dev split (`objective_dataset`), evaluated for the last target even when `eval.datasets` does not list it, so a
sweep never selects on a test set.

One artifact per (target, dataset) — `predictions.jsonl`, `summary.json` (accuracies, and how fast generation ran:
looper/throughput.py) and, when asked, `batch_consistency.json` — so the base and SFT evaluations are computed once
and shared by every DPO run of a sweep (the design's single eval directory per run would redo them). Predictions are
appended as batches finish, so an interrupted evaluation resumes where it stopped; under `accelerate launch` the
questions are split over the processes and rank 0 merges them. The comparison across targets (`report.md` with
intervals and paired tests, `accuracy.png`, `eval_table.md`) goes to the Hydra run directory; see
looper/eval_report.py.
"""

import functools
import json
import logging
import random
from pathlib import Path
from typing import Callable, Optional

from looper import distributed, engine, eval_dashboard, eval_report, models, prompts, throughput, tracking
from looper.answers import completion_flags, extract, is_correct, math_verify_available
from looper.artifacts import PREDICTIONS, ArtifactStore, read_jsonl, recover_jsonl
from looper.config import Config, DataConfig, ModelConfig
from looper.data import gold_from_solution, gsm8k_splits, load_hub_dataset, load_splits, read_gsm8k_jsonl
from looper.models import SERVED_MODEL, served_reads
from looper.seeds import row_seed

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------- datasets


def _gsm8k_data(cfg: Config) -> DataConfig:
    return cfg.data if cfg.data.name == "gsm8k" else DataConfig(name="gsm8k")


def eval_problems(name: str, cfg: Config, limit: bool = True) -> list[dict]:
    """The problems of an eval dataset by name (the first `eval.num_questions` of them, unless not `limit`)."""
    if name.startswith("synthetic_"):
        if cfg.data.name != "synthetic":
            raise ValueError(f"eval.datasets: {name} needs data=synthetic (data.name is {cfg.data.name!r})")
        rows = load_splits(cfg.data)[name.split("_", 1)[1]]
    elif name == "gsm8k_platinum":
        rows = read_gsm8k_jsonl(Path(cfg.eval.platinum_path), "platinum") if cfg.eval.platinum_path else _platinum_hub()
    else:
        rows = gsm8k_splits(_gsm8k_data(cfg))[name.split("_", 1)[1]]
    return rows[: cfg.eval.num_questions] if limit else rows


def _platinum_hub() -> list[dict]:
    loaded = load_hub_dataset(
        "madrylab/gsm8k-platinum", "eval.platinum_path", "GSM8K-Platinum's test JSONL", split="test"
    )
    return [
        {
            "id": f"platinum-{i}",
            "question": r["question"],
            "answer": r["answer"],
            "gold": gold_from_solution(r["answer"]),
            "cleaning_status": r.get("cleaning_status"),
        }
        for i, r in enumerate(loaded)
    ]


def shot_pool(name: str, cfg: Config) -> list[dict]:
    """`eval.shots` + 1 seeded examples from the training split that matches the dataset (one spare, so that a
    question is never its own example)."""
    if cfg.eval.shots == 0:
        return []
    return random.Random(cfg.eval.shots_seed).sample(shot_pool_source(name, cfg), cfg.eval.shots + 1)


def shot_pool_source(name: str, cfg: Config) -> list[dict]:
    """The training split that a dataset's k-shot examples are drawn from."""
    return load_splits(cfg.data)["train"] if name.startswith("synthetic_") else gsm8k_splits(_gsm8k_data(cfg))["train"]


def prompt_for(cfg: Config, tokenizer, problem: dict, pool: list[dict]) -> str:
    """The eval prompt of one problem: the model's format, optional k-shot examples, optional official prompt."""
    shots = [s for s in pool if s["question"] != problem["question"]][: cfg.eval.shots]
    return prompts.build_prompt(
        cfg.model, tokenizer, problem["question"], shots=shots, official=cfg.eval.prompt == "platinum"
    )


# ---------------------------------------------------------------------------------------------------------- decoding


def scored(
    problem: dict,
    text: str,
    num_tokens: int,
    finish_reason: str,
    scorers: list[str],
    model: ModelConfig,
    sample: Optional[int] = None,
) -> dict:
    """One per-example record: the completion, `truncated` (and `think_closed` for a reasoning `model`), and every
    scorer's prediction and verdict; `sample` numbers one of several sampled answers to the question."""
    record = {
        "id": problem["id"],
        "question": problem["question"],
        "gold": problem["gold"],
        "completion": text,
        "num_tokens": num_tokens,
        "finish_reason": finish_reason,
        "cleaning_status": problem.get("cleaning_status"),
    }
    if sample is not None:
        record["sample"] = sample
    after, truncated = model.answer_after(), finish_reason == "length"
    record.update(completion_flags(text, finish_reason, after))
    for scorer in scorers:
        record[f"pred_{scorer}"] = extract(text, scorer, after, truncated)
        record[f"correct_{scorer}"] = is_correct(text, problem["gold"], scorer, after, truncated)
    return record


def active_scorers(cfg: Config) -> list[str]:
    """`eval.scorers`, less math_verify (with a warning) when Math-Verify is not installed."""
    scorers = list(cfg.eval.scorers)
    if "math_verify" in scorers and not math_verify_available():
        log.warning("eval: scorer math_verify skipped: Math-Verify is not installed (pip install 'looper[math]')")
        scorers.remove("math_verify")
    return scorers


def _max_new_tokens(cfg: Config) -> int:
    return cfg.eval.max_new_tokens or cfg.model.max_new_tokens


def batch_consistency(cfg: Config, model, tokenizer, prompts: list[str]) -> dict:
    """Greedy outputs of `prompts` decoded one at a time and in one batch; any difference points at padding or
    attention-mask handling."""
    requests = [engine.Request(p, _max_new_tokens(cfg)) for p in prompts]
    alone, _ = engine.build(cfg.generation, model, tokenizer, 1).generate(requests, desc="batch check: one at a time")
    together, _ = engine.build(cfg.generation, model, tokenizer, len(prompts)).generate(
        requests, desc="batch check: batched"
    )
    differ = [
        {"prompt": p, "alone": a.text, "batched": b.text}
        for p, a, b in zip(prompts, alone, together)
        if a.text != b.text
    ]
    return {"checked": len(prompts), "differ": len(differ), "examples": differ[:10]}


def _decode_shard(
    cfg: Config,
    target: str,
    load,
    dataset: str,
    problems: list[dict],
    shard: Path,
    pool: list[dict],
    scorers: list[str],
) -> None:
    """Decode this process's problems (each `eval.samples` times) into its shard, appending a flushed answer at a
    time (resumable)."""
    done = recover_jsonl(shard)
    finished = {(r["id"], r.get("sample", 0)) for r in done}
    samples = cfg.eval.samples
    todo = [(p, k) for p in problems for k in range(samples) if (p["id"], k) not in finished]
    if done:
        log.info("eval %s/%s: resuming, %d of %d already done", dataset, target, len(done), len(problems) * samples)
    if not todo:
        return
    model, tokenizer = load()
    tracker, total, every = tracking.current(), len(problems) * samples, max(1, len(todo) // 20)
    with open(shard, "a") as handle:

        def write(index: int, output) -> None:  # as each answer finishes: a crash loses only unfinished questions
            problem, sample = todo[index]
            written.append(index)
            if len(written) % every == 0 or len(written) == len(todo):  # live progress, about 20 points a cell
                answered = len(done) + len(written)
                tracker.log(
                    {f"eval/{dataset}/{target}/progress/answers": answered, "eval/progress/share": answered / total}
                )
            handle.write(
                json.dumps(
                    scored(
                        problem,
                        output.text,
                        output.num_tokens,
                        output.finish_reason,
                        scorers,
                        cfg.model,
                        sample if samples > 1 else None,
                    )
                )
                + "\n"
            )
            handle.flush()

        written: list[int] = []
        texts = {p["id"]: prompt_for(cfg, tokenizer, p, pool) for p in problems}
        prompts.check_context(model, tokenizer, list(texts.values()), _max_new_tokens(cfg), f"eval {dataset}")
        sampled = cfg.eval.temperature > 0
        requests = [
            engine.Request(
                texts[p["id"]],
                _max_new_tokens(cfg),
                cfg.eval.temperature,
                cfg.eval.top_p if sampled else 1.0,  # (greedy decoding reads no nucleus mass)
                row_seed(cfg.seed, p["id"], "eval", k) if sampled else 0,
            )
            for p, k in todo
        ]
        generator = engine.build(cfg.generation, model, tokenizer, cfg.eval.batch_size)
        _, figures = generator.generate(
            requests,
            on_result=write,
            desc=f"eval {target} on {dataset} ({len(done)} of {len(problems) * samples} done before)",
        )
    throughput.record(shard.parent / f"generation.rank{distributed.rank()}.jsonl", figures)


def build(cfg: Config, target: str, target_path: str, dataset: str, out: Path) -> None:
    """Each process decodes questions rank, rank + world, ... into `predictions.rank<r>.jsonl`; rank 0 then merges
    them in question order into `predictions.jsonl` and writes the summary (and runs the batch check)."""
    problems = eval_problems(dataset, cfg)
    pool = shot_pool(dataset, cfg)
    scorers = active_scorers(cfg)
    rank, world = distributed.rank(), distributed.world_size()
    load = functools.cache(  # at most once, if needed
        lambda: models.load_for_generation(target_path, cfg.model, cfg.lora, cfg.generation)
    )
    _decode_shard(
        cfg, target, load, dataset, problems[rank::world], out / f"predictions.rank{rank}.jsonl", pool, scorers
    )
    distributed.barrier()
    if not distributed.is_main_process():
        return
    if cfg.eval.check_batch_consistency and not (out / "batch_consistency.json").exists():
        model, tokenizer = load()
        sample = [prompt_for(cfg, tokenizer, p, pool) for p in problems[: cfg.eval.check_batch_consistency]]
        check = batch_consistency(cfg, model, tokenizer, sample)
        (out / "batch_consistency.json").write_text(json.dumps(check, indent=2))
        if check["differ"]:
            log.warning(
                "eval %s/%s: %d of %d greedy outputs differ between batched and one-at-a-time decoding",
                dataset,
                target,
                check["differ"],
                check["checked"],
            )
    by_key = {
        (r["id"], r.get("sample", 0)): r
        for shard in sorted(out.glob("predictions.rank*.jsonl"))
        for r in recover_jsonl(shard)
    }
    records = [by_key[(p["id"], k)] for p in problems for k in range(cfg.eval.samples) if (p["id"], k) in by_key]
    (out / PREDICTIONS).write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {
        "target": target,
        "target_path": target_path,
        "dataset": dataset,
        **eval_report.accuracy_summary(records, scorers),
        "generation": throughput.summary(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


# ---------------------------------------------------------------------------------------------------------- stage


ENSURE = {"resumable": True, "collective": True}  # kept across crashes; every process decodes its share


def READS(cfg: Config, dataset: str) -> tuple:
    """What changes the predictions of a model on `dataset`: the eval section (not its sampling keys under greedy
    decoding, nor `eval.scorers`: the cell's identity names the scorers that ran, `active_scorers`), the prompt format
    and limit, how the model is served, and where the problems come from."""
    greedy, platinum = cfg.eval.temperature == 0, dataset == "gsm8k_platinum"
    return (
        "eval",
        "-eval.scorers",
        *(("-eval.top_p",) if greedy else ("seed",)),
        *(() if platinum else ("-eval.platinum_path", "data")),
        *SERVED_MODEL,
        *served_reads(cfg),
    )


def read_predictions(artifact: Path) -> list[dict]:
    """The per-example records of an eval artifact."""
    return read_jsonl(artifact / PREDICTIONS)


def objective_dataset(cfg: Config) -> str:
    """The dataset a sweep selects on: `eval.select_on`, else the dev split of the data (a test set only where
    eval.select_on_test allows it: the schema checks, preflight warns)."""
    return cfg.eval.select_on or f"{cfg.data.name}_dev"


def run(
    cfg: Config,
    store: ArtifactStore,
    target_path: Callable[[str], str],
    evaluate: Callable[[str, str, str], Path],
    run_dir: Optional[Path] = None,
) -> list[dict]:
    """Evaluate every target on every dataset, and the last target on the objective's dataset when it is not among
    them (`target_path(target)`: its model directory, built first where it is a stage's artifact;
    `evaluate(target, dataset, path)`: the cell's artifact; both `pipeline.Pipeline`'s); writes the report to
    `run_dir`; returns the per-artifact summaries."""
    cells = [(dataset, target) for dataset in cfg.eval.datasets for target in cfg.eval.targets]
    selected_on = objective_dataset(cfg)
    if selected_on not in cfg.eval.datasets:
        cells.append((selected_on, cfg.eval.targets[-1]))
    paths = {target: target_path(target) for target in cfg.eval.targets}  # built first
    tracker = tracking.current()  # the job's W&B run
    for target, path in paths.items():  # the models evaluated, as the run's inputs
        if Path(path).is_dir():
            tracker.used(target if target in ("base", "sft", "dpo", "grpo") else "model", Path(path))
    results = []
    for dataset, target in cells:
        artifact = evaluate(target, dataset, paths[target])
        (tracker.produced if artifact in store.made else tracker.used)("eval", artifact)
        summary = json.loads((artifact / "summary.json").read_text())
        results.append({**summary, "target": target, "artifact": str(artifact)})
        if artifact in store.made:  # (a reused evaluation's truncation was reported when it was made)
            throughput.report_truncation(
                f"eval {target} on {dataset}",
                summary.get("truncated"),
                "eval.max_new_tokens",
                cfg.model.reasoning == "think",
            )
    if not distributed.is_main_process():
        return results
    scorers = active_scorers(cfg)
    records = {(r["dataset"], r["target"]): read_predictions(Path(r["artifact"])) for r in results}
    if run_dir is not None:
        eval_report.write(run_dir, results, records, scorers, cfg.eval.primary_scorer)
    eval_dashboard.log(tracker, results, records, scorers, cfg.eval.primary_scorer, run_dir)
    return results
