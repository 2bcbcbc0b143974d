"""How fast an artifact's generation ran, kept with the artifact and logged to W&B.

Each `Generator.generate` call of a rollout or an evaluation appends its figures (`engine.GenerationStats`, where each
figure is defined) as one line to the
artifact's `generation.rank<r>.jsonl` as it ends, so a resumed build keeps the calls of the attempts before it. When
the artifact is complete, `summary` merges every process's lines into the `generation` entry of its `stats.json`
(rollout) or `summary.json` (evaluation), which the stage logs as `<stage>/.../generation/<key>`:

- `tokens_per_s`: real tokens (generated, up to and including EOS) over the seconds spent inside `generate` — per
  process, so comparable across process counts; model loading and scoring are not counted;
- `prefill_share` / `drain_share`: the share of those seconds in prefills (compute-bound) and in the drain (the steps
  after a call's last row started, with ever fewer rows);
- `slot_occupancy`: live rows over slots, averaged over decode steps (low: rows waited for KV pages, or refills are
  rare; see `generation.refill_at`);
- `preempted`: rows whose KV pages were taken back and recomputed later (non-zero: the batch is too large for the
  GPU's memory at these lengths); `peak_kv_pages` of `kv_pages`: how full the KV cache's pool got.

`report_truncation` says how many generations hit their token limit (the records' `truncated` share).
"""

import json
import logging
from pathlib import Path
from typing import Optional

from looper.artifacts import recover_jsonl
from looper.engine import GenerationStats

log = logging.getLogger(__name__)

PATTERN = "generation.rank*.jsonl"


def record(path: Path, stats: GenerationStats) -> None:
    """Append one `generate` call's kept figures to `path` (a `generation.rank<r>.jsonl`)."""
    recover_jsonl(path)  # (a line torn by a crash goes before this one is appended)
    with open(path, "a") as handle:
        handle.write(json.dumps(stats.kept()) + "\n")


def summary(directory: Path) -> dict:
    """Every process's calls in `directory` merged into one set of figures (empty if none ran)."""
    paths = sorted(directory.glob(PATTERN))
    return merged([call for path in paths for call in recover_jsonl(path)], processes=len(paths))


def merged(calls: list[dict], processes: int = 1) -> dict:
    """The kept figures of `generate` calls (`GenerationStats.kept`) taken together (empty for none)."""
    if not calls:
        return {}

    def total(key: str) -> float:
        return sum(call.get(key, 0) for call in calls)

    seconds = max(total("seconds"), 1e-9)
    return {
        "calls": len(calls),
        "processes": processes,
        "sequences": total("sequences"),
        "real_tokens": total("real_tokens"),
        "seconds": round(total("seconds"), 2),
        "tokens_per_s": round(total("real_tokens") / seconds, 1),
        "prefill_share": round(total("prefill_seconds") / seconds, 3),
        "drain_share": round(total("drain_seconds") / seconds, 3),
        "slot_occupancy": round(total("row_steps") / max(total("slot_steps"), 1), 3),
        "prefill_tokens": total("prefill_tokens"),
        "decode_steps": total("decode_steps"),
        "preempted": total("preempted"),
        "peak_kv_pages": max(call.get("peak_pages", 0) for call in calls),
        "kv_pages": max(call.get("kv_pages", 0) for call in calls),
        "slots": max(call.get("slots", 0) for call in calls),
        "kernel": calls[-1].get("kernel"),
        "backend": calls[-1].get("backend"),
    }


def metrics(prefix: str, figures: dict) -> dict:
    """The numeric figures as W&B summary keys `<prefix>/generation/<key>`."""
    return {
        f"{prefix}/generation/{key}": value
        for key, value in figures.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


TRUNCATION_WARNING = 0.02  # for a reasoning model, a larger share unanswered biases accuracy down


def report_truncation(where: str, share: Optional[float], key: str, reasoning: bool) -> None:
    """Say how many generations hit their token limit: a warning for a reasoning model above TRUNCATION_WARNING
    (its truncated traces are unanswered), else a log line (a plain model may have answered before the limit)."""
    if not share:
        return
    if reasoning and share > TRUNCATION_WARNING:
        log.warning(
            "%s: %.1f%% of generations hit the token limit and are unanswered; raise %s", where, 100 * share, key
        )
    else:
        log.info("%s: %.1f%% of generations hit the token limit (%s)", where, 100 * share, key)
