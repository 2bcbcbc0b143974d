"""Weights & Biases: one run per job, always finished, never allowed to lose results on disk.

`job_run` opens the job's run (`group` = the experiment and the sweep or day, `job_type` = the stage asked for,
`name` = stage, experiment and what the job varies, `config` = the resolved config) on rank 0 only, and yields a
`Tracker` whose calls swallow and report W&B errors; `current()` is the open run's Tracker (a no-op one outside a
run), so code deep in a stage logs without being handed it. Each stage logs under its own section (`sft/...`); the
trainers' curves come through `TrainerLog` (`sft/loss` over `sft/step`), so two trainers in one run never mix. A job
stopped before it finished (killed, preempted) continues its run when the same command runs again: the run id is kept
per job under `<paths.artifacts>/.wandb_runs/`.

Every stage artifact is also a W&B artifact named `<stage>-<key>` (files up to `logger.upload_limit_mb` uploaded,
larger ones referenced by path): the run that made it logs it, a run that builds on it or reuses it uses it, so W&B's
lineage graph follows the pipeline across jobs and sweeps. Offline runs record both in their run files (`wandb sync`
uploads them).
"""

import hashlib
import json
import logging
import netrc
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from looper.artifacts import to_plain
from looper.config import Config
from looper.distributed import is_main_process

log = logging.getLogger(__name__)

# the W&B artifact type of each stage's artifact
ARTIFACT_TYPES = {
    "base": "model",
    "sft": "model",
    "dpo": "model",
    "grpo": "model",
    "rollout": "rollout",
    "preferences": "pairs",
    "eval": "predictions",
    "export": "model",
}
_open: list = []  # the Trackers of the runs open in this process, innermost last


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def override_key(override: str) -> str:
    """The key an override sets (`+reward.alpha=1` -> `reward.alpha`; a group choice -> the group)."""
    return override.split("=", 1)[0].lstrip("+~")


def _is_swept(override: str) -> bool:
    value = override.split("=", 1)[1] if "=" in override else ""
    return "," in value or value.startswith(("range(", "choice(", "interval(", "glob("))


# overrides never part of a run's name: where things go, how they are logged, and what the name says already
PLACES = ("paths.", "hydra.", "logger.")
NAMED = ("stage", "experiment")
NAME_LENGTH = 80  # a run name's overrides longer than this are cut (W&B's tables and legends show about this much)


def run_name(job_overrides: list[str], sweep_overrides: Optional[list[str]]) -> str:
    """What a job's run name shows after its stage and experiment: in a sweep, the job's values of the swept keys
    (and of keys a sweeper such as Optuna set); otherwise the job's overrides, less where things go (`paths.*`,
    `hydra.*`, `logger.*`). Cut at `NAME_LENGTH` characters; empty when nothing is left."""

    def shown(override: str) -> bool:
        key = override_key(override)
        return not key.startswith(PLACES) and key not in NAMED

    if sweep_overrides is None:
        chosen = [o for o in job_overrides if shown(o)]
    else:
        fixed = {override_key(o) for o in sweep_overrides if not _is_swept(o)}
        chosen = [o for o in job_overrides if override_key(o) not in fixed and shown(o)]
    name = ",".join(chosen)
    return name if len(name) <= NAME_LENGTH else name[: NAME_LENGTH - 1] + "…"


def group_name(cfg: Config, sweep_dir: Optional[Path], today: str) -> str:
    """The W&B group: `logger.group`, else the experiment with the sweep's directory (date and time) or, for a
    single run, the day."""
    if cfg.logger.group:
        return cfg.logger.group
    if sweep_dir is not None:
        return f"{cfg.experiment}-{sweep_dir.parent.name}-{sweep_dir.name}"
    return f"{cfg.experiment}-{today}"


def _hydra_context() -> tuple[Optional[str], Optional[Path], Optional[Path]]:
    """(run name from overrides, sweep directory in multirun, the job's output dir), where Hydra runs."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        from omegaconf import OmegaConf

        hydra = HydraConfig.get()
    except ValueError:  # not inside @hydra.main (tests, library use)
        return None, None, None
    sweep, sweep_overrides = None, None
    if hydra.mode == RunMode.MULTIRUN:
        sweep = Path(hydra.sweep.dir)
        saved = Path(hydra.sweep.dir) / "multirun.yaml"
        if saved.exists():
            sweep_overrides = list(OmegaConf.load(saved).hydra.overrides.task)
    return run_name(list(hydra.overrides.task), sweep_overrides), sweep, Path(hydra.runtime.output_dir)


def typed_rows(rows: list[dict]) -> tuple[list[str], list[list]]:
    """(columns, data) for a W&B table with one type per column: booleans stay booleans and numbers numbers (so a
    column sorts and filters as what it is), None stays missing, anything else (text, lists, dicts) becomes a string."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def kind(value):
        return "bool" if isinstance(value, bool) else "number" if isinstance(value, (int, float)) else "text"

    kinds = {c: {kind(row[c]) for row in rows if row.get(c) is not None} for c in columns}

    def cell(column, value):
        if value is None:
            return None
        if len(kinds[column]) == 1 and kinds[column] != {"text"}:
            return value
        return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else str(value)

    return columns, [[cell(c, row.get(c)) for c in columns] for row in rows]


