"""Run benchmark cases: check every peer against attncc, then time it.

Per case: random inputs (normal, never zeros) in several sets that the timing
rotates through, so no one is flattered by a warm L2; our kernel first (its
first call includes compilation, reported apart); then each peer: set-up
(e.g. the block mask) timed on its own, first call timed on its own, output
checked against ours (against our kernel on the dense pattern for the dense
baseline), and only a peer that passes is timed (median of CUDA-event runs,
:func:`attncc.timing.measure`) and its peak memory taken. A peer that fails or
declines is recorded with its reason; the run goes on.

Tolerances (max abs difference from ours): both sides round, so twice the
per-kernel bounds of the GPU tests: fp32 1e-4, fp16 4e-3, bf16 3e-2 on O(1)
outputs. Gradients sum over many keys, so their difference is taken relative
to the largest expected gradient (at least 1) and allowed ten times that.

A case's score terms get random tensors once per case (:func:`attncc.bench.terms.case_terms`),
which every implementation receives; with ``fwd-bwd`` the gradients of its learned terms
are computed, checked and timed with those of q, k and v.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attncc.bench.peers import Attncc, Call, Peer, Tensors
from attncc.bench.suite import Case
from attncc.bench.terms import CaseTerms, case_terms
from attncc.ir import Dense, analyze, canonicalize, dense, resolve_heads
from attncc.timing import measure, peak_memory

MODES = ("fwd", "fwd-bwd")
TOLERANCE = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}
_GRAD_FACTOR = 10
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ROTATE_BYTES = 256 << 20  # input sets per case fill at least this: 5x an H100's 50 MB L2
_MAX_SETS = 8


@dataclass(frozen=True)
class Entry:
    """One implementation on one case. ``status``: ok, declined, failed, wrong (its output
    disagreed with ours: not timed) or unchecked (nothing to check it against: not timed)."""

    peer: str
    status: str
    reason: str = ""
    detail: str = ""
    median_ms: float | None = None
    spread_ms: float | None = None
    runs: int = 0
    first_call_ms: float | None = None
    setup_ms: float | None = None
    peak_bytes: int | None = None
    error: float | None = None
    tolerance: float | None = None


@dataclass(frozen=True)
class CaseResult:
    """A case's figures: density, the plan's tile-level bound, and one entry per implementation."""

    case: Case
    mode: str
    density: float
    tile_bound: float
    plan: str
    entries: tuple[Entry, ...]

    def entry(self, peer: str) -> Entry | None:
        return next((e for e in self.entries if e.peer == peer), None)

    def ms(self, peer: str) -> float | None:
        e = self.entry(peer)
        return e.median_ms if e is not None and e.status == "ok" else None

    def speedup(self, peer: str) -> float | None:
        """How many times faster attncc is than ``peer``."""
        ours, theirs = self.ms("attncc"), self.ms(peer)
        return theirs / ours if ours and theirs else None

    @property
    def efficiency(self) -> float | None:
        """Speedup over dense SDPA / the plan's tile-level bound (1 = the bound is reached); None
        with score terms (SDPA then reads a dense mask: not the dense baseline)."""
        s = self.speedup("sdpa")
        return s / self.tile_bound if s and self.case.score.plain else None


class NoBackward(RuntimeError):
    """The output carries no autograd graph: the implementation has no backward."""


def plan_summary(case: Case, device: torch.device) -> tuple[float, str]:
    """The tile-level bound of the plans our kernel runs (dense tile pairs / visited, all
    heads, both in the plans' tiles: Note [Kernel tile bound] in attncc.lower.visits) and a
    short description of those plans."""
    from attncc.lower.lowering import LaunchConfig, lower, tile_table
    from attncc.lower.plan import RANK
    from attncc.lower.visits import visited_tiles

    config = LaunchConfig.default(device.type, case.head_dim, case.dtype)
    plans: dict = {}
    visited = total = 0
    for head in resolve_heads(case.pattern, case.heads):
        canon = canonicalize(head, case.grid)
        if canon not in plans:
            plan = lower(canon, case.grid, case.head_dim, case.dtype, config=config)
            entries = len(tile_table(canon, case.grid, plan)[1]) if plan.iteration == "table" else 0
            plans[canon] = (plan, visited_tiles(plan, entries))
        v, d = plans[canon][1]
        visited, total = visited + v, total + d
    user = RANK - case.grid.rank  # plans pad every grid to rank 3: show the case's rank
    texts = dict.fromkeys(
        f"{p.iteration} q{'x'.join(map(str, p.q_tile[user:]))}/kv{'x'.join(map(str, p.kv_tile[user:]))}"
        for p, _ in plans.values()
    )
    return total / max(visited, 1), "; ".join(texts)


def input_sets(case: Case, device: torch.device, mode: str, seed: int = 0) -> list[Tensors]:
    """Rotated input sets: q, k, v (and the output gradient for fwd-bwd), standard normal."""
    shape = (case.batch, case.heads, case.tokens, case.head_dim)
    dtype = _DTYPES[case.dtype]
    per_set = (3 if mode == "fwd" else 4) * math.prod(shape) * dtype.itemsize
    count = min(_MAX_SETS, max(2, math.ceil(_ROTATE_BYTES / per_set)))
    gen = torch.Generator(device).manual_seed(seed)
    tensors = 3 if mode == "fwd" else 4
    return [
        tuple(torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(tensors))
        for _ in range(count)
    ]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(call: Call, mode: str, learned: tuple[torch.Tensor, ...]):
    """One timed step: the forward, or the forward and the gradients of q, k, v and ``learned``."""
    if mode == "fwd":
        return call

    def fwd_bwd(a: Tensors):
        *qkv, grad = a
        out = call(tuple(qkv))
        if out.grad_fn is None:
            raise NoBackward("its output has no autograd graph (no backward pass in this build)")
        return out, torch.autograd.grad(out, (*qkv, *learned), grad)

    return fwd_bwd


def _error(peer: Peer, case: Case, got, expected) -> tuple[float, float]:
    """Largest difference from ours and the tolerance it is held to (the worst ratio wins)."""
    tol = TOLERANCE[case.dtype]
    pairs = [(got, expected, 1.0, tol)] if isinstance(got, torch.Tensor) else []
    if not pairs:
        out, grads = got
        expected_out, expected_grads = expected
        pairs = [(out, expected_out, 1.0, tol)]
        if expected_grads is not None:
            for g, e in zip(grads, expected_grads):
                pairs.append((g, e, max(1.0, e.abs().max().item()), tol * _GRAD_FACTOR))
    worst = (0.0, tol)
    for a, b, scale, limit in pairs:
        diff = (peer.standard(case, a).float() - b.float()).abs().max().item() / scale
        if math.isnan(diff):
            return math.inf, limit
        if diff / limit > worst[0] / worst[1]:
            worst = (diff, limit)
    return worst


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def run_entry(
    peer: Peer,
    case: Case,
    device: torch.device,
    sets: Sequence[Tensors],
    mode: str,
    expected,
    warmup: int,
    runs: int,
    terms: CaseTerms,
) -> tuple[Entry, object]:
    """Prepare, check (when ``expected`` is given), then time ``peer`` on ``case`` with its score
    ``terms``.

    Returns the entry and the peer's result on the first input set (None when it failed)."""
    name = peer.name
    reason = peer.decline(case, device)
    if reason:
        return Entry(name, "declined", reason), None
    detail = peer.describe(case, device)
    try:
        with peer.session(case, device):
            _sync(device)
            start = time.perf_counter()
            call = peer.prepare(case, device, terms)
            _sync(device)
            setup = (time.perf_counter() - start) * 1e3
            args = []
            for s in sets:
                adapted = peer.adapt(case, s)
                if mode == "fwd-bwd":
                    adapted = (*(t.detach().requires_grad_() for t in adapted[:3]), adapted[3])
                args.append(adapted)
            step = _step(call, mode, terms.learned)
            results: list = []
            first = measure(lambda a: results.append(step(a)), args[:1], device, warmup=0, runs=1)
            error = tol = None
            if expected is not None:
                error, tol = _error(peer, case, results[0], expected)
                if not error <= tol:
                    reason = f"max |{name} - attncc| = {error:.3g} > tolerance {tol:.3g}: not timed"
                    shown = error if math.isfinite(error) else None  # NaN output: JSON has no inf
                    return Entry(name, "wrong", reason, detail, error=shown, tolerance=tol), None
            elif peer.name != Attncc.name:
                return Entry(name, "unchecked", "attncc gave no result to check it against: not timed"), None
            timing = measure(step, args, device, warmup=warmup, runs=runs)
            peak = peak_memory(lambda: step(args[0]), device)
    except Exception as e:  # one implementation failing must not end the run: it is reported
        return Entry(name, "failed", _short(e), detail), None
    entry = Entry(
        name, "ok", "", detail, timing.median, timing.spread, timing.runs, first.first_call, setup, peak,
        error, tol,
    )  # fmt: skip
    return entry, results[0]


def _is_dense(case: Case) -> bool:
    return all(isinstance(canonicalize(h, case.grid), Dense) for h in resolve_heads(case.pattern, case.heads))


def _forward(pattern, case: Case, sets: Sequence[Tensors], mode: str, terms: CaseTerms):
    """Our kernel's output (and gradients, when it has a backward) on the first input set."""
    from attncc.runtime.library import attention

    q, k, v, *grad = sets[0]
    kwargs = dict(grid=case.grid, score_mod=terms.score, dropout_p=terms.dropout_p, dropout_seed=terms.seed)
    if mode == "fwd":
        with torch.no_grad():
            return attention(q, k, v, pattern, **kwargs)
    leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
    out = attention(*leaves, pattern, **kwargs)
    inputs = (*leaves, *terms.learned)
    grads = torch.autograd.grad(out, inputs, grad[0]) if out.grad_fn is not None else None
    return out.detach(), grads


def run_case(
    case: Case,
    peers: Sequence[Peer],
    device: torch.device,
    mode: str = "fwd",
    warmup: int = 5,
    runs: int = 30,
) -> CaseResult:
    """Every figure of one case; see the module docstring for the procedure."""
    sets = input_sets(case, device, mode)
    start = time.perf_counter()
    bound, plan = plan_summary(case, device)
    plan_ms = (time.perf_counter() - start) * 1e3
    density = analyze(case.pattern, case.grid, 128, 128, heads=case.heads).density
    terms = case_terms(case, device, mode)
    ours, result = run_entry(Attncc(), case, device, sets, mode, None, warmup, runs, terms)
    if ours.status == "ok":
        ours = dataclasses.replace(ours, setup_ms=plan_ms)
    expected = {"pattern": result}
    if result is None and ours.status == "failed" and mode == "fwd-bwd":
        try:  # no backward: peers' outputs are still checked against our forward
            expected["pattern"] = (_forward(case.pattern, case, sets, "fwd", terms), None)
        except Exception:
            expected["pattern"] = None
    entries = [ours]
    for peer in peers:
        computes = peer.computes(case)
        if computes == "dense" and not _is_dense(case):
            if "dense" not in expected:
                try:
                    expected["dense"] = _forward(dense(), case, sets, mode, terms)
                except Exception:
                    expected["dense"] = None
        want = expected["pattern" if computes == "pattern" or "dense" not in expected else "dense"]
        entries.append(run_entry(peer, case, device, sets, mode, want, warmup, runs, terms)[0])
    del sets, expected, terms
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return CaseResult(case, mode, density, bound, plan, tuple(entries))
