"""The building blocks of the schemas: a documented field, the identity of a section, and the value checks.

Owns `doc` (a dataclass field with its one-line help and whether it may enter artifact identities), `identity` and
the checks that name the key and what is allowed. Must never import a stage or a schema.
"""

from dataclasses import MISSING, field, fields
from typing import Any, Optional

STAGES = ("sft", "rollout", "preferences", "dpo", "grpo", "eval", "pipeline", "export")
# the answer scorers (looper/answers.py implements them; a test keeps the two lists equal: config imports no scorer)
SCORERS = ("strict", "flexible", "platinum", "math_verify")
EVAL_DATASETS = ("synthetic_test", "synthetic_dev", "gsm8k_test", "gsm8k_dev", "gsm8k_platinum")


def doc(help: str, default: Any = MISSING, factory: Any = MISSING, identity: bool = True) -> Any:
    """A dataclass field with its one-line documentation. `identity=False`: the setting never changes what a stage
    produces (speed, logging, which work runs), so it stays out of artifact identities even where a stage reads it
    (looper/pipeline.py derives each identity from the keys the stage declares it reads)."""
    return field(default=default, default_factory=factory, metadata={"help": help, "identity": identity})


def identity(node: Any) -> dict:
    """The fields of a schema section that may enter an artifact's identity (all but those marked `identity=False`)."""
    return {f.name: getattr(node, f.name) for f in fields(node) if f.metadata.get("identity", True)}


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {message}")


def _choice(value: Any, key: str, allowed: tuple) -> None:
    _check(value in allowed, key, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


def _positive(value: Optional[float], key: str) -> None:
    _check(value is None or value > 0, key, f"must be positive, got {value}")


def _fraction(value: float, key: str) -> None:
    _check(0.0 <= value <= 1.0, key, f"must be in [0, 1], got {value}")
