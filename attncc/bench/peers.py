"""What attncc is measured against, each behind one small contract.

A :class:`Peer` says why it declines a case (never a silent skip), builds its
callable in :meth:`Peer.prepare` (set-up such as a block mask is timed there,
apart from the first call), may move q/k/v into its own layout outside the
timing (:meth:`Peer.adapt`), and maps its output back to ``[B, H, N, D]`` for
the check (:meth:`Peer.standard`). :meth:`Peer.computes` says what its output must
equal: our pattern's attention, or dense attention (SDPA is the dense
baseline, checked against our kernel on the dense pattern). A case's score terms
reach every peer as the same tensors (:class:`attncc.bench.terms.CaseTerms`): FlexAttention
as a ``score_mod``, SDPA as a float ``attn_mask`` that also masks the pattern (then it
computes the pattern's attention); a peer that cannot run them declines, saying why.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import math
from collections.abc import Callable, Iterator

import torch

from attncc.bench.flexmask import mask_mod
from attncc.bench.suite import Case
from attncc.bench.terms import CaseTerms, dense_bias, score_mod
from attncc.ir import Neighborhood, canonicalize, resolve_heads
from attncc.layouts import Layout

Tensors = tuple[torch.Tensor, ...]
Call = Callable[[Tensors], torch.Tensor]

# The naive peer materialises [H, N, N] scores, probabilities and the mask, plus the
# oracle's int64 [N, N] temporaries while it builds the mask.
_NAIVE_BYTES_PER_PAIR_HEAD = 12
_NAIVE_BYTES_PER_PAIR = 48
_CPU_NAIVE_LIMIT = 4 << 30


class Peer(abc.ABC):
    """One implementation to time against attncc (see the module docstring for the contract)."""

    name: str = ""

    def computes(self, case: Case) -> str:
        """What its output on ``case`` must equal: "pattern" (ours) or "dense" (ours on dense)."""
        return "pattern"

    def decline(self, case: Case, device: torch.device) -> str | None:
        """Why this peer cannot run ``case`` on ``device``, or None when it can; by default it
        runs no score terms (nor dropout)."""
        if not case.score.plain:
            return f"runs no score terms ({case.score.text})"
        return None

    @abc.abstractmethod
    def prepare(self, case: Case, device: torch.device, terms: CaseTerms) -> Call:
        """The peer's callable on q, k, v for ``case`` with its score ``terms`` (its set-up is
        done here, timed apart)."""

    def adapt(self, case: Case, tensors: Tensors) -> Tensors:
        """q, k, v (and the output gradient) in this peer's layout; default ``[B, H, N, D]``."""
        return tensors

    def standard(self, case: Case, t: torch.Tensor) -> torch.Tensor:
        return t

    @contextlib.contextmanager
    def session(self, case: Case, device: torch.device) -> Iterator[None]:
        """Held around every call of the peer (backend selection), outside each timed call."""
        yield

    def describe(self, case: Case, device: torch.device) -> str:
        return ""


class Attncc(Peer):
    """Ours: ``attncc.attention`` (compiled on its first call)."""

    name = "attncc"

    def decline(self, case: Case, device: torch.device) -> str | None:
        return None

    def prepare(self, case: Case, device: torch.device, terms: CaseTerms) -> Call:
        from attncc.runtime.library import attention

        score, p, seed = terms.score, terms.dropout_p, terms.seed
        return lambda a: attention(
            a[0], a[1], a[2], case.pattern, grid=case.grid, score_mod=score, dropout_p=p, dropout_seed=seed
        )


