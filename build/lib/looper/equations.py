"""Equations in reasoning text, found and checked without `eval`: a one-pass scanner and an explicit-stack parser.

Sources: GSM8K's calculator annotations `<<16-3-4=9>>`, or, in text without annotations, plain equations such as
`16 - 3 - 4 = 9`, `9 * $2 = $18`, `3 x 4 = 12`, `12 ÷ 4 = 3`, `(2 + 3) * 4 = 20`, `1,200 / 4 = 300`, `50% * 8 = 4`,
and LaTeX as reasoning models write it: `\\(3 \\times 4 = 12\\)`, `\\cdot`, `\\div`, `\\frac{a}{b}`.

A chain checks every link: `16 - 3 - 4 = 13 - 4 = 9` is two equations that both hold. A chain written as a running
calculation, `2 + 3 = 5 + 1 = 6` (meaning 2 + 3 = 5, then 5 + 1 = 6), is read as such where the literal reading
fails and the next link starts with the previous value.

Everything here takes time linear in the text and never raises on any input: numbers have at most `MAX_DIGITS`
digits and every intermediate value stays within `MAX_MAGNITUDE` (numerator and denominator), or the equation does not
hold. Digits are ASCII only (`٣` is not a digit here).
"""

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

MAX_DIGITS = 40
MAX_MAGNITUDE = 10**80
_DIGITS = frozenset("0123456789")
_BINARY = {"+": 1, "-": 1, "*": 2, "/": 2, "//": 2}
_OPERATOR_SPELLINGS = {"x": "*", "×": "*", "·": "*", "÷": "/", "−": "-"}
# LaTeX: math delimiters go first (`\(` is not a parenthesis), then operators and spacing commands
_LATEX = (
    ("\\(", " "),
    ("\\)", " "),
    ("\\[", " "),
    ("\\]", " "),
    ("\\left", ""),
    ("\\right", ""),
    ("\\times", "*"),
    ("\\cdot", "*"),
    ("\\div", "/"),
    ("\\!", ""),
    ("\\,", ""),
    ("\\;", " "),
    ("{,}", ","),
)
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")
_NUMBER_TEXT = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


@dataclass(frozen=True)
class Equation:
    lhs: str  # the expression as written
    rhs: str  # the stated result (or the other side of a chain link) as written
    holds: bool  # whether the two sides are equal (up to the rounding a stated number shows)
    result: Optional[str]  # the stated result when rhs is a number, normalised (an intermediate result), else None


# ---------------------------------------------------------------------------------------------------------- values


def _bounded(value: Fraction) -> Fraction:
    if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        raise ValueError("value out of bounds")
    return value


def _number_value(text: str) -> Fraction:
    """The value of a number token (`1,200`, `3.5`, `.5`, `50%`); ValueError beyond MAX_DIGITS digits."""
    percent = text.endswith("%")
    digits = text.rstrip("%").replace(",", "")
    if sum(c in _DIGITS for c in digits) > MAX_DIGITS:
        raise ValueError("number out of bounds")
    value = Fraction(digits)
    return value / 100 if percent else value


