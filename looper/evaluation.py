"""Stage `eval`: greedy, batched evaluation of `eval.targets` on `eval.datasets`, every scorer side by side.

One artifact per (target, dataset) — `predictions.jsonl` and `summary.json` — so the base and SFT evaluations are
computed once and shared by every DPO run of a sweep (the design's single eval directory per run would redo them).
Predictions are appended as batches finish, so an interrupted evaluation resumes where it stopped. The comparison
table of all targets goes to the Hydra run directory (`eval_table.md`, `summary.json`).
"""

import json
import logging
from pathlib import Path
from typing import Optional

from looper import dpo, models, sft
from looper.answers import extract, is_correct, math_verify_available
from looper.artifacts import ArtifactStore
from looper.config import Config
from looper.data import load_splits, read_gsm8k_jsonl, gsm8k_splits
from looper.generation import generate
from looper.tracking import stage_run

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"


def eval_problems(name: str, cfg: Config) -> list[dict]:
    """The problems of an eval dataset by name (the first `eval.num_questions` of them)."""
    if name.startswith("synthetic_"):
        if cfg.data.name != "synthetic":
            raise ValueError(f"eval.datasets: {name} needs data=synthetic (data.name is {cfg.data.name!r})")
        rows = load_splits(cfg.data)[name.split("_", 1)[1]]
    elif name == "gsm8k_platinum":
        rows = read_gsm8k_jsonl(Path(cfg.eval.platinum_path), "platinum") if cfg.eval.platinum_path else \
            _platinum_hub()
    else:
        data = cfg.data if cfg.data.name == "gsm8k" else type(cfg.data)(name="gsm8k")
        rows = gsm8k_splits(data)[name.split("_", 1)[1]]
    return rows[: cfg.eval.num_questions]


def _platinum_hub() -> list[dict]:
    import datasets

    from looper.data import gold_from_solution

    loaded = datasets.load_dataset("madrylab/gsm8k-platinum", "main", split="test")
    return [{"id": f"platinum-{i}", "question": r["question"], "answer": r["answer"],
             "gold": gold_from_solution(r["answer"]), "cleaning_status": r.get("cleaning_status")}
            for i, r in enumerate(loaded)]


def _read_done(path: Path) -> list[dict]:
    """Finished predictions of an interrupted run; a torn last line (killed mid-write) is dropped."""
    if not path.exists():
        return []
    done = []
    for line in path.read_text().splitlines():
        try:
            done.append(json.loads(line))
        except json.JSONDecodeError:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in done))
    return done


def _scored(problem: dict, text: str, num_tokens: int, finish_reason: str, scorers: list[str]) -> dict:
    record = {"id": problem["id"], "question": problem["question"], "gold": problem["gold"], "completion": text,
              "num_tokens": num_tokens, "finish_reason": finish_reason,
              "cleaning_status": problem.get("cleaning_status")}
    for scorer in scorers:
        record[f"pred_{scorer}"] = extract(text, scorer)
        record[f"correct_{scorer}"] = is_correct(text, problem["gold"], scorer)
    return record


def active_scorers(cfg: Config) -> list[str]:
    """`eval.scorers`, less math_verify (with a warning) when Math-Verify is not installed."""
    scorers = list(cfg.eval.scorers)
    if "math_verify" in scorers and not math_verify_available():
        log.warning("eval: scorer math_verify skipped: Math-Verify is not installed (pip install 'looper[math]')")
        scorers.remove("math_verify")
    return scorers


