"""Tuning: time the cost model's top candidates on the device, keep and record the fastest.

Each candidate is timed by :func:`attncc.timing.measure` (first call, which
compiles, kept apart; warm-up discarded; inputs rotated through enough sets to
exceed L2, so K and V are not served from a cache the real model would not
have warm). A candidate that fails to compile or launch scores as infinitely
slow with its reason, as Triton's own autotuner does, instead of ending the run.

Note [Timing what attncc launches]: a Triton candidate's forward is launched once per input
set through :func:`attncc.runtime.ops.forward` with a recording ``wrap``
(:class:`attncc.machine.launch.Recorder`), and the timing replays those recorded launches:
the kernel runs with exactly the arguments ``attncc.attention`` gives it (the log-sum-exp
written, the score terms' tensors, dropout's seed), and no host work of the wrapper is timed.
A score's terms get random tensors of the shapes a call passes
(:func:`attncc.bench.terms.random_score`), dropout a probability of 0.1.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from attncc import settings
from attncc.autotune.constants import DTYPE_BYTES, DeviceSpec
from attncc.autotune.cost import device_spec
from attncc.autotune.records import TuningKey, TuningRecord, save_record
from attncc.autotune.space import Ranked, describe, rank
from attncc.errors import BuildError, PatternError, TuneError, field_error
from attncc.ir.canonical import canonicalize
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern
from attncc.ir.score import parse_score
from attncc.ir.validate import required_heads
from attncc.lower.lowering import LaunchConfig, kernel_tables
from attncc.lower.plan import KernelPlan
from attncc.lower.render import load
from attncc.machine.launch import Call, Recorder
from attncc.runtime import cutlass_kernel, ops, terms
from attncc.timing import Timing, measure

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_L2_BYTES = 50 * 2**20  # H100's L2; rotated input sets together exceed twice this
_MAX_SETS = 8
DROPOUT_P = 0.1  # Note [Timing what attncc launches]


@dataclass(frozen=True, eq=False)
class Inputs:
    """One input set of a timing: q, k, v, an output and its log-sum-exp (``[B, H, N, D]``,
    ``[B, H, N]``), and the score terms' kernel inputs (attncc.runtime.terms.inputs, the
    dropout seed last) with dropout's probability."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    lse: torch.Tensor
    params: list[torch.Tensor] = field(default_factory=list)
    dropout_p: float = 0.0


@dataclass(frozen=True)
class Trial:
    """One ranked candidate; ``timing`` is None when it was not timed, ``error`` why it failed."""

    ranked: Ranked
    timing: Timing | None = None
    error: str = ""

    @property
    def measured_us(self) -> float:
        """Median microseconds; infinite for a failed candidate, NaN for one not timed."""
        if self.error:
            return math.inf
        return self.timing.median * 1e3 if self.timing else math.nan


@dataclass(frozen=True)
class TuneResult:
    key: TuningKey
    device: DeviceSpec  # what the model ranked for
    trials: tuple[Trial, ...]  # every candidate, in the model's order
    best: Trial
    rank_seconds: float  # building and ranking the search space
    seconds: float  # the whole run: ranking, compiling and timing
    record: TuningRecord


def target_device(device: torch.device) -> DeviceSpec:
    """The model's device: the GPU's table entry, or the default GPU when timing on the CPU."""
    if device.type != "cuda":
        return device_spec()
    props = torch.cuda.get_device_properties(device)
    return device_spec(props.name, props.multi_processor_count)