def _apply(values: list, operator: str) -> None:
    if operator in ("u-", "u+"):
        if not values:
            raise ValueError("missing operand")
        values[-1] = -values[-1] if operator == "u-" else values[-1]
        return
    if len(values) < 2:
        raise ValueError("missing operand")
    right, left = values.pop(), values.pop()
    if operator != "*" and operator != "+" and operator != "-" and right == 0:
        raise ZeroDivisionError
    result = (
        left + right
        if operator == "+"
        else left - right
        if operator == "-"
        else left * right
        if operator == "*"
        else left / right
        if operator == "/"
        else Fraction(left // right)
    )
    values.append(_bounded(result))


def _precedence(operator: str) -> int:
    return 3 if operator.startswith("u") else _BINARY[operator]


def _evaluate(tokens: list[tuple[str, object]]) -> tuple[Fraction, int]:
    """(value, number of binary operators) of ("num", Fraction) / ("op", str) tokens, by shunting-yard (no
    recursion). `//` floors, as in GSM8K's calculator annotations (which were Python); unary signs bind tightest."""
    values: list[Fraction] = []
    stack: list[str] = []
    binary, expect_operand = 0, True
    for kind, token in tokens:
        if expect_operand:
            if kind == "num":
                values.append(token)
                expect_operand = False
            elif token == "(":
                stack.append("(")
            elif token in ("+", "-"):
                stack.append("u" + token)
            else:
                raise ValueError(f"unexpected token {token!r}")
        elif kind == "num" or token == "(":
            raise ValueError("two operands in a row")
        elif token == ")":
            while stack and stack[-1] != "(":
                _apply(values, stack.pop())
            if not stack:
                raise ValueError("unbalanced parenthesis")
            stack.pop()
        else:
            while stack and stack[-1] != "(" and _precedence(stack[-1]) >= _BINARY[token]:
                _apply(values, stack.pop())
            stack.append(token)
            binary += 1
            expect_operand = True
    if expect_operand:
        raise ValueError("incomplete expression")
    while stack:
        operator = stack.pop()
        if operator == "(":
            raise ValueError("unbalanced parenthesis")
        _apply(values, operator)
    return values[0], binary


# ---------------------------------------------------------------------------------------------------------- scanning


def _scan(text: str) -> list[tuple[str, object, int, int]]:
    """(kind, value, start, end) tokens of a text in one pass: `num` (Fraction, or None beyond the bounds), `op`,
    `eq`, `cur` (a `$`, part of an expression but not of its value) and `brk` (anything else: words, punctuation)."""
    tokens, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in _DIGITS or (c == "." and i + 1 < n and text[i + 1] in _DIGITS):
            j = i
            while j < n and text[j] in _DIGITS:
                j += 1
            while (
                j + 3 < n
                and text[j] == ","
                and text[j + 1] in _DIGITS
                and text[j + 2] in _DIGITS
                and text[j + 3] in _DIGITS
                and (j + 4 == n or text[j + 4] not in _DIGITS)
            ):
                j += 4
            if j + 1 < n and text[j] == "." and text[j + 1] in _DIGITS:
                j += 1
                while j < n and text[j] in _DIGITS:
                    j += 1
            if j < n and text[j] == "%":
                j += 1
            try:
                value = _number_value(text[i:j])
            except ValueError:
                value = None
            tokens.append(("num", value, i, j))
            i = j
        elif c == "=":
            tokens.append(("eq", None, i, i + 1))
            i += 1
        elif c == "/" and text.startswith("//", i):
            tokens.append(("op", "//", i, i + 2))
            i += 2
        elif (
            c in "+-*/()"
            or c in "×÷·−"
            or (c == "x" and not (i > 0 and text[i - 1].isalpha()) and not (i + 1 < n and text[i + 1].isalpha()))
        ):
            tokens.append(("op", _OPERATOR_SPELLINGS.get(c, c), i, i + 1))
            i += 1
        elif c == "$":
            tokens.append(("cur", None, i, i + 1))
            i += 1
        else:
            tokens.append(("brk", None, i, i + 1))
            i += 1
    return tokens


def _runs(tokens: list) -> list[list]:
    """Maximal stretches of arithmetic tokens; two operands in a row (`5\\n2 + 3`) start a new stretch."""
    runs, current, previous = [], [], None  # previous: the last token of `current` that is not a `$`
    for token in tokens:
        if token[0] == "brk":
            runs.append(current)
            current, previous = [], None
            continue
        if previous is not None and token[0] == "num" and (previous[0] == "num" or previous[1] == ")"):
            runs.append(current)
            current = []
        current.append(token)
        if token[0] != "cur":
            previous = token
    runs.append(current)
    return [run for run in runs if any(t[0] == "eq" for t in run)]


def _trim(part: list, first: bool, last: bool) -> list:
    """Drop what cannot belong to the expression at the ends of a chain: leading binary operators and unmatched
    opening parentheses of its first part, trailing operators and unmatched closing parentheses of its last."""
    start, end = 0, len(part)
    opened = sum(t[1] == "(" for t in part) - sum(t[1] == ")" for t in part)
    if first:
        while start < end and part[start][0] == "op" and part[start][1] not in ("(", "-"):
            opened += part[start][1] == ")"
            start += 1
        while start < end and part[start][1] == "(" and opened > 0:
            start, opened = start + 1, opened - 1
    if last:
        while start < end and part[end - 1][0] == "op" and part[end - 1][1] != ")":
            opened -= part[end - 1][1] == "("
            end -= 1
        while start < end and part[end - 1][1] == ")" and opened < 0:
            end, opened = end - 1, opened + 1
    while start < end and part[end - 1][0] == "cur":
        end -= 1
    return part[start:end]


def _text(source: str, part: list) -> str:
    return source[part[0][2] : part[-1][3]]


def _value(part: list) -> tuple[Optional[Fraction], int]:
    """(value or None when it is not a bounded arithmetic expression, binary operators)."""
    tokens = [(kind, value) for kind, value, _, _ in part if kind != "cur"]
    if any(kind == "num" and value is None for kind, value in tokens):
        return None, sum(kind == "op" and value in _BINARY for kind, value in tokens)
    try:
        return _evaluate(tokens)
    except (ValueError, ZeroDivisionError, IndexError):
        return None, sum(kind == "op" and value in _BINARY for kind, value in tokens)


def _core(part: list) -> list:
    return [t for t in part if t[0] != "cur"]


def _is_number(part: list) -> bool:
    core = _core(part)
    return len(core) == 1 and core[0][0] == "num" or (len(core) == 2 and core[0][1] == "-" and core[1][0] == "num")


def _holds(value: Optional[Fraction], other: Optional[Fraction], stated_text: Optional[str]) -> bool:
    """Equality, where a stated number may round the value to the decimals it shows (half a unit in its last place),
    so `10/3 = 3.33` holds and `10/3 = 3.4` does not."""
    if value is None or other is None:
        return False
    cleaned = stated_text.replace("$", "").strip().rstrip(".%") if stated_text is not None else ""
    decimals = len(cleaned.split(".")[1]) if "." in cleaned else 0
    return abs(value - other) <= Fraction(1, 2 * 10**decimals) if decimals else value == other


def _chain(source: str, run: list) -> list[Equation]:
    """The equations of one stretch `a = b = c ...`: a link for each `=` whose sides hold an operator."""
    parts, current = [], []
    for token in run:
        if token[0] == "eq":
            parts.append(current)
            current = []
        else:
            current.append(token)
    parts.append(current)
    parts = [_trim(p, i == 0, i == len(parts) - 1) for i, p in enumerate(parts)]
    found = []
    left = parts[0]
    for right in parts[1:]:
        if not left or not right:
            left = right
            continue
        (value, left_ops), (other, right_ops) = _value(left), _value(right)
        if left_ops == 0 and right_ops == 0:
            left = right
            continue
        if _is_number(right):
            found.append(_equation(_text(source, left), _text(source, right), value, other, True))
        elif value != other and value is not None and _core(right)[0][0] == "num" and _core(right)[0][1] == value:
            # a running calculation: `2 + 3 = 5 + 1 = 6` is 2 + 3 = 5, then 5 + 1 = 6
            head = right[: right.index(_core(right)[0]) + 1]
            found.append(_equation(_text(source, left), _text(source, head), value, value, True))
        else:
            found.append(_equation(_text(source, left), _text(source, right), value, other, False))
        left = right
    return found


def _equation(lhs: str, rhs: str, value, other, stated: bool) -> Equation:
    holds = _holds(value, other, rhs if stated else None)
    result = _normalise(other) if stated and other is not None else None
    return Equation(lhs.strip(), rhs.strip(), holds, result)


def _normalise(value: Fraction) -> str:
    return str(int(value)) if value.denominator == 1 else f"{float(value):.6g}"


def _latex_to_plain(text: str) -> str:
    """LaTeX operators and fractions as plain arithmetic (only for text that has a backslash)."""
    if "\\" not in text:
        return text
    for _ in range(3):  # nested fractions, innermost first
        text = _FRAC.sub(r"(\1)/(\2)", text)
    for latex, plain in _LATEX:
        text = text.replace(latex, plain)
    return text


# ---------------------------------------------------------------------------------------------------------- public


def evaluate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression; raises ValueError (or ZeroDivisionError) if it is not one."""
    tokens = _scan(expression.replace("$", ""))
    if any(kind == "brk" or kind == "eq" for kind, *_ in tokens):
        raise ValueError(f"not arithmetic: {expression[:80]!r}")
    if any(kind == "num" and value is None for kind, value, *_ in tokens):
        raise ValueError("number out of bounds")
    return _evaluate([(kind, value) for kind, value, _, _ in tokens])[0]


def _stated_number(text: str) -> Optional[Fraction]:
    cleaned = text.replace("$", "").strip().rstrip(".")
    if not _NUMBER_TEXT.fullmatch(cleaned):
        return None
    try:
        return _number_value(cleaned)
    except ValueError:
        return None


def check(lhs: str, rhs: str) -> Equation:
    """Whether `lhs` = `rhs` for an annotation's two sides (rounding as `_holds` allows)."""
    stated = _stated_number(rhs)
    try:
        value = evaluate(lhs)
    except (ValueError, ZeroDivisionError):
        value = None
    holds = stated is not None and _holds(value, stated, rhs)
    return Equation(lhs.strip(), rhs.strip(), holds, _normalise(stated) if stated is not None else None)


def annotations(text: str) -> list[tuple[str, str]]:
    """(lhs, rhs) of each `<<lhs=rhs>>` calculator annotation (no `<` or `>` inside), found in one pass."""
    found, position = [], 0
    while True:
        start = text.find("<<", position)
        end = text.find(">>", start + 2) if start >= 0 else -1
        if end < 0:
            return found
        inner = text[start + 2 : end]
        if "<" in inner or ">" in inner:  # no annotation opens here; the next may open at the last `<` or after `>`
            position = (
                start
                + 2
                + max(inner.rfind("<") - 1 if "<" in inner else -2, inner.rfind(">") + 1 if ">" in inner else -2)
            )
            continue
        equals = inner.find("=")
        if 0 < equals < len(inner) - 1:
            found.append((inner[:equals], inner[equals + 1 :]))
        position = end + 2


def find_equations(text: str) -> list[Equation]:
    """The equations of a reasoning text: its `<<lhs=rhs>>` annotations if it has any, else its plain ones."""
    marked = annotations(text)
    if marked:
        return [check(lhs, rhs) for lhs, rhs in marked]
    plain = _latex_to_plain(text)
    return [equation for run in _runs(_scan(plain)) for equation in _chain(plain, run)]