def _artifact(stage: str, path: Path, upload_limit_mb: float):
    """The W&B artifact of a stage artifact directory (or a model file tree): small files uploaded, larger ones
    referenced by path without checksumming them (a 7B model is not hashed again). Same directory, same digest: what
    lets a later run's use of it meet the run that logged it."""
    import wandb

    path = Path(path)
    metadata = {"path": str(path)}
    if (path / "spec.json").exists():
        metadata["spec"] = json.loads((path / "spec.json").read_text())
    if (path / "stats.json").exists():
        stats = json.loads((path / "stats.json").read_text())
        metadata["stats"] = {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool))}
    artifact = wandb.Artifact(f"{stage}-{path.name}", type=ARTIFACT_TYPES.get(stage, stage), metadata=metadata)
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        name = str(item.relative_to(path))
        if item.stat().st_size <= upload_limit_mb * 2**20:
            artifact.add_file(str(item), name=name, policy="immutable")  # the store never changes a finished file
        else:
            artifact.add_reference(item.resolve().as_uri(), name=name, checksum=False)
    return artifact


class Tracker:
    """What stages log through; a no-op without a run, and a W&B error is logged, never raised."""

    def __init__(self, run: Any = None, upload_limit_mb: float = 16.0):
        self.run, self.upload_limit_mb = run, upload_limit_mb
        self.recorded: set[Path] = set()  # artifacts this run logged or used (each once: many stages share one)

    def _call(self, what: str, fn, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as error:  # tracking must never take results down with it
            log.warning("W&B %s failed (results on disk are unaffected): %s", what, error)

    def log(self, metrics: dict) -> None:
        """Log a dict of metrics (W&B step semantics)."""
        self._call("log", lambda: self.run.log(metrics))

    def summary(self, metrics: dict) -> None:
        """Set run summary values (final metrics)."""
        self._call("summary", lambda: self.run.summary.update(metrics))

    def config(self, values: dict) -> None:
        """Add values to the run's config (settings a stage derives, such as the effective batch)."""
        self._call("config", lambda: self.run.config.update(values, allow_val_change=True))

    def histograms(self, values: dict[str, list[float]]) -> None:
        """Log one W&B histogram per key."""

        def _log():
            import wandb

            self.run.log({key: wandb.Histogram(v) for key, v in values.items() if v})

        self._call("histograms", _log)

    def table(self, key: str, rows: list[dict]) -> None:
        """Log rows of dicts as a W&B table, one type per column (`typed_rows`)."""
        if not rows:
            return

        def _log():
            import wandb

            columns, data = typed_rows(rows)
            self.run.log({key: wandb.Table(columns=columns, data=data)})

        self._call("table", _log)

    def image(self, key: str, path: Path) -> None:
        """Log a PNG file as a W&B image."""

        def _log():
            import wandb

            self.run.log({key: wandb.Image(str(path))})

        self._call("image", _log)

    def file(self, path: Path) -> None:
        """Keep a file (a report, an SVG) with the run, under its own name (W&B uploads its files directory)."""
        self._call("file", lambda: shutil.copy(path, Path(self.run.dir) / Path(path).name))

    def lines(self, key: str, xs: list, series: dict[str, list], title: str, xname: str) -> None:
        """Log a W&B line chart with one line per entry of `series` over `xs`."""

        def _log():
            import wandb

            ys = [list(v) for v in series.values()]
            self.run.log({key: wandb.plot.line_series(xs=xs, ys=ys, keys=list(series), title=title, xname=xname)})

        self._call("lines", _log)

    def bars(self, key: str, labels: list[str], values: list[float], title: str, value_name: str) -> None:
        """Log a W&B bar chart of `values`, one bar per label."""

        def _log():
            import wandb

            table = wandb.Table(columns=["label", value_name], data=[[lab, v] for lab, v in zip(labels, values)])
            self.run.log({key: wandb.plot.bar(table, "label", value_name, title=title)})

        self._call("bars", _log)

    def produced(self, stage: str, path: Path) -> None:
        """Log the artifact this run made (its output in the lineage graph)."""
        if self._first(path):
            self._call("artifact", lambda: self.run.log_artifact(_artifact(stage, path, self.upload_limit_mb)))

    def _first(self, path: Path) -> bool:
        """Whether `path` is new to this run (and remember it)."""
        path = Path(path).resolve()
        new = self.run is not None and path not in self.recorded
        self.recorded.add(path)
        return new

    def used(self, stage: str, path: Path) -> None:
        """Mark an existing artifact as this run's input: an upstream it built on, or the cached artifact it reused.
        Offline, W&B refuses `use_artifact`; the run then records the artifact with `use_after_commit`, which is how
        `use_artifact` itself records a new artifact, and `wandb sync` turns it into the same edge."""

        def _use():
            artifact = _artifact(stage, path, self.upload_limit_mb)
            if self.run.settings._offline:
                self.run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
            else:
                self.run.use_artifact(artifact)

        if self._first(path):
            self._call("use_artifact", _use)


def current() -> Tracker:
    """The Tracker of the innermost open run of this process (a no-op Tracker when none is open)."""
    return _open[-1] if _open else Tracker()


def keep_wandb_out(cfg: Config) -> None:
    """With `logger=none`, make W&B unimportable for this process (`sys.modules["wandb"] = None`): transformers and
    TRL import it merely to ask whether it is installed, which costs seconds and starts its machinery for nothing."""
    if cfg.logger.name == "none" and "wandb" not in sys.modules:
        sys.modules["wandb"] = None


def _job_key(cfg: Config) -> str:
    """Which job this is, for resuming its W&B run: its whole resolved config (the same command, the same key)."""
    return hashlib.sha256(json.dumps(to_plain(cfg), sort_keys=True, default=str).encode()).hexdigest()[:24]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resume_id(record: Path) -> Optional[str]:
    """The W&B run id to continue: that of the same job when it was stopped before finishing (killed, preempted,
    crashed) and is not still running on this host; None starts a new run."""
    if not record.exists():
        return None
    try:
        saved = json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if saved.get("finished"):
        return None
    if saved.get("host") == socket.gethostname() and _alive(saved.get("pid", -1)):
        return None  # the same command, running now: its own run
    return saved.get("id")


def _mark(record: Path, **values) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(values))


