"""What attncc is measured against, each behind one small contract.

A :class:`Peer` says why it declines a case (never a silent skip), builds its
callable in :meth:`Peer.prepare` (set-up such as a block mask is timed there,
apart from the first call), may move q/k/v into its own layout outside the
timing (:meth:`Peer.adapt`), and maps its output back to ``[B, H, N, D]`` for
the check (:meth:`Peer.standard`). ``computes`` says what its output must
equal: our pattern's attention, or dense attention (SDPA is the dense
baseline, checked against our kernel on the dense pattern).
"""

from __future__ import annotations

import abc
import contextlib
import importlib
from collections.abc import Callable, Iterator

import torch

from attncc.bench.flexmask import mask_mod
from attncc.bench.suite import Case
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
    computes: str = "pattern"

    def decline(self, case: Case, device: torch.device) -> str | None:
        """Why this peer cannot run ``case`` on ``device``, or None when it can."""
        return None

    @abc.abstractmethod
    def prepare(self, case: Case, device: torch.device) -> Call:
        """The peer's callable on q, k, v for ``case`` (its set-up is done here, timed apart)."""

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

    def prepare(self, case: Case, device: torch.device) -> Call:
        from attncc.runtime.library import attention

        return lambda a: attention(a[0], a[1], a[2], case.pattern, grid=case.grid)


class Sdpa(Peer):
    """Dense ``scaled_dot_product_attention``: flash on a GPU (fp16/bf16), math on the CPU."""

    name = "sdpa"
    computes = "dense"

    def _backend(self, case: Case, device: torch.device):
        from torch.nn.attention import SDPBackend

        flash = device.type == "cuda" and case.dtype in ("float16", "bfloat16")
        return SDPBackend.FLASH_ATTENTION if flash else SDPBackend.MATH

    def prepare(self, case: Case, device: torch.device) -> Call:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return lambda a: sdpa(a[0], a[1], a[2])

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

    def prepare(self, case: Case, device: torch.device) -> Call:
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
        return lambda a: flex(a[0], a[1], a[2], block_mask=block_mask)


class Naive(Peer):
    """Masked attention computed naively (:func:`attncc.reference.attention`, fp32 math)."""

    name = "naive"

    def decline(self, case: Case, device: torch.device) -> str | None:
        pairs = case.batch * case.tokens**2
        need = pairs * (case.heads * _NAIVE_BYTES_PER_PAIR_HEAD + _NAIVE_BYTES_PER_PAIR)
        have = torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda" else _CPU_NAIVE_LIMIT
        if need > have:
            return f"needs ~{need / 2**30:.0f} GiB for N x N matrices; {have / 2**30:.0f} GiB allowed"
        return None

    def prepare(self, case: Case, device: torch.device) -> Call:
        from attncc.reference import attention

        return lambda a: attention(a[0], a[1], a[2], case.pattern, grid=case.grid)


class Natten(Peer):
    """NATTEN's fused neighborhood attention, for plain neighborhood patterns, when installed."""

    name = "natten"

    def _natten(self):
        try:
            return importlib.import_module("natten.functional")
        except ImportError:
            return None

    def decline(self, case: Case, device: torch.device) -> str | None:
        functional = self._natten()
        if functional is None:
            return "natten is not installed"
        if not hasattr(functional, "neighborhood_attention_generic"):
            return "this natten has no neighborhood_attention_generic (needs natten >= 0.20)"
        heads = {canonicalize(p, case.grid) for p in resolve_heads(case.pattern, case.heads)}
        if len(heads) != 1 or not isinstance(next(iter(heads)), Neighborhood):
            return "natten runs one neighborhood pattern on every head, not this pattern"
        return None

    def prepare(self, case: Case, device: torch.device) -> Call:
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

        reason = cutlass_kernel.unavailable(device)
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

    def prepare(self, case: Case, device: torch.device) -> Call:
        return Attncc().prepare(case, device)


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

        reason = cutlass_kernel.unavailable(device)
        if reason is not None:
            return reason
        if self._which(case) is None:
            return "the example runs dense and causal attention only"
        if case.dtype not in ELEMENTS or case.head_dim not in HEAD_DIMS:
            return f"{case.dtype} d{case.head_dim}: built for float16/bfloat16, d64/d128"
        return None

    def prepare(self, case: Case, device: torch.device) -> Call:
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
