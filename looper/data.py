"""Problems: the seeded synthetic generator (`data=synthetic`) and GSM8K loading (`data=gsm8k`).

A problem is a plain dict: ``{"id", "question", "answer", "gold"}`` where ``answer`` is a GSM8K-format worked
solution (``<<a*b=c>>`` annotations, last line ``#### N``) and ``gold`` the normalised final number as a string.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from looper.answers import normalize_number
from looper.config import DataConfig

NAMES = ["Tom", "Ann", "Sam", "Mia", "Ben", "Lily", "Max", "Zoe", "Leo", "Ivy"]
ITEMS = ["apples", "pens", "books", "cards", "eggs", "shells", "coins", "stickers", "plums", "cups"]


class DataError(ValueError):
    """A data file line that cannot be used: the message names the file, the line and the reason."""


# ---------------------------------------------------------------------------------------------------------- synthetic


def _synthetic_problem(rng: random.Random, max_steps: int, max_number: int) -> dict:
    """One word problem of 1..max_steps arithmetic steps with a GSM8K-format solution."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    x = rng.randint(2, max_number)
    sentences = [f"{name} has {x} {item}."]
    lines = []
    for _ in range(rng.randint(1, max_steps)):
        ops = ["+"]
        if x >= 2:
            ops.append("-")
        if 2 * x <= 2 * max_number:
            ops.append("*")
        op = rng.choice(ops)
        if op == "+":
            b = rng.randint(1, max_number)
            y = x + b
            sentences.append(rng.choice([f"Then {name} buys {b} more.", f"{name} finds {b} more."]))
        elif op == "-":
            b = rng.randint(1, x - 1)
            y = x - b
            sentences.append(rng.choice([f"Then {name} gives away {b}.", f"{name} loses {b}."]))
        else:
            b = rng.randint(2, 3)
            y = x * b
            sentences.append(f"Then {name} gets {b} times as many.")
        lines.append(f"{x}{op}{b}=<<{x}{op}{b}={y}>>{y} {item}")
        x = y
    sentences.append(f"How many {item} does {name} have now?")
    return {"question": " ".join(sentences), "answer": "\n".join(lines) + f"\n#### {x}", "gold": str(x)}


def synthetic_splits(cfg: DataConfig) -> dict[str, list[dict]]:
    """Seeded train/dev/test splits of synthetic problems; no question text appears in two splits."""
    rng = random.Random(cfg.synthetic_seed)
    sizes = {"train": cfg.synthetic_train, "dev": cfg.synthetic_dev, "test": cfg.synthetic_test}
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, size in sizes.items():
        rows = []
        while len(rows) < size:
            problem = _synthetic_problem(rng, cfg.max_steps, cfg.max_number)
            if problem["question"] in seen:
                continue
            seen.add(problem["question"])
            rows.append({"id": f"synthetic-{split}-{len(rows)}", **problem})
        splits[split] = rows
    return splits


def pretraining_text(problem: dict) -> str:
    """The problem as a base model meets it in 'pretraining': prose working, no annotations, no `#### N` line.

    The tiny base model learns arithmetic from this but never the answer format, so SFT has a real job.
    """
    steps = []
    for line in problem["answer"].splitlines()[:-1]:
        equation = line.split("<<", 1)[1].split(">>", 1)[0]
        steps.append(f"{equation}.")
    return f"{problem['question']} {' '.join(steps)} The answer is {problem['gold']}."


# ---------------------------------------------------------------------------------------------------------- GSM8K


def gold_from_solution(solution: str) -> str | None:
    """The normalised number after the last `####` of a GSM8K solution, or None."""
    if "####" not in solution:
        return None
    return normalize_number(solution.rsplit("####", 1)[1])


_SURROGATE = re.compile(
    r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|(?<![0-9a-fA-F]{4})\\u[dD][c-fC-F][0-9a-fA-F]{2}"
)


def _unpaired_surrogate_column(line: str) -> int:
    """1-based column of the first `\\uD800`-`\\uDFFF` escape of `line` that is not half of a pair (1 if none is
    found: the line then carries the raw character)."""
    found = _SURROGATE.search(line)
    return found.start() + 1 if found else 1


