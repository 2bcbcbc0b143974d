"""Generation figures kept with an artifact: appended per generate call, merged over processes, logged to W&B."""

import json

from looper import throughput
from looper.engine import GenerationStats
from looper.stages import rollout


def _call(**overrides) -> GenerationStats:
    figures = {
        "sequences": 10,
        "real_tokens": 400,
        "seconds": 2.0,
        "prefills": 3,
        "prefill_tokens": 900,
        "prefill_seconds": 0.5,
        "drain_seconds": 0.25,
        "decode_steps": 50,
        "slot_steps": 400,
        "row_steps": 300,
        "preempted": 0,
        "peak_pages": 70,
        "kv_pages": 100,
        "slots": 8,
        "kernel": "sdpa",
        "kv_positions": 9,
    }
    return GenerationStats(**{**figures, **overrides})


def test_calls_of_every_process_merge_into_one_summary_and_a_torn_line_is_dropped(tmp_path):
    throughput.record(tmp_path / "generation.rank0.jsonl", _call())
    throughput.record(tmp_path / "generation.rank0.jsonl", _call(preempted=2, peak_pages=90))
    with open(tmp_path / "generation.rank1.jsonl", "a") as handle:  # a process killed mid-write...
        handle.write('{"sequences": 3, "real_')
    throughput.record(tmp_path / "generation.rank1.jsonl", _call(seconds=4.0))  # ...resumed: its line comes first
    assert len((tmp_path / "generation.rank1.jsonl").read_text().splitlines()) == 1
    figures = throughput.summary(tmp_path)
    assert figures["calls"] == 3 and figures["processes"] == 2 and figures["sequences"] == 30
    assert figures["real_tokens"] == 1200 and figures["seconds"] == 8.0 and figures["tokens_per_s"] == 150.0
    assert figures["prefill_share"] == 0.188 and figures["drain_share"] == 0.094  # 1.5 / 8, 0.75 / 8
    assert figures["slot_occupancy"] == 0.75 and figures["preempted"] == 2 and figures["peak_kv_pages"] == 90
    assert "kv_positions" not in json.loads((tmp_path / "generation.rank0.jsonl").read_text().splitlines()[0])
    assert throughput.summary(tmp_path / "none") == {}


def test_the_figures_are_logged_as_numeric_summary_keys():
    logged = {}
    tracker = type(
        "Tracker",
        (),
        {
            "summary": lambda self, metrics: logged.update(metrics),
            "histograms": lambda self, values: None,
            "table": lambda self, key, rows: None,
        },
    )()
    stats = {
        "questions": 1,
        "overall": {"accuracy": 0.5},
        "arms": {},
        "generation": {"tokens_per_s": 150.0, "calls": 3, "kernel": "triton"},
    }
    rollout._log(tracker, stats, [])
    assert logged["rollout/generation/tokens_per_s"] == 150.0 and logged["rollout/generation/calls"] == 3
    assert "rollout/generation/kernel" not in logged
