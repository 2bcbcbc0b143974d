"""Final-answer extraction and checking: the one answer parser used by rollouts, preferences and evaluation.

Scorers (the `scorer` argument):

- ``strict``    the number after the last ``#### `` (GSM8K's own answer line);
- ``flexible``  the last number anywhere in the text;
- ``platinum``  GSM8K-Platinum's published parsing, quirks kept (see `_platinum`);
- ``math_verify`` Math-Verify (extra ``math``) with the gold wrapped as ``\\boxed{N}``.

For a reasoning model (`model.reasoning=think`) every scorer reads only the text after the last think-closing tag
(`answer_region`): a trace whose think block never closed, or that hit its token limit, is unanswered, never scored
from a number inside its reasoning.

Model output is data: numbers are matched without backtracking blow-ups (every extractor runs in time linear in its
input and never raises) and compared exactly (as fractions), never evaluated. Digits are ASCII only, in every scorer
(the benchmark's `[0-9]`): `#### ٣٤` holds no answer.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction
from typing import Optional

SCORERS = ("strict", "flexible", "platinum", "math_verify")

# A number as it appears in model text: optional sign and $, thousands separators, decimals.
_NUMBER = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\$?\.\d+", re.ASCII)
# `\boxed{X}` or `\boxed{\text{X}}`, X without backslashes or braces (as the benchmark matches it)
_PLATINUM_BOX = re.compile(r"\\boxed\{(?:\\text\{)?([^\\\\{}]+)\}")
_DIGITS = frozenset("0123456789")


def normalize_number(text: str) -> str | None:
    """Canonical form of a number string: no `$`, commas or spaces, no trailing `.0…`; None if no number.

    >>> normalize_number(" $1,234.50 ")
    '1234.50'
    >>> normalize_number("-18.00")
    '-18'
    """
    match = _NUMBER.search(text)
    if match is None:
        return None
    number = re.sub(r"[$,\s]", "", match.group(0))
    if number.startswith("-."):
        number = "-0" + number[1:]
    elif number.startswith("."):
        number = "0" + number
    return re.sub(r"\.0+$", "", number)


def _strict(text: str) -> str | None:
    if "#### " not in text and "####" not in text:
        return None
    return normalize_number(text.rsplit("####", 1)[1])


def _flexible(text: str) -> str | None:
    matches = _NUMBER.findall(text)
    return normalize_number(matches[-1]) if matches else None


def _platinum(text: str) -> str | None:
    """GSM8K-Platinum's published parsing (MadryLab/platinum-benchmarks: `parse_fn_math` behind `create_parse_fn`),
    step by step, quirks kept:

    1. If the text, lowercased with `*` removed, contains `answer:`: look for a box in what follows the last
       `answer: ` of the lowercased text (with `*` still in it, and with the space); the candidate is the box's
       content if there is one, else the whole text. Otherwise: the first box's content anywhere, else the last
       line (trailing newlines dropped).
    2. From the candidate with `*` and `#` removed, lowercased: what follows the last `answer: `, commas removed.
    3. The first match of `-?[0-9.]*[0-9]`, a trailing `.0…` stripped. No match: no answer (scored wrong).
    """
    lowered = text.lower()
    if "answer:" in lowered.replace("*", ""):
        box = _PLATINUM_BOX.search(lowered.split("answer: ")[-1])
        candidate = "answer: " + box.group(1) if box else text
    else:
        box = _PLATINUM_BOX.search(text)
        candidate = "answer: " + (box.group(1) if box else text.strip("\n").split("\n")[-1].lower())
    tail = candidate.replace("*", "").replace("#", "").lower().split("answer: ")[-1].replace(",", "")
    match = _first_platinum_number(tail)
    return re.sub(r"\.0+$", "", match) if match else None


def _first_platinum_number(text: str) -> str | None:
    """The first match of the benchmark's `-?[0-9.]*[0-9]`, found in one pass (the regex backtracks quadratically on
    a long run of dots): the first maximal run of digits and dots that holds a digit, up to its last digit, with a
    `-` right before it."""
    start, n = 0, len(text)
    while start < n:
        if text[start] not in _DIGITS and text[start] != ".":
            start += 1
            continue
        end = start
        while end < n and (text[end] in _DIGITS or text[end] == "."):
            end += 1
        run = text[start:end]
        last = max(run.rfind(d) for d in _DIGITS)
        if last >= 0:
            return ("-" if start > 0 and text[start - 1] == "-" else "") + run[: last + 1]
        start = end
    return None


def _math_verify_module():
    try:
        import math_verify
    except ImportError:
        raise ImportError("scorer 'math_verify' needs Math-Verify: pip install 'looper[math]'") from None
    return math_verify


def _final_segment(text: str) -> str:
    """What Math-Verify reads: the text after the last `####` when there is one, else all of it. On whole GSM8K-style
    solutions its extraction picks intermediate results (3 of the 1209 Platinum gold solutions)."""
    return text.rsplit("####", 1)[1] if "####" in text else text


def _math_verify_timeout() -> Optional[int]:
    """Math-Verify's time limit per call: its own 5 s on the main thread; none in a rollout's scorer threads, where its
    signal-based limit raises ('doesn't support threaded environment') and `rollout.scorer_timeout_s` bounds a
    scorer instead."""
    return 5 if threading.current_thread() is threading.main_thread() else None


def math_verify_available() -> bool:
    """Whether the optional Math-Verify scorer can run here."""
    try:
        _math_verify_module()
    except ImportError:
        return False
    return True


def answer_region(text: str, think_close: Optional[str] = None, truncated: bool = False) -> str | None:
    """The part of a completion its final answer is read from: all of it for a plain model (`think_close` None);
    for a reasoning model, the text after the last `think_close`, or None (unanswered) when the think block never
    closed or the generation hit its token limit."""
    if think_close is None:
        return text
    if truncated or think_close not in text:
        return None
    return text.rsplit(think_close, 1)[1]


def completion_flags(text: str, finish_reason: str, think_close: Optional[str] = None) -> dict:
    """What a record says of how its completion ended: `truncated` (it hit the token limit) and, for a reasoning
    model (`think_close` set), `think_closed`."""
    flags = {"truncated": finish_reason == "length"}
    if think_close is not None:
        flags["think_closed"] = think_close in text
    return flags


def extract(text: str, scorer: str, think_close: Optional[str] = None, truncated: bool = False) -> str | None:
    """The final answer `scorer` reads from `text` (its `answer_region`), normalised, or None when it finds none."""
    text = answer_region(text, think_close, truncated)
    if text is None:
        return None
    if scorer == "strict":
        return _strict(text)
    if scorer == "flexible":
        return _flexible(text)
    if scorer == "platinum":
        return _platinum(text)
    if scorer == "math_verify":
        parsed = _math_verify_module().parse(_final_segment(text), parsing_timeout=_math_verify_timeout())
        return str(parsed[-1]) if parsed else None
    raise ValueError(f"unknown scorer {scorer!r}; allowed: {', '.join(SCORERS)}")


_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def same_answer(a: str | None, b: str | None) -> bool:
    """Whether two extracted answers are the same: equal as exact numbers when both are plain decimal numbers
    (`18.50` and `18.5`), else equal as strings; None (no answer) equals nothing."""
    if a is None or b is None:
        return False
    if _PLAIN_NUMBER.fullmatch(a) and _PLAIN_NUMBER.fullmatch(b) and len(a) + len(b) < 2000:
        return Fraction(a) == Fraction(b)
    return a == b


def is_correct(
    text: str, gold_answer: str, scorer: str, think_close: Optional[str] = None, truncated: bool = False
) -> bool:
    """Whether `text`'s final answer under `scorer` equals `gold_answer` (a number string, commas allowed);
    `think_close` and `truncated` as in `answer_region`."""
    gold = normalize_number(gold_answer)
    if gold is None:
        raise ValueError(f"gold answer {gold_answer!r} holds no number")
    region = answer_region(text, think_close, truncated)
    if region is None:
        return False
    text = region
    if scorer == "math_verify":
        math_verify, seconds = _math_verify_module(), _math_verify_timeout()
        return bool(
            math_verify.verify(
                math_verify.parse(f"\\boxed{{{gold}}}", parsing_timeout=seconds),
                math_verify.parse(_final_segment(text), parsing_timeout=seconds),
                timeout_seconds=seconds,
            )
        )
    return same_answer(extract(text, scorer), gold)
