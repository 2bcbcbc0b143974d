"""The artifact cache: `paths.artifacts/<stage>/<key>/`, keyed by a hash of what determines the output.

A directory is complete when it holds `DONE`; it is built under `<key>.partial/` and renamed into place, so a crash
never leaves a directory that looks complete. Builders that can resume (rollout, eval) keep their `.partial`
directory across a crash; the others start it afresh. A per-key file lock keeps parallel sweep jobs from building
the same artifact twice. Under `accelerate launch` every rank calls the builder together (trainers and the sharded
rollout are collective), with barriers instead of the lock, and rank 0 finalises. Every use is appended to the Hydra
run directory's `artifacts.jsonl`.
"""

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

from looper import distributed

log = logging.getLogger(__name__)

DONE = "DONE"


def to_plain(value: Any) -> Any:
    """Dataclasses, dicts, lists and paths as plain JSON-able values."""
    if dataclasses.is_dataclass(value):
        return {k: to_plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def artifact_key(spec: dict) -> str:
    """Hash of a spec (config sections and upstream keys): same inputs, same key."""
    canonical = json.dumps(to_plain(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def recover_jsonl(path: Path, keep: Callable[[list[dict]], list[dict]] = lambda records: records) -> list[dict]:
    """The records a crashed writer left in `path`, and the file rewritten to hold only them: reading stops at a
    torn line (killed mid-write), and `keep` may drop more (e.g. a partly written group)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    kept = keep(records)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _prepare(final: Path, spec: dict, resumable: bool) -> Path:
    """The `.partial` directory to build in, with its spec.json; a crashed build's is kept only if resumable."""
    partial = final.with_name(final.name + ".partial")
    if partial.exists() and not resumable:
        shutil.rmtree(partial)
    partial.mkdir(exist_ok=True)
    (partial / "spec.json").write_text(json.dumps(to_plain(spec), indent=2, sort_keys=True))
    return partial


def _finalise(partial: Path, final: Path) -> None:
    """Mark the build complete and move it into place (an incomplete directory at `final` is never trusted)."""
    (partial / DONE).write_text("complete\n")
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)


def is_complete(path: Path) -> bool:
    """Whether an artifact directory was finished (its DONE marker exists)."""
    return (path / DONE).is_file()


class ArtifactStore:
    """Builds each artifact once, reuses it after, and records what a run used and made."""

    def __init__(self, root: Path, record_file: Optional[Path] = None):
        self.root = Path(os.path.abspath(root))  # absolute, symlinks kept: a linked-in artifact still lies inside
        self.record_file = record_file
        self._resolved: set[Path] = set()  # artifacts already resolved by this process: no repeated checks/logs
        self.reused: list[tuple[str, Path]] = []  # (stage, artifact) this process found complete

    def identity(self, model: str) -> str:
        """How a spec names a model: relative to the cache when it is an artifact (so a moved or copied cache keeps
        its keys), else its absolute path, else the hub id as given."""
        if not Path(model).exists():
            return model
        path = Path(os.path.abspath(model))
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def path(self, stage: str, spec: dict) -> Path:
        """Where the artifact of `stage` with this spec lives (complete or not)."""
        return self.root / stage / artifact_key(spec)

    def ensure(self, stage: str, spec: dict, build: Callable[[Path], None], resumable: bool = False,
               collective: bool = False) -> Path:
        """Return the complete artifact for `spec`, calling `build(partial_dir)` first if there is none.

        `resumable`: keep a `.partial` directory left by a crash. `collective`: under several processes every rank
        calls `build` (trainers, the sharded rollout); otherwise rank 0 builds while the others wait."""
        final = self.path(stage, spec)
        if final in self._resolved:
            return final
        if is_complete(final):
            log.info("%s: reusing %s", stage, final)
            self._record(stage, final, "reused")
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        if distributed.world_size() > 1:
            return self._build_together(stage, spec, final, build, resumable, collective)
        with self._lock(final):
            if is_complete(final):  # another process built it while we waited
                log.info("%s: reusing %s (built by another job)", stage, final)
                self._record(stage, final, "reused")
                return final
            partial = _prepare(final, spec, resumable)
            log.info("%s: building %s", stage, final)
            start = time.time()
            build(partial)
            _finalise(partial, final)
        log.info("%s: done in %.1fs -> %s", stage, time.time() - start, final)
        self._record(stage, final, "made")
        return final

    def _build_together(self, stage: str, spec: dict, final: Path, build, resumable: bool, collective: bool) -> Path:
        partial = final.with_name(final.name + ".partial")
        if distributed.is_main_process():
            _prepare(final, spec, resumable)
            log.info("%s: building %s on %d processes", stage, final, distributed.world_size())
        distributed.barrier()
        if collective or distributed.is_main_process():
            build(partial)
        distributed.barrier()
        if distributed.is_main_process():
            _finalise(partial, final)
        distributed.barrier()
        self._record(stage, final, "made")
        return final

    @contextmanager
    def _lock(self, final: Path):
        with open(final.with_name(final.name + ".lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _record(self, stage: str, path: Path, status: str) -> None:
        self._resolved.add(path)
        if status == "reused":
            self.reused.append((stage, path))
        if self.record_file is None or not distributed.is_main_process():
            return
        self.record_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.record_file, "a") as handle:
            handle.write(json.dumps({"stage": stage, "key": path.name, "path": str(path), "status": status}) + "\n")