def _build(cfg: Config, target: str, target_path: str, dataset: str, out: Path) -> None:
    problems = eval_problems(dataset, cfg)
    scorers = active_scorers(cfg)
    done = _read_done(out / PREDICTIONS)
    finished = {r["id"] for r in done}
    todo = [p for p in problems if p["id"] not in finished]
    if done:
        log.info("eval %s/%s: resuming, %d of %d already done", dataset, target, len(done), len(problems))
    if todo:
        model, tokenizer = models.load_target(target_path, cfg.model, cfg.lora)
        chunk = cfg.eval.batch_size * 4
        with open(out / PREDICTIONS, "a") as handle:
            for start in range(0, len(todo), chunk):
                part = todo[start:start + chunk]
                prompts = [models.build_prompt(cfg.model, tokenizer, p["question"]) for p in part]
                outputs = generate(model, tokenizer, prompts,
                                   max_new_tokens=cfg.eval.max_new_tokens or cfg.model.max_new_tokens,
                                   batch_size=cfg.eval.batch_size, add_special_tokens=cfg.model.prompt_format != "chat",
                                   desc=f"eval {target} on {dataset} [{start + len(done)}/{len(problems)}]")
                for problem, output in zip(part, outputs):
                    handle.write(json.dumps(_scored(problem, output.text, output.num_tokens, output.finish_reason,
                                                    scorers)) + "\n")
                handle.flush()
    records = _read_done(out / PREDICTIONS)
    summary = {"target": target, "target_path": target_path, "dataset": dataset, "n": len(records),
               **{f"acc_{s}": sum(r[f"correct_{s}"] for r in records) / max(len(records), 1) for s in scorers}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def target_path(target: str, cfg: Config, store: ArtifactStore) -> str:
    """The model directory (or hub id) of an eval target, producing it first when it is a stage's artifact."""
    if target == "base":
        return models.base_model_path(cfg, store)
    if target == "sft":
        return str(sft.run(cfg, store))
    if target == "dpo":
        return str(dpo.run(cfg, store))
    if not Path(target).exists():
        raise FileNotFoundError(f"eval.targets: {target!r} is not base, sft, dpo or an existing directory")
    return str(Path(target).resolve())


def evaluate(cfg: Config, store: ArtifactStore, target: str, dataset: str) -> dict:
    """Evaluate one target on one dataset (cached); returns its summary."""
    path = target_path(target, cfg, store)
    spec = {"target": Path(path).name if Path(path).exists() else path, "dataset": dataset, "model": cfg.model,
            "lora_quantization": cfg.lora.quantization, "scorers": active_scorers(cfg),
            "num_questions": cfg.eval.num_questions, "max_new_tokens": cfg.eval.max_new_tokens,
            "data": cfg.data if dataset.startswith(("synthetic", "gsm8k_test", "gsm8k_dev")) else None,
            "platinum_path": cfg.eval.platinum_path if dataset == "gsm8k_platinum" else None}
    out = store.ensure("eval", spec, lambda partial: _build(cfg, target, path, dataset, partial), resumable=True)
    return {**json.loads((out / "summary.json").read_text()), "artifact": str(out)}


def table(summaries: list[dict], scorers: list[str], primary: str) -> str:
    """A markdown table: one row per dataset and target, one accuracy column per scorer (primary first)."""
    ordered = [primary] + [s for s in scorers if s != primary]
    lines = ["| dataset | target | n | " + " | ".join(f"acc_{s}" for s in ordered) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in ordered) + " |"]
    for s in summaries:
        cells = [f"{100 * s[f'acc_{k}']:.1f}%" if f"acc_{k}" in s else "—" for k in ordered]
        lines.append(f"| {s['dataset']} | {s['target']} | {s['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(cfg: Config, store: ArtifactStore, run_dir: Optional[Path] = None) -> list[dict]:
    """Evaluate every target on every dataset; writes the comparison table to `run_dir`; returns the summaries."""
    summaries = [evaluate(cfg, store, target, dataset) for dataset in cfg.eval.datasets for target in cfg.eval.targets]
    scorers = active_scorers(cfg)
    text = table(summaries, scorers, cfg.eval.primary_scorer)
    if run_dir is not None:
        (run_dir / "eval_table.md").write_text(text + "\n")
    with stage_run(cfg, "eval") as tracker:
        tracker.summary({f"eval/{s['dataset']}/{s['target']}/acc_{k}": s[f"acc_{k}"]
                         for s in summaries for k in scorers})
    return summaries