def tune(
    pattern: Pattern,
    grid: Grid,
    batch: int,
    heads: int,
    head_dim: int,
    dtype: str,
    device: str | torch.device = "cuda",
    top: int = 8,
    score: str = "softmax",
    warmup: int = 5,
    runs: int = 20,
    save: bool = True,
    progress: bool = True,
) -> TuneResult:
    """Rank the search space of ``pattern`` (head-independent) for ``[batch, heads, N, head_dim]``
    inputs, time the ``top`` candidates (and every CUTLASS one) on ``device``, and save the
    winner's record."""
    for name, value, lo in (("batch", batch, 1), ("heads", heads, 1), ("top", top, 1), ("runs", runs, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise field_error(TuneError, name, value, f"an integer >= {lo}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise field_error(TuneError, "warmup", warmup, "an integer >= 0")
    if required_heads(pattern) is not None:
        raise field_error(
            TuneError, "pattern", "per_head(...)", "a head-independent pattern (tune each head's)"
        )
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise field_error(TuneError, "device", str(device), "cpu (no CUDA device is available)")
    start = time.perf_counter()
    pattern = canonicalize(pattern, grid)
    target = target_device(device)
    default = LaunchConfig.default(device.type, head_dim, dtype)
    check_inputs_fit(batch, heads, grid.size, head_dim, dtype, device, score)  # before the ranking's work
    backends = ("triton", "cutlass") if _cutlass_here(device) else ("triton",)
    # Note [Static ranking]: on Hopper the model reads each candidate's sm_90 machine code.
    static = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    ranked = rank(
        pattern, grid, batch * heads, head_dim, dtype, target, score, default, backends, static, device.type
    )
    rank_seconds = time.perf_counter() - start
    inputs = input_sets(batch, heads, grid, head_dim, dtype, device, score)
    timed = []
    with _progress(progress) as bar:
        chosen = ranked[:top] + [r for r in ranked[top:] if r.config.backend == "cutlass"]
        # nvcc takes a core for a minute per CUTLASS candidate: build them side by side first
        # (a build that fails is reported again, as that candidate's error, when it is timed).
        # A plan CUTLASS refuses (a table too large to bake in) is that candidate's error too.
        picked = [r.plan for r in chosen if r.config.backend == "cutlass"]
        cplans = [cutlass_kernel.plan_for(pattern, grid, plan) for plan in picked]
        with contextlib.suppress(BuildError):
            cutlass_kernel.prebuild(c for c in cplans if not isinstance(c, str))
        task = bar.add_task("tuning", total=len(chosen))
        for r in chosen:
            bar.update(task, description=describe(r.config))
            timed.append(time_candidate(r, pattern, grid, inputs, device, warmup, runs))
            bar.advance(task)
    trials = (*timed, *(Trial(r) for r in ranked if r not in chosen))
    best = min(timed, key=lambda t: (t.measured_us, t.ranked.rank))
    if best.error:
        raise TuneError(f"every timed candidate failed; the first: {best.error}")
    seconds = time.perf_counter() - start
    key = TuningKey.of(pattern, grid, batch * heads, head_dim, dtype, score, _device_name(device))
    record = TuningRecord(
        key,
        best.ranked.config,
        best.measured_us,
        best.ranked.prediction.us,
        best.ranked.rank,
        len(timed),
        seconds,
    )
    if save:
        save_record(record)
    return TuneResult(key, target, trials, best, rank_seconds, seconds, record)


def _cutlass_here(device: torch.device) -> bool:
    """CUTLASS candidates join when they can run here and ``ATTNCC_BACKEND`` lets a record pick them."""
    return settings.backend() != "triton" and cutlass_kernel.unavailable(device) is None


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _progress(enabled: bool) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=True)


def input_sets(
    batch: int,
    heads: int,
    grid: Grid,
    head_dim: int,
    dtype: str,
    device: torch.device,
    score: str = "softmax",
) -> list[Inputs]:
    """Input sets to rotate through: together over twice L2, at most 8 sets (refused if they do
    not fit: :func:`check_inputs_fit`); the score's term tensors, random, are shared by them."""
    from attncc.bench.terms import random_score

    n = grid.size
    sets = check_inputs_fit(batch, heads, n, head_dim, dtype, device, score)
    generator = torch.Generator(device=device).manual_seed(0)
    form = parse_score(score)
    scored = random_score(form, batch, heads, grid, _TORCH_DTYPES[dtype], device, generator)
    params = terms.inputs(scored, batch, heads, grid, device)
    dropout_p = DROPOUT_P if form.dropout else 0.0
    if form.dropout:
        params.append(terms.seed_for(0, device))
    out = []
    for _ in range(sets):
        q, k, v = (
            torch.randn(batch, heads, n, head_dim, generator=generator, device=device).to(
                _TORCH_DTYPES[dtype]
            )
            for _ in range(3)
        )
        lse = torch.empty(batch, heads, n, device=device, dtype=torch.float32)
        out.append(Inputs(q, k, v, torch.empty_like(q), lse, params, dropout_p))
    return out


def check_inputs_fit(
    batch: int, heads: int, n: int, head_dim: int, dtype: str, device: torch.device, score: str = "softmax"
) -> int:
    """How many sets :func:`input_sets` makes; a :class:`TuneError` if they would take more than
    half the device's memory (a head count of 10^8 asks for terabytes)."""
    per_set = 4 * batch * heads * n * head_dim * DTYPE_BYTES[dtype]
    sets = 2 if device.type != "cuda" else min(_MAX_SETS, max(2, math.ceil(2 * _L2_BYTES / per_set)))
    # Each set's lse too, the float32 tensor each of q, k, v is drawn as before its cast, and
    # the score's biases (one of each, shared by the sets; the other terms are per head).
    form = parse_score(score)
    biases = (form.query_bias + form.key_bias + n * form.bias) * batch * heads * n * DTYPE_BYTES[dtype]
    need = sets * (per_set + 4 * batch * heads * n) + 4 * batch * heads * n * head_dim + biases
    budget = _memory_bytes(device) // 2
    if need > budget:
        shape = f"B x H x N x D = {batch} x {heads} x {n} x {head_dim}"
        raise field_error(
            TuneError,
            "tuning inputs",
            f"{need / 2**30:,.1f} GiB",
            f"at most {budget / 2**30:,.1f} GiB (half the memory of {device})",
            f"{sets} sets of q, k, v, out and lse for {shape} in {dtype}",
        )
    return sets


def _memory_bytes(device: torch.device) -> int:
    """The memory of ``device``: the GPU's, or the machine's for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def time_candidate(
    r: Ranked,
    pattern: Pattern,
    grid: Grid,
    inputs: list[Inputs],
    device: torch.device,
    warmup: int,
    runs: int,
) -> Trial:
    """Time one candidate's kernel over the rotated ``inputs`` (see :func:`input_sets`; Note
    [Timing what attncc launches])."""
    scale = 1.0 / math.sqrt(r.plan.head_dim)
    try:
        if r.config.backend == "cutlass":
            cplan = cutlass_kernel.plan_for(pattern, grid, r.plan)
            if isinstance(cplan, str):
                raise PatternError(cplan)
            kernel = cutlass_kernel.load(cplan)

            def run(x: Inputs) -> None:
                cutlass_kernel.forward(kernel, x.q, x.k, x.v, x.o, x.lse, scale)

            return Trial(r, measure(run, inputs, device, warmup, runs))
        calls = [_recorded(r.plan, pattern, grid, x, scale) for x in inputs]
        return Trial(r, measure(Call.launch, calls, device, warmup, runs))
    except Exception as e:  # a config the compiler or the device rejects scores as infinitely slow
        return Trial(r, error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])


def _recorded(plan: KernelPlan, pattern: Pattern, grid: Grid, x: Inputs, scale: float) -> Call:
    """The forward launch of ``plan`` that ``attncc.attention`` makes on ``x`` (Note [Timing what
    attncc launches])."""
    module, tables = load(plan), kernel_tables(pattern, grid, plan)
    kernel = ops.Kernel(plan, module, tables, plan, module, tables)  # the forward only is launched
    launches = (ops.Launch(kernel, tuple(range(x.q.shape[1]))),)
    recorder = Recorder()
    bias = -math.log(grid.size)  # sigmoid's default
    ops.forward(
        x.q, x.k, x.v, launches, scale, bias, plan.score == "softmax", x.params, x.dropout_p, recorder
    )
    (call,) = recorder.calls
    return call