def read_gsm8k_jsonl(path: Path, id_prefix: str) -> list[dict]:
    """Read GSM8K-format JSONL (`question`, `answer` with a `#### N` line); a missing or empty file, or a bad line
    (not UTF-8, not JSON, a missing field, a lone surrogate that no tokenizer can encode, no final answer), raises
    DataError naming the file, line and column."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{where}:{error.start + 1}: not UTF-8 (byte 0x{raw[error.start]:02x})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            for field in ("question", "answer"):
                if not isinstance(record.get(field), str) or not record[field].strip():
                    raise DataError(f"{where}: missing or empty field '{field}'")
                try:
                    record[field].encode("utf-8")
                except UnicodeEncodeError:
                    raise DataError(
                        f"{where}:{_unpaired_surrogate_column(line)}: field '{field}' holds a lone UTF-16 surrogate "
                        "(an escape like \\ud800 without its pair), which is not text"
                    ) from None
            gold = gold_from_solution(record["answer"])
            if gold is None:
                raise DataError(f"{where}: the answer has no '#### N' final line with a number")
            rows.append(
                {
                    "id": f"{id_prefix}-{len(rows)}",
                    "question": record["question"],
                    "answer": record["answer"],
                    "gold": gold,
                    **({"cleaning_status": record["cleaning_status"]} if "cleaning_status" in record else {}),
                }
            )
    if not rows:
        raise DataError(f"{path}: holds no problems (the file is empty)")
    return rows


def load_hub_dataset(name: str, key: str, local: str, **kwargs):
    """`datasets.load_dataset(name, "main")`; where the hub cannot be reached (offline, no cached copy), a DataError
    naming the key that points to local files instead."""
    import datasets  # imported here: the synthetic path never needs it

    try:
        return datasets.load_dataset(name, "main", **kwargs)
    except Exception as error:  # (offline mode, network, a missing cache: all answered the same way)
        raise DataError(
            f"{key}: loading {name} from the hub failed ({type(error).__name__}: {str(error).splitlines()[0][:160]}); "
            f"set {key} to {local}"
        ) from error


def _gsm8k_hub() -> dict[str, list[dict]]:
    loaded = load_hub_dataset("openai/gsm8k", "data.path", "a directory with GSM8K's train.jsonl and test.jsonl")
    splits = {}
    for split in ("train", "test"):
        rows = []
        for i, record in enumerate(loaded[split]):
            gold = gold_from_solution(record["answer"])
            if gold is None:
                raise DataError(f"openai/gsm8k {split} row {i}: the answer has no '#### N' final line")
            rows.append(
                {"id": f"gsm8k-{split}-{i}", "question": record["question"], "answer": record["answer"], "gold": gold}
            )
        splits[split] = rows
    return splits


def _normalised(question: str) -> str:
    return " ".join(question.split())


def check_overlap(train: list[dict], test: list[dict], test_name: str, allow: bool) -> None:
    """Refuse (DataError, naming how many and the first ones) test questions that also appear in the training file,
    unless `allow` (`data.allow_overlap`): a model trained on a test question reports a score that is not one."""
    seen = {_normalised(row["question"]) for row in train}
    shared = [row for row in test if _normalised(row["question"]) in seen]
    if shared and not allow:
        first = "; ".join(repr(row["question"][:80]) for row in shared[:3])
        raise DataError(
            f"{len(shared)} questions of {test_name} also appear in the training data (first: {first}): training on "
            "a test question makes its score meaningless; remove them, or set data.allow_overlap=true"
        )


def gsm8k_splits(cfg: DataConfig) -> dict[str, list[dict]]:
    """GSM8K train/dev/test: `data.path` (train.jsonl, test.jsonl) or the hub; dev is a seeded share of train."""
    if cfg.path:
        root = Path(cfg.path)
        loaded = {split: read_gsm8k_jsonl(root / f"{split}.jsonl", f"gsm8k-{split}") for split in ("train", "test")}
    else:
        loaded = _gsm8k_hub()
    check_overlap(loaded["train"], loaded["test"], "the GSM8K test split", cfg.allow_overlap)
    order = list(range(len(loaded["train"])))
    random.Random(cfg.split_seed).shuffle(order)
    num_dev = round(len(order) * cfg.dev_fraction)
    dev_ids = set(order[:num_dev])
    train = [row for i, row in enumerate(loaded["train"]) if i not in dev_ids]
    dev = [row for i, row in enumerate(loaded["train"]) if i in dev_ids]
    return {"train": train, "dev": dev, "test": loaded["test"]}


def load_splits(cfg: DataConfig) -> dict[str, list[dict]]:
    """The train/dev/test problems that `data.*` names."""
    return synthetic_splits(cfg) if cfg.name == "synthetic" else gsm8k_splits(cfg)
