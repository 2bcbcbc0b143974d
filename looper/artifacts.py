"""The artifact cache: `paths.artifacts/<stage>/<key>/`, keyed by a hash of what determines the output.

A directory is complete when it holds `DONE`; it is built under `<key>.partial/` and renamed into place, so a crash
never leaves a directory that looks complete. Builders that can resume (rollout, eval) keep their `.partial`
directory across a crash; the others start it afresh. A per-key file lock keeps parallel sweep jobs from building
the same artifact twice. Under `accelerate launch` every rank calls the builder together (trainers and the sharded
rollout are collective), with barriers instead of the lock, and rank 0 finalises. Every use is appended to the Hydra
run directory's `artifacts.jsonl`.

At `DONE` each artifact records `manifest.json`: every file's size and SHA-256, and for JSONL files the line count.
Reuse verifies it (`paths.verify`): `quick` checks every size and line count and the hashes of files up to
`QUICK_HASH_LIMIT`; `full` every hash, whatever the file's size. It also checks that the directory is the one its key
names (its `spec.json` hashes to the key: a renamed or swapped directory is refused) and that it has a manifest. A
mismatch stops the run naming the artifact and the file; `python -m looper.artifacts discard DIR` moves a damaged
artifact aside so that the next run rebuilds it.
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
MANIFEST = "manifest.json"
# the record files stages hand each other (read with `read_jsonl`)
TRAJECTORIES = "trajectories.jsonl"  # rollout
PAIRS = "pairs.jsonl"  # preferences
PREDICTIONS = "predictions.jsonl"  # eval
FINGERPRINTS = "fingerprints.json"  # in the cache's root: the hashes of local models' files, by path, size and time
QUICK_HASH_LIMIT = 256 << 20  # adapters, records and tokenizers: hashed on every reuse


class ArtifactError(RuntimeError):
    """A cached artifact that does not match its manifest: the message names it, the file and how to rebuild it."""


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


def read_jsonl(path: Path) -> list[dict]:
    """The records of a complete JSONL file of an artifact."""
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b""))


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (DONE, MANIFEST))


def write_manifest(directory: Path) -> dict:
    """Record every file of a finished artifact: size, SHA-256, JSONL line count."""
    files = {}
    for path in _files(directory):
        entry = {"size": path.stat().st_size, "sha256": _sha256(path)}
        if path.suffix == ".jsonl":
            entry["lines"] = _lines(path)
        files[str(path.relative_to(directory))] = entry
    manifest = {"files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def verify(directory: Path, stage: str = "artifact", full: bool = False) -> None:
    """Check a finished artifact: its `spec.json` hashes to its directory's key, and its files match its manifest
    (sizes, line counts, hashes where cheap or `full`); raise ArtifactError naming the file and what to do."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        _damaged(stage, directory, MANIFEST, "is missing (nothing can vouch for its files)")
    try:
        spec = json.loads((directory / "spec.json").read_text())
    except (OSError, json.JSONDecodeError):
        _damaged(stage, directory, "spec.json", "is missing or unreadable")
    if artifact_key(spec) != directory.name:
        _damaged(
            stage,
            directory,
            "spec.json",
            f"hashes to {artifact_key(spec)}, not to the directory's key (a renamed or swapped artifact)",
        )
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        _damaged(stage, directory, MANIFEST, "is not a readable manifest")
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            _damaged(stage, directory, name, "is missing")
        size = path.stat().st_size
        if size != entry["size"]:
            _damaged(stage, directory, name, f"has {size} bytes, the manifest {entry['size']}")
        if "lines" in entry and _lines(path) != entry["lines"]:
            _damaged(stage, directory, name, f"has {_lines(path)} lines, the manifest {entry['lines']}")
        if "sha256" in entry and (full or size <= QUICK_HASH_LIMIT) and _sha256(path) != entry["sha256"]:
            _damaged(stage, directory, name, "does not match its recorded SHA-256")


def _damaged(stage: str, directory: Path, name: str, problem: str):
    raise ArtifactError(
        f"{stage}: the cached artifact {directory} is damaged: {name} {problem}. Move it aside with "
        f"`python -m looper.artifacts discard {directory}` and rerun to rebuild it (a copy of the "
        f"cache may hold an intact one)"
    )


def fingerprint(path: Path, cache_file: Optional[Path] = None) -> str:
    """A hash of a local model directory's content: every file's name, size and SHA-256, so a directory rebuilt with
    other weights (or edited anywhere) gets another fingerprint. Each file is hashed once: its hash is kept in
    `cache_file` (and in this process) under its path, size and modification time."""
    known = _load_hashes(cache_file)
    digest, changed = hashlib.sha256(), False
    for file in _files(path) if path.is_dir() else [path]:
        stat = file.stat()
        stamp = f"{os.path.abspath(file)}:{stat.st_size}:{stat.st_mtime_ns}"
        if stamp not in known:
            known[stamp], changed = _sha256(file), True
        name = file.relative_to(path) if path.is_dir() else file.name
        digest.update(f"{name}:{stat.st_size}:{known[stamp]}\n".encode())
    if changed and cache_file is not None and distributed.is_main_process():
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_file.with_name(f"{cache_file.name}.{os.getpid()}")
        temporary.write_text(json.dumps(known))
        temporary.replace(cache_file)
    return digest.hexdigest()[:16]


_HASHES: dict = {}  # this process's file hashes, by path, size and modification time


def _load_hashes(cache_file: Optional[Path]) -> dict:
    if cache_file is not None and cache_file.is_file():
        try:
            _HASHES.update(json.loads(cache_file.read_text()))
        except json.JSONDecodeError:  # a torn cache of hashes only costs hashing again
            pass
    return _HASHES


