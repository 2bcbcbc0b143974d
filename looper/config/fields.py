"""The building blocks of the schemas: a documented field, the identity of a section, and the value checks.

Owns `doc` (a dataclass field with its one-line help and whether it enters artifact identities), `identity` and the
checks that name the key and what is allowed. Must never import a stage or a schema.
"""

from dataclasses import MISSING, field, fields
from typing import Any, Optional

STAGES = ("sft", "rollout", "preferences", "dpo", "eval", "pipeline", "export")
EVAL_DATASETS = ("synthetic_test", "synthetic_dev", "gsm8k_test", "gsm8k_dev", "gsm8k_platinum")


def doc(
    help: str,
    default: Any = MISSING,
    factory: Any = MISSING,
    identity: bool = True,
    scoring: bool = False,
    generation: bool = False,
) -> Any:
    """A dataclass field with its one-line documentation. `identity=False`: the setting never changes what a stage
    produces (speed, logging, which work runs), so it stays out of artifact identities (`identity`). `scoring=True`
    (reward keys): computed during the rollout, so it enters the rollout's identity; the other reward keys are applied
    later to the stored components. `generation=True`: only sampling reads it (a generation limit), so it enters the
    identities of what is generated (rollouts, evaluations) but not those of trained models."""
    return field(
        default=default,
        default_factory=factory,
        metadata={"help": help, "identity": identity, "scoring": scoring, "generation": generation},
    )


def identity(node: Any, scoring: bool = False, training: bool = False) -> dict:
    """The fields of a schema section that enter an artifact's identity (all but those marked `identity=False`); with
    `scoring`, only the reward keys computed during the rollout; with `training` (a trained model's identity), not
    the keys marked `generation=True` either."""
    return {
        f.name: getattr(node, f.name)
        for f in fields(node)
        if f.metadata.get("identity", True)
        and (f.metadata.get("scoring", False) or not scoring)
        and not (training and f.metadata.get("generation", False))
    }


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {message}")


def _choice(value: Any, key: str, allowed: tuple) -> None:
    _check(value in allowed, key, f"got {value!r}; allowed: {', '.join(map(str, allowed))}")


def _positive(value: Optional[float], key: str) -> None:
    _check(value is None or value > 0, key, f"must be positive, got {value}")


def _fraction(value: float, key: str) -> None:
    _check(0.0 <= value <= 1.0, key, f"must be in [0, 1], got {value}")