class Sdpa(Peer):
    """Dense ``scaled_dot_product_attention``: flash on a GPU (fp16/bf16), math on the CPU.

    With score terms it takes them as a float ``attn_mask`` ``[B, H, N, N]``: their sum where
    the pattern keeps a pair, -inf elsewhere (built once in the set-up, or in every call when
    a term is learned, so its gradient flows), on the memory-efficient kernel (flash takes no
    mask), and so computes the pattern's attention. Only additive terms can be a mask."""

    name = "sdpa"

    def computes(self, case: Case) -> str:
        return "dense" if case.score.plain else "pattern"

    def decline(self, case: Case, device: torch.device) -> str | None:
        score = case.score
        if score.plain:
            return None
        if score.kind != "softmax":
            return "normalises by softmax only"
        if score.dropout:
            return "its dropout draws another mask than ours: the outputs cannot be checked"
        other = [n for n in ("softcap", "temperature") if score.has(n)]
        if other:
            return f"{' and '.join(other)} is not an additive bias: an attn_mask cannot carry it"
        need = case.batch * case.heads * case.tokens**2 * (getattr(torch, case.dtype).itemsize + 4)
        have = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else _CPU_NAIVE_LIMIT
        if need > have:
            return f"its attn_mask needs ~{need / 2**30:.0f} GiB; {have / 2**30:.0f} GiB allowed"
        return None

    def _backend(self, case: Case, device: torch.device):
        from torch.nn.attention import SDPBackend

        if device.type != "cuda" or case.dtype not in ("float16", "bfloat16"):
            return SDPBackend.MATH
        return SDPBackend.FLASH_ATTENTION if case.score.plain else SDPBackend.EFFICIENT_ATTENTION

    def prepare(self, case: Case, device: torch.device, terms: CaseTerms) -> Call:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if case.score.plain:
            return lambda a: sdpa(a[0], a[1], a[2])
        mod = score_mod(terms.score, case.pattern, case.grid, case.heads, device)
        keep_mod, _ = mask_mod(case.pattern, case.grid, case.heads, device)
        b, h, n, dtype = case.batch, case.heads, case.tokens, getattr(torch, case.dtype)
        idx = torch.arange(n, device=device)
        keep = (
            None
            if keep_mod is None
            else keep_mod(0, torch.arange(h, device=device)[:, None, None], idx[:, None], idx)
        )

        def mask() -> torch.Tensor:
            bias = dense_bias(mod, b, h, n, dtype, device)
            return bias if keep is None else bias.masked_fill(~keep, -math.inf)

        if terms.learned:  # rebuilt in each call: autograd reaches the learned tensors through it
            return lambda a: sdpa(a[0], a[1], a[2], attn_mask=mask())
        fixed = mask()
        return lambda a: sdpa(a[0], a[1], a[2], attn_mask=fixed)

    @contextlib.contextmanager
    def session(self, case: Case, device: torch.device) -> Iterator[None]:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(self._backend(case, device)):
            yield

    def describe(self, case: Case, device: torch.device) -> str:
        return self._backend(case, device).name.lower()


class Flex(Peer):
    """``torch.compile(flex_attention)`` with a block mask of the same pattern.

    The mask_mod comes from the IR (:mod:`attncc.bench.flexmask`); the block
    mask is built in :meth:`prepare` (its time is the set-up figure), compiled
    on a GPU as FlexAttention's docs advise. Dynamo's caches are reset per
    case so its recompile limit never sends a later case to the eager path.
    """

    name = "flex"

    def decline(self, case: Case, device: torch.device) -> str | None:
        if case.score.kind != "softmax":
            return "normalises by softmax only"
        if case.score.dropout:
            return "has no dropout"
        return None

    def prepare(self, case: Case, device: torch.device, terms: CaseTerms) -> Call:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        torch._dynamo.reset()
        mod, heads = mask_mod(case.pattern, case.grid, case.heads, device)
        n = case.tokens
        block_mask = None
        if mod is not None:
            block_mask = create_block_mask(
                mod, None, None if heads == 1 else heads, n, n, device=device, _compile=device.type == "cuda"
            )
        flex = torch.compile(flex_attention, dynamic=False)
        if terms.plain:
            return lambda a: flex(a[0], a[1], a[2], block_mask=block_mask)
        mod = score_mod(terms.score, case.pattern, case.grid, case.heads, device)
        return lambda a: flex(a[0], a[1], a[2], score_mod=mod, block_mask=block_mask)


class Naive(Peer):
    """Masked attention computed naively (:func:`attncc.reference.attention`, fp32 math)."""

    name = "naive"

    def decline(self, case: Case, device: torch.device) -> str | None:
        if case.score.dropout:
            return "draws no dropout mask of its own (it applies a given one)"
        pairs = case.batch * case.tokens**2
        need = pairs * (case.heads * _NAIVE_BYTES_PER_PAIR_HEAD + _NAIVE_BYTES_PER_PAIR)
        have = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else _CPU_NAIVE_LIMIT
        if need > have:
            return f"needs ~{need / 2**30:.0f} GiB for N x N matrices; {have / 2**30:.0f} GiB allowed"
        return None

    def prepare(self, case: Case, device: torch.device, terms: CaseTerms) -> Call:
        from attncc.reference import attention

        score = terms.score
        return lambda a: attention(a[0], a[1], a[2], case.pattern, grid=case.grid, score_mod=score)