def resolve_revision(repo: str, revision: Optional[str]) -> str:
    """The commit a hub revision (null: main) names: from the local hub cache, else from the hub where it can be
    reached; the revision as given where neither knows it (the model's loading then reports why)."""
    try:
        from huggingface_hub import HfApi, try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_OFFLINE

        cached = try_to_load_from_cache(repo, "config.json", revision=revision)
        if isinstance(cached, str) and "/snapshots/" in cached:
            return cached.split("/snapshots/", 1)[1].split("/", 1)[0]
        if not HF_HUB_OFFLINE:
            return HfApi().model_info(repo, revision=revision).sha
    except Exception:  # unreachable hub, unusual id or cache layout: keep the revision as given
        pass
    return revision or "main"


def discard(directory: Path) -> Path:
    """Move a (damaged) artifact aside, to `<key>.discarded-<time>`, so that the next run rebuilds it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not an artifact directory")
    target = directory.with_name(f"{directory.name}.discarded-{time.strftime('%Y%m%d-%H%M%S')}")
    directory.rename(target)
    return target


def _finalise(partial: Path, final: Path) -> None:
    """Mark the build complete and move it into place (an incomplete directory at `final` is never trusted)."""
    write_manifest(partial)
    (partial / DONE).write_text("complete\n")
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)


def is_complete(path: Path) -> bool:
    """Whether an artifact directory was finished (its DONE marker exists)."""
    return (path / DONE).is_file()


class ArtifactStore:
    """Builds each artifact once, reuses it after, and records what a run used and made."""

    def __init__(self, root: Path, record_file: Optional[Path] = None, verify: str = "quick"):
        self.root = Path(os.path.abspath(root))  # absolute, symlinks kept: a linked-in artifact still lies inside
        self.record_file = record_file
        self.full_verify = verify == "full"
        self._resolved: set[Path] = set()  # artifacts already resolved by this process: no repeated checks/logs
        self.reused: list[tuple[str, Path]] = []  # (stage, artifact) this process found complete
        self.made: list[Path] = []  # the artifacts this process built

    def identity(self, model: str, revision: Optional[str] = None) -> Any:
        """How a spec names a model, by content: relative to the cache when it is an artifact (its key already
        stands for its content, and a moved or copied cache keeps its keys); a local directory by a fingerprint of
        its files (`fingerprint`), so moving it changes no key; a hub id with its revision, resolved to a commit
        where the local hub cache knows it."""
        if not Path(model).exists():
            return {"hub": model, "revision": resolve_revision(model, revision)}
        path = Path(os.path.abspath(model))
        if path.is_relative_to(self.root):
            return str(path.relative_to(self.root))
        return {"local": fingerprint(path, self.root / FINGERPRINTS)}

    def path(self, stage: str, spec: dict) -> Path:
        """Where the artifact of `stage` with this spec lives (complete or not)."""
        return self.root / stage / artifact_key(spec)

    def ensure(
        self,
        stage: str,
        spec: dict,
        build: Callable[[Path], None],
        resumable: bool = False,
        collective: bool = False,
        what: str = "",
    ) -> Path:
        """Return the complete artifact for `spec`, calling `build(partial_dir)` first if there is none.

        `resumable`: keep a `.partial` directory left by a crash. `collective`: under several processes every rank
        calls `build` (trainers, the sharded rollout); otherwise rank 0 builds while the others wait. `what` names the
        artifact in the log (model, target, dataset), beside its key."""
        final = self.path(stage, spec)
        label = f"{stage} {what}" if what else stage
        if final in self._resolved:
            return final
        if final.exists() and not final.is_dir():
            raise ArtifactError(
                f"{stage}: {final} should be an artifact directory but is a file; move it away and rerun"
            )
        if is_complete(final):
            verify(final, stage, self.full_verify)
            log.info("%s: reusing %s", label, final)
            self._record(stage, final, "reused")
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        if distributed.world_size() > 1:
            return self._build_together(stage, label, spec, final, build, resumable, collective)
        with self._lock(final):
            if is_complete(final):  # another process built it while we waited
                verify(final, stage, self.full_verify)
                log.info("%s: reusing %s (built by another job)", label, final)
                self._record(stage, final, "reused")
                return final
            partial = _prepare(final, spec, resumable)
            log.info("%s: building %s", label, final)
            start = time.time()
            build(partial)
            _finalise(partial, final)
        log.info("%s: done in %.1fs -> %s", label, time.time() - start, final)
        self._record(stage, final, "made")
        return final

    def _build_together(
        self, stage: str, label: str, spec: dict, final: Path, build, resumable: bool, collective: bool
    ) -> Path:
        partial = final.with_name(final.name + ".partial")
        if distributed.is_main_process():
            _prepare(final, spec, resumable)
            log.info("%s: building %s on %d processes", label, final, distributed.world_size())
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
        else:
            self.made.append(path)
        if self.record_file is None or not distributed.is_main_process():
            return
        self.record_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.record_file, "a") as handle:
            handle.write(json.dumps({"stage": stage, "key": path.name, "path": str(path), "status": status}) + "\n")


def main(argv: Optional[list[str]] = None) -> None:
    """`python -m looper.artifacts verify|discard DIR...`: check artifacts against their manifests, or move damaged
    ones aside so that the next run rebuilds them."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m looper.artifacts", description=main.__doc__.split("\n")[0])
    parser.add_argument("action", choices=("verify", "discard"))
    parser.add_argument("directories", nargs="+", type=Path)
    args = parser.parse_args(argv)
    for directory in args.directories:
        if args.action == "verify":
            verify(directory, full=True)
            print(f"{directory}: intact")
        else:
            print(f"{directory} -> {discard(directory)}: the next run that needs it rebuilds it")


if __name__ == "__main__":
    main()
