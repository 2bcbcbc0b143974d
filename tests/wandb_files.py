"""Read the records of an offline W&B run file (`run-<id>.wandb`) back, to check what a run logged.

The file is W&B's LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 1), then 32 KiB blocks of
chunks, each with a 7-byte header (CRC-32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last) holding a
serialized `wandb_internal_pb2.Record`.
"""

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> list:
    """Every Record in the run file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        space = BLOCK - offset % BLOCK
        if space < HEADER:  # the block's tail is padding
            offset += space
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        if length == 0 and kind == 0:  # zero padding
            offset += space
            continue
        chunk = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def finished(path: Path, wait_s: float) -> list:
    """The records of a run file once W&B has written its `exit` record (the run finished and flushed; its writer is
    another process, which can lag behind `finish()` on a loaded machine), waiting up to `wait_s` seconds; then what
    is there."""
    import time

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            found = records(path)
        except Exception:  # a record still being written: read again
            found = []
        if any(r.WhichOneof("record_type") == "exit" for r in found):
            return found
        time.sleep(0.2)
    return records(path)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _value(item):
    """A summary or history item's value (JSON, or one of the typed fields newer clients write)."""
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value") if "value" in item.DESCRIPTOR.oneofs_by_name else None
    if kind == "json":
        return json.loads(item.json)
    return None if kind in (None, "none") else getattr(item, kind)


class Run:
    """What one offline run logged: config, summary, history rows, artifacts logged and used, files kept."""

    def __init__(self, directory: Path, wait_s: float = 60.0):
        self.directory = Path(directory)
        self.records = finished(next(self.directory.glob("run-*.wandb")), wait_s)
        kinds = [r.WhichOneof("record_type") for r in self.records]
        self.run = next(r.run for r, k in zip(self.records, kinds) if k == "run")
        self.summary = {}
        for r, k in zip(self.records, kinds):
            if k == "summary":
                self.summary |= {_key(item): _value(item) for item in r.summary.update}
        self.history = [
            {_key(item): _value(item) for item in r.history.item} for r, k in zip(self.records, kinds) if k == "history"
        ]
        artifacts = [r.artifact for r, k in zip(self.records, kinds) if k == "artifact"]
        self.logged = [a for a in artifacts if not a.use_after_commit]
        self.used = [a for a in artifacts if a.use_after_commit]
        self.files = {str(p.relative_to(self.directory / "files")) for p in (self.directory / "files").rglob("*")}

    def table(self, key: str) -> dict:
        """The last logged W&B table under `key`, as its JSON file (columns, data)."""
        path = [row[f"{key}/path"] for row in self.history if f"{key}/path" in row][-1]  # (items arrive flattened)
        return json.loads((self.directory / "files" / path).read_text())
