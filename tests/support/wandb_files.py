"""Offline W&B runs in tests: isolate W&B's own folders, and read a finished run's files back."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

RECORD_HEADER = 7
"""A ``run-*.wandb`` file starts with ``:W&B``, a 2-byte magic and a version byte; each record
chunk then starts with a CRC (4 bytes), a length (2) and a type (1), LevelDB-log style."""
BLOCK = 32768
FULL, LAST = 1, 4


def isolate_wandb(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """No login, no network, W&B's cache, config and data folders under ``home``."""
    for variable in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(home / variable.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def finished_run_dir(directory: Path) -> Path:
    """The one ``offline-run-*`` folder W&B made under ``directory/wandb``, once complete.

    ``run.finish()`` returns before W&B's service has written the run file (it was still the
    7-byte header in about a third of tries); ``wandb.teardown()`` waits for the service.
    """
    import wandb

    wandb.teardown()
    [run_dir] = (directory / "wandb").glob("offline-run-*")
    return run_dir


def wandb_history(run_dir: Path) -> list[dict[str, object]]:
    """The history rows (one per ``log``) of a finished offline run, from its ``run-*.wandb``."""
    from wandb.proto import wandb_internal_pb2

    [path] = run_dir.glob("run-*.wandb")
    data = path.read_bytes()
    position, chunks, rows = RECORD_HEADER, [], []
    while position + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[position : position + RECORD_HEADER])
        if left_in_block < RECORD_HEADER or (length == 0 and kind == 0):
            position += left_in_block
            continue
        chunks.append(data[position + RECORD_HEADER : position + RECORD_HEADER + length])
        position += RECORD_HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): json.loads(item.value_json)
                        for item in record.history.item
                    }
                )
    return rows


def wandb_table(run_dir: Path, name: str) -> dict[str, list]:
    """The last logged table ``name`` of a run: ``{"columns": [...], "data": [[...], ...]}``."""
    files = sorted((run_dir / "files").glob(f"media/table/{name}_*.table.json"))
    return json.loads(files[-1].read_text())
