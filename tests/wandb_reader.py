"""Reads history rows back from a W&B offline run file (`run-<id>.wandb`).

The file is a 7-byte header, then 32 KiB blocks of records; each record chunk
has a 7-byte header (checksum uint32, length uint16, type uint8: 1 full, 2 first,
3 middle, 4 last) followed by its bytes. A whole record is a protobuf `Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - (pos % BLOCK)
        if left_in_block < HEADER:  # block trailer padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:
            pos += left_in_block
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            buf = chunk
        elif kind == FIRST:
            buf = chunk
            continue
        elif kind == MIDDLE:
            buf += chunk
            continue
        elif kind == LAST:
            buf += chunk
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(buf)
        yield rec
        buf = b""


def run_file(run_dir: Path) -> Path:
    """The single offline run file under `run_dir/wandb`."""
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline run file, found {files}"
    return files[0]


def history(run_dir: Path) -> list[dict]:
    """History rows of the offline run."""
    return history_of(run_file(run_dir))


def history_of(path: Path) -> list[dict]:
    """History rows of one offline run file."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def config(run_dir: Path) -> dict:
    """The run config as W&B stored it (top-level keys)."""
    out = {}
    for rec in records(run_file(run_dir)):
        kind = rec.WhichOneof("record_type")
        updates = rec.run.config.update if kind == "run" else rec.config.update if kind == "config" else []
        for item in updates:
            out[item.key] = json.loads(item.value_json)
    return out


def exit_code(run_dir: Path):
    """The exit code the run reported to W&B at finish (None if it never finished)."""
    codes = [rec.exit.exit_code for rec in records(run_file(run_dir)) if rec.WhichOneof("record_type") == "exit"]
    return codes[-1] if codes else None
