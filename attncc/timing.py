"""Timing one callable the way every attncc figure is taken (benchmarks and autotuning).

Why not a bare loop: device work is asynchronous, the first call compiles, and
repeated runs over one buffer measure the L2 cache. So the first call is timed
on its own (compilation and set-up, reported separately), then warm-up runs are
discarded, then each timed run takes the next input set in rotation and is
bracketed by CUDA events (a synchronised host clock on the CPU). The figure is
the median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Timing:
    """Milliseconds: ``median`` of ``runs`` timed calls, their ``spread`` (max - min), ``first_call``."""

    median: float
    spread: float
    runs: int
    first_call: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _wall(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def measure(
    fn: Callable[[T], object],
    inputs: Sequence[T],
    device: torch.device | str,
    warmup: int = 5,
    runs: int = 30,
) -> Timing:
    """Time ``fn(inputs[i % len(inputs)])``: first call, ``warmup`` discarded runs, then ``runs`` timed."""
    if not inputs:
        raise ValueError("measure needs at least one input set")
    device = torch.device(device)
    first = _wall(lambda: fn(inputs[0]), device)
    for i in range(warmup):
        fn(inputs[(i + 1) % len(inputs)])
    times = []
    for i in range(runs):
        x = inputs[(warmup + 1 + i) % len(inputs)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append(_wall(lambda x=x: fn(x), device))
    return Timing(statistics.median(times), max(times) - min(times), runs, first)


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak bytes allocated on a CUDA device while ``fn`` runs, above what was held before; None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base