class Natten(Peer):
    """NATTEN's fused neighborhood attention, for plain neighborhood patterns, when installed."""

    name = "natten"

    def _natten(self):
        try:
            return importlib.import_module("natten.functional")
        except ImportError:
            return None

    def decline(self, case: Case, device: torch.device) -> str | None:
        if not case.score.plain:
            return super().decline(case, device)
        functional = self._natten()
        if functional is None:
            return "natten is not installed"
        if not hasattr(functional, "neighborhood_attention_generic"):
            return "this natten has no neighborhood_attention_generic (needs natten >= 0.20)"
        heads = {canonicalize(p, case.grid) for p in resolve_heads(case.pattern, case.heads)}
        if len(heads) != 1 or not isinstance(next(iter(heads)), Neighborhood):
            return "natten runs one neighborhood pattern on every head, not this pattern"
        return None

    def prepare(self, case: Case, device: torch.device, terms: CaseTerms) -> Call:
        functional = self._natten()
        (p,) = {canonicalize(h, case.grid) for h in resolve_heads(case.pattern, case.heads)}
        rank = case.grid.rank

        def per_axis(value):
            return value if isinstance(value, tuple) else (value,) * rank

        kwargs = dict(
            kernel_size=per_axis(p.window),
            stride=per_axis(p.stride),
            dilation=per_axis(p.dilation),
            is_causal=per_axis(p.causal),
        )
        return lambda a: functional.neighborhood_attention_generic(a[0], a[1], a[2], **kwargs)

    def adapt(self, case: Case, tensors: Tensors) -> Tensors:
        """NATTEN's ``[B, *grid, H, D]`` layout, copied outside the timing."""
        return tuple(Layout(case.grid, spatial=True).output(t).contiguous() for t in tensors)

    def standard(self, case: Case, t: torch.Tensor) -> torch.Tensor:
        return Layout(case.grid, spatial=True)(t)


class AttnccCutlass(Peer):
    """attncc with its CUTLASS forward (``ATTNCC_BACKEND=cutlass``; the backward stays Triton's),
    beside the default: the two backends side by side, permutation included."""

    name = "attncc-cutlass"

    def decline(self, case: Case, device: torch.device) -> str | None:
        from attncc.lower.lowering import lower
        from attncc.runtime import cutlass_kernel
        from attncc.runtime.ops import cutlass_config

        reason = super().decline(case, device) or cutlass_kernel.unavailable(device)
        if reason is not None:
            return reason
        heads = {canonicalize(p, case.grid) for p in resolve_heads(case.pattern, case.heads)}
        if len(heads) != 1:
            return "per-head patterns run on Triton"
        pattern = heads.pop()
        plan = lower(pattern, case.grid, case.head_dim, case.dtype, config=cutlass_config(case.head_dim))
        cplan = cutlass_kernel.plan_for(pattern, case.grid, plan)
        return cplan if isinstance(cplan, str) else None

    @contextlib.contextmanager
    def session(self, case: Case, device: torch.device) -> Iterator[None]:
        from attncc.runtime.library import forget_kernels

        with _environment("ATTNCC_BACKEND", "cutlass"):
            forget_kernels()
            try:
                yield
            finally:
                forget_kernels()

    def prepare(self, case: Case, device: torch.device, terms: CaseTerms) -> Call:
        return Attncc().prepare(case, device, terms)


class CutlassExample(Peer):
    """The CUTLASS Hopper FMHA example's own kernel (dense or causal, its 1/sqrt(D) scale):
    what the templating must not lose (issue: within 3% on dense)."""

    name = "cutlass-example"

    def _which(self, case: Case) -> str | None:
        from attncc.ir import Causal, Dense

        heads = {canonicalize(p, case.grid) for p in resolve_heads(case.pattern, case.heads)}
        p = heads.pop() if len(heads) == 1 else None
        if isinstance(p, Dense):
            return "dense"
        if isinstance(p, Causal) and case.grid.rank == 1:
            return "causal"
        return None

    def decline(self, case: Case, device: torch.device) -> str | None:
        from attncc.lower.cutlass import ELEMENTS, HEAD_DIMS
        from attncc.runtime import cutlass_kernel

        reason = super().decline(case, device) or cutlass_kernel.unavailable(device)
        if reason is not None:
            return reason
        if self._which(case) is None:
            return "the example runs dense and causal attention only"
        if case.dtype not in ELEMENTS or case.head_dim not in HEAD_DIMS:
            return f"{case.dtype} d{case.head_dim}: built for float16/bfloat16, d64/d128"
        return None

    def prepare(self, case: Case, device: torch.device, terms: CaseTerms) -> Call:
        from attncc.runtime import cutlass_kernel

        run = cutlass_kernel.example(case.dtype, case.head_dim, self._which(case) == "causal")
        return lambda a: run(a[0], a[1], a[2])


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    import os

    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


PEERS: dict[str, type[Peer]] = {
    "sdpa": Sdpa,
    "flex": Flex,
    "naive": Naive,
    "natten": Natten,
    "attncc-cutlass": AttnccCutlass,
    "cutlass-example": CutlassExample,
}
