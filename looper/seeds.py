"""Per-row seeds: the one function every sampled record's seed comes from.

Owns `row_seed`. A row's seed depends on the run seed and the row's own coordinates (question, arm, sample and, for a
resampled continuation, its extra coordinates), never on batching, sharding or restarts. Pure: imports nothing of
looper.
"""

import hashlib


def row_seed(run_seed: int, question_id: str, arm: str, sample: int, *extra) -> int:
    """A 31-bit seed for one row: a (question, arm, sample) of a rollout (`arm` "eval" for a sampled evaluation) and,
    with `extra`, its resampled continuations."""
    key = "/".join(map(str, (run_seed, question_id, arm, sample, *extra)))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") >> 1
