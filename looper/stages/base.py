"""Stage `base`: the model every other stage starts from.

`model.name_or_path` names it (a hub id or a local directory, used where it is: `external`); null builds the tiny
offline model (looper/tiny.py: a tokenizer and a small Llama pretrained on synthetic prose) into the cache.
"""

import logging
from pathlib import Path
from typing import Optional

from looper import tiny
from looper.config import Config

log = logging.getLogger(__name__)

NEEDS: tuple = ()  # the artifacts this stage builds on (looper/pipeline.py resolves them)
READS = (  # the config it reads: the tiny model's shape and training, and the problems its corpus must avoid
    "seed",
    "model.tiny",
    "data.synthetic_seed",
    "data.max_steps",
    "data.max_number",
    "data.synthetic_train",
    "data.synthetic_dev",
    "data.synthetic_test",
)
ENSURE: dict = {}


def external(cfg: Config) -> Optional[str]:
    """The configured base model (hub id or directory), or None when the tiny model is built here."""
    return cfg.model.name_or_path


def build(cfg: Config, up: dict, out: Path) -> None:
    """Train the tiny model and its tokenizer into `out`."""
    tiny.build(cfg.model.tiny, cfg.data, cfg.seed, out, log.info)