def run_label(cfg: Config, name: Optional[str]) -> str:
    """A job's run name: its stage and experiment, then what it varies (`dpo tiny_demo dpo.beta=0.15`)."""
    return " ".join(part for part in (cfg.stage.name, cfg.experiment, name) if part)


@contextmanager
def job_run(cfg: Config, run_dir: Optional[Path] = None):
    """The job's one W&B run (or a no-op Tracker when logging is off or not rank 0): every stage it builds logs into
    it under its own section (`sft/...`, `rollout/...`), every artifact it builds or reuses is recorded (logged or
    used), and a job stopped before finishing continues its run (same id) when the same command runs again.
    `run_dir`: the job's directory (W&B's files and `wandb_runs.jsonl` go there; default: Hydra's, else W&B's own)."""
    if cfg.logger.name != "wandb" or cfg.logger.mode == "disabled" or not is_main_process():
        _open.append(Tracker())
        try:
            yield _open[-1]
        finally:
            _open.pop()
        return
    name, sweep, job_dir = _hydra_context()
    job_dir = run_dir or job_dir
    mode = cfg.logger.mode if cfg.logger.mode != "auto" else ("online" if _has_api_key() else "offline")
    record = Path(cfg.paths.artifacts) / ".wandb_runs" / f"{_job_key(cfg)}.json"
    previous = resume_id(record)
    run = None
    if cfg.logger.quiet:  # W&B's console output, its warnings from inside TRL's callbacks included, goes to its debug
        os.environ["WANDB_SILENT"] = "true"  # log instead (read when W&B first sets up in this process)
    try:
        import wandb

        settings = dict(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            mode=mode,
            group=group_name(cfg, sweep, time.strftime("%Y-%m-%d")),
            job_type=cfg.stage.name,
            name=run_label(cfg, name),
            config=to_plain(cfg),
            tags=[cfg.model.name, cfg.experiment],
            dir=str(job_dir) if job_dir else None,
            settings=wandb.Settings(silent=True) if cfg.logger.quiet else None,
        )
        try:
            run = wandb.init(**settings, id=previous, resume="allow" if previous else None)
        except Exception as error:
            if previous is None:
                raise
            log.warning("W&B could not continue run %s (%s); starting a new run", previous, error)
            previous, run = None, wandb.init(**settings)
        where = run.url if mode == "online" else run.dir
        how = "continued" if previous else "started"
        log.info("W&B run %s %s (%s, group %s) -> %s", run.name, how, mode, run.group, where)
        _mark(record, id=run.id, host=socket.gethostname(), pid=os.getpid(), finished=False)
    except Exception as error:
        log.warning("W&B init failed; the job continues without tracking: %s", error)
    if run is not None and job_dir is not None:  # where to find the job's run, from its directory
        entry = {"stage": cfg.stage.name, "id": run.id, "group": run.group, "name": run.name, "mode": mode}
        with open(job_dir / "wandb_runs.jsonl", "a") as handle:
            handle.write(json.dumps({**entry, "job_type": cfg.stage.name, "dir": run.dir}) + "\n")
    _open.append(Tracker(run, cfg.logger.upload_limit_mb))
    finished = False
    try:
        yield _open[-1]
        finished = True
    finally:
        _open.pop()
        if run is not None:
            try:
                run.finish(exit_code=0 if finished else 1)
            except Exception as error:
                log.warning("W&B finish failed (results on disk are unaffected): %s", error)
            if finished:
                _mark(record, id=run.id, finished=True)
