"""Equations in reasoning text, found and checked by a small recursive-descent parser (never `eval`).

Sources: GSM8K's calculator annotations `<<16-3-4=9>>`, or, in text without annotations, plain equations such as
`16 - 3 - 4 = 9`, `9 * $2 = $18`, `3 x 4 = 12`, `12 ÷ 4 = 3`, `(2 + 3) * 4 = 20`, `1,200 / 4 = 300`, `50% * 8 = 4`.
"""

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

_ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>]+)>>")
# an expression starting with a number (or '-', '(') with at least one operator, then '=' and a number
_PLAIN = re.compile(r"((?:[-(]\s*)*\$?\d[\d$.,()%\s]*(?:[-+*/x×÷]\s*[-(\s]*\$?\d[\d$.,()%\s]*)+)=\s*(-?\$?\s?[\d,]*\.?\d+)")
_TOKEN = re.compile(r"\s*(?:(\d[\d,]*(?:\.\d+)?|\.\d+)(%?)|(//|[-+*/x×÷()]))")


@dataclass(frozen=True)
class Equation:
    lhs: str  # the expression as written
    rhs: str  # the stated result as written
    holds: bool  # whether lhs evaluates to rhs (up to the rounding the rhs shows)
    result: Optional[str]  # the stated result, normalised (an intermediate result of the reasoning)


class _Parser:
    """expr := term (('+'|'-') term)*; term := unary (('*'|'/'|'//') unary)*; unary := ('-'|'+') unary | atom;
    atom := number['%'] | '(' expr ')'.  Exact rational arithmetic (Fraction); `//` floors, as in GSM8K's
    calculator annotations (which were Python)."""

    def __init__(self, text: str):
        self.tokens, position = [], 0
        text = text.replace("$", "")
        while position < len(text):
            match = _TOKEN.match(text, position)
            if match is None or match.end() == position:
                if text[position:].strip() == "":
                    break
                raise ValueError(f"unexpected {text[position:]!r}")
            number, percent, operator = match.groups()
            if number is not None:
                value = Fraction(number.replace(",", ""))
                self.tokens.append(("num", value / 100 if percent else value))
            else:
                self.tokens.append(("op", {"x": "*", "×": "*", "÷": "/"}.get(operator, operator)))
            position = match.end()
        self.index = 0

    def _peek(self):
        return self.tokens[self.index] if self.index < len(self.tokens) else (None, None)

    def _take(self):
        token = self._peek()
        self.index += 1
        return token

    def parse(self) -> Fraction:
        value = self._expr()
        if self.index != len(self.tokens):
            raise ValueError("trailing tokens")
        return value

    def _expr(self) -> Fraction:
        value = self._term()
        while self._peek() in (("op", "+"), ("op", "-")):
            _, op = self._take()
            value = value + self._term() if op == "+" else value - self._term()
        return value

    def _term(self) -> Fraction:
        value = self._unary()
        while self._peek() in (("op", "*"), ("op", "/"), ("op", "//")):
            _, op = self._take()
            right = self._unary()
            if op != "*" and right == 0:
                raise ZeroDivisionError
            value = value * right if op == "*" else value / right if op == "/" else Fraction(value // right)
        return value

    def _unary(self) -> Fraction:
        if self._peek() in (("op", "-"), ("op", "+")):
            _, op = self._take()
            return -self._unary() if op == "-" else self._unary()
        kind, value = self._take()
        if kind == "num":
            return value
        if (kind, value) == ("op", "("):
            inner = self._expr()
            if self._take() != ("op", ")"):
                raise ValueError("unbalanced parenthesis")
            return inner
        raise ValueError(f"unexpected token {value!r}")


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression; raises ValueError if it is not one."""
    return _Parser(expression).parse()


def _number(text: str) -> Optional[Fraction]:
    cleaned = text.replace("$", "").replace(",", "").strip().rstrip(".")
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def _normalise(value: Fraction) -> str:
    return str(int(value)) if value.denominator == 1 else f"{float(value):.6g}"


def check(lhs: str, rhs: str) -> Equation:
    """Whether `lhs` = `rhs`. Rounding: the stated result may be rounded to the decimals it shows (half a unit in
    its last place), so `<<10/3=3.33>>` holds and `<<10/3=3.4>>` does not."""
    stated = _number(rhs)
    try:
        value = evaluate(lhs)
    except (ValueError, ZeroDivisionError):
        value = None
    if stated is None or value is None:
        return Equation(lhs.strip(), rhs.strip(), False, _normalise(stated) if stated is not None else None)
    decimals = len(rhs.strip().rstrip(".").split(".")[1]) if "." in rhs.strip().rstrip(".") else 0
    holds = abs(value - stated) <= Fraction(1, 2 * 10 ** decimals) if decimals else value == stated
    return Equation(lhs.strip(), rhs.strip(), holds, _normalise(stated))


def find_equations(text: str) -> list[Equation]:
    """The equations of a reasoning text: its `<<lhs=rhs>>` annotations if it has any, else its plain equations."""
    annotations = _ANNOTATION.findall(text)
    if annotations:
        return [check(lhs, rhs) for lhs, rhs in annotations]
    found = []
    for lhs, rhs in _PLAIN.findall(text):
        found.append(check(lhs, rhs))
    return found
