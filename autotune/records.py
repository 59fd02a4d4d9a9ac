"""Tuning records: the best measured config per kernel key, kept in the kernel cache.

A record is keyed by everything that can change which config is fastest: the
canonical pattern (its hash), the grid, batch x heads of the launch, head dim,
dtype, score, the device name and the attncc, torch and triton versions. A
record from another version has another key, so it is never used.

Note [Tuning key scores]: the score in a key is the forward's form of the call's score
(:func:`forward_score`): its terms and dropout, not which term gradients the backward
computes. Tuning times the forward, which those do not change, so a record made for a
frozen table serves the training calls that learn it. Records are
``attncc.runtime.cache`` records of kind ``tuning`` (atomic, checksummed, and carried by
``attncc cache export``/``import`` to machines with no tuning budget).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

from attncc.ir.canonical import pattern_hash
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern
from attncc.ir.score import parse_score
from attncc.lower.lowering import LaunchConfig
from attncc.runtime import cache


def forward_score(score: str) -> str:
    """The text of ``score`` without its ``grad=True`` marks (Note [Tuning key scores])."""
    return dataclasses.replace(parse_score(score), grads=()).text


@dataclass(frozen=True)
class TuningKey:
    pattern: str  # canonical pattern hash on the grid
    grid: tuple[int, ...]
    batch_heads: int
    head_dim: int
    dtype: str
    score: str
    device: str  # torch.cuda.get_device_name(), or "cpu"
    versions: tuple[tuple[str, str], ...]  # (package, version), sorted

    @staticmethod
    def of(
        pattern: Pattern, grid: Grid, batch_heads: int, head_dim: int, dtype: str, score: str, device: str
    ) -> TuningKey:
        import torch
        import triton

        from attncc import __version__

        versions = (("attncc", __version__), ("torch", torch.__version__), ("triton", triton.__version__))
        score = forward_score(score)
        return TuningKey(
            pattern_hash(pattern, grid), grid.shape, batch_heads, head_dim, dtype, score, device, versions
        )

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(_plain(self), sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class TuningRecord:
    """The winner of one tuning run, with what the model predicted and what was measured."""

    key: TuningKey
    config: LaunchConfig
    measured_us: float
    predicted_us: float
    model_rank: int  # the winner's rank by the cost model (1: the model's own pick)
    candidates: int  # timed
    seconds: float  # the whole tuning run


def _plain(obj: object) -> object:
    return json.loads(json.dumps(dataclasses.asdict(obj)))  # type: ignore[call-overload]


KIND = "tuning"


def save_record(record: TuningRecord) -> Path:
    """Store ``record`` in the cache; returns the record's file."""
    label = f"tuning {record.key.dtype} D={record.key.head_dim} grid={'x'.join(map(str, record.key.grid))}"
    entry = cache.put_record(KIND, _plain(record.key), _plain(record), label=label)
    return entry.file(cache.RECORD)


def load_record(key: TuningKey) -> TuningRecord | None:
    """The record for ``key``, or None; a damaged entry (the cache warns) or a malformed or
    mismatched record is ignored with a warning."""
    data = cache.get_record(KIND, _plain(key))
    if data is None:
        return None
    try:
        record = _record(data)
    except (KeyError, TypeError, ValueError) as e:  # AttnccError is a ValueError
        warnings.warn(f"attncc: ignoring malformed tuning record for {key}: {e}", stacklevel=2)
        return None
    if record.key != key:
        warnings.warn(f"attncc: ignoring tuning record for {key}: it holds another key", stacklevel=2)
        return None
    return record


def _record(data: dict) -> TuningRecord:
    k, c = data["key"], data["config"]
    key = TuningKey(
        str(k["pattern"]),
        tuple(int(v) for v in k["grid"]),
        int(k["batch_heads"]),
        int(k["head_dim"]),
        str(k["dtype"]),
        str(k["score"]),
        str(k["device"]),
        tuple((str(a), str(b)) for a, b in k["versions"]),
    )
    boxes = {name: tuple(c[name]) if c[name] is not None else None for name in ("q_box", "kv_box")}
    config = LaunchConfig(**{**c, **boxes})
    return TuningRecord(
        key,
        config,
        float(data["measured_us"]),
        float(data["predicted_us"]),
        int(data["model_rank"]),
        int(data["candidates"]),
        float(data["seconds"]),
    )


def tuned_config(
    pattern: Pattern, grid: Grid, batch_heads: int, head_dim: int, dtype: str, score: str, device_type: str
) -> LaunchConfig | None:
    """The stored config for a launch on the current device of ``device_type``, if tuned."""
    import torch

    device = torch.cuda.get_device_name() if device_type == "cuda" else device_type
    record = load_record(TuningKey.of(pattern, grid, batch_heads, head_dim, dtype, score, device))
    return record.config if record else None
