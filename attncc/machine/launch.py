"""Compile the kernels that a launch runs, for a GPU target, on a machine with no GPU.

Note [As launched]: Triton specialises a kernel on its argument values when it is
launched: a stride equal to 1 becomes a constant, and pointers and integers divisible
by 16 carry that hint. A kernel compiled from a hand-written signature is a different
kernel (for the dense forward: 255 registers and spills instead of 159 and none). So
nothing here spells a signature: :func:`capture` runs attncc's own launch path
(:func:`attncc.runtime.ops.forward` and :func:`attncc.runtime.ops.backward`, through the template's
``launch`` functions) with a ``wrap`` that records each ``kernel[grid](*args, **kwargs)``
call instead of running it, and :func:`compile_call` binds those arguments with
Triton's own binder for the target's backend, as ``JITFunction.run`` does, and
compiles the result. The tensors are meta tensors: shapes and strides are real, no
memory is allocated, and their data pointers (0) are 16-byte aligned like a device
allocation's.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from attncc.errors import AttnccError
from attncc.ir.score import parse_score
from attncc.runtime import ops, terms

HOPPER = GPUTarget("cuda", 90, 32)


@dataclass(frozen=True)
class Call:
    """One recorded launch: the kernel, its launch grid and its arguments."""

    kernel: Any  # triton.runtime.jit.JITFunction
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict

    def launch(self) -> None:
        """Run the recorded launch (its tensors are real ones)."""
        self.kernel[self.grid](*self.args, **self.kwargs)


class Recorder:
    """A ``wrap`` for the template's launch functions that records instead of launching (the
    static profile compiles the calls; the tuner times them: :func:`Call.launch`)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def __call__(self, kernel: Any) -> Any:
        recorder = self

        class _Grid:
            def __getitem__(self, grid: tuple[int, ...]):
                def record(*args: Any, **kwargs: Any) -> None:
                    recorder.calls.append(Call(kernel, tuple(grid), args, kwargs))

                return record

        return _Grid()


def capture(
    launches: tuple[ops.Launch, ...],
    shape: tuple[int, int, int, int],
    kv_heads: int,
    dtype: torch.dtype,
    backward: bool,
    score: str = "softmax",
    n_q: int | None = None,
) -> list[Call]:
    """The kernel launches of a forward (and backward) on contiguous ``[B, H, N, D]`` tensors
    (and contiguous score-term tensors: attncc.runtime.terms.placeholders); ``n_q``: q's rows
    when the queries cover a box of the grid (offsets ``[B, 3]`` int32)."""
    b, h, n, d = shape
    n_q = n if n_q is None else n_q
    q = torch.empty((b, h, n_q, d), dtype=dtype, device="meta")
    k, v = (torch.empty((b, kv_heads, n, d), dtype=dtype, device="meta") for _ in range(2))
    recorder = Recorder()
    scale, bias = d**-0.5, 0.0
    params = terms.placeholders(launches[0].kernel.plan, b, h, n, "meta", n_q)
    dropout_p = 0.1 if launches[0].kernel.plan.dropout else 0.0
    write_lse = parse_score(score).kind == "softmax"
    offsets = torch.empty((b, 3), dtype=torch.int32, device="meta") if n_q != n else None
    args = (scale, bias, write_lse, params, dropout_p, recorder, None, offsets)
    o, lse = ops.forward(q, k, v, launches, *args)
    if backward:
        do = torch.empty_like(q)
        dlse = torch.zeros_like(lse)
        ops.backward(q, k, v, o, lse, do, dlse, launches, *args[:2], *args[3:])
    return recorder.calls


@dataclass(frozen=True)
class Compiled:
    """What the compiler made of one call: its kernel's artefacts and ptxas's log."""

    name: str
    cubin: bytes
    ptx: str
    source_file: str  # the rendered module the kernel comes from (line info refers to it)
    num_warps: int
    shared_bytes: int
    ptxas_log: str


def compile_call(call: Call, target: GPUTarget = HOPPER) -> Compiled:
    """Compile ``call`` for ``target`` exactly as ``JITFunction.run`` would (Note [As launched]).

    Triton's cache is bypassed so that ptxas runs and its log (registers, spills,
    warnings) can be kept.
    """
    if target.backend != "cuda":
        raise AttnccError(f"target = {target}: allowed: a CUDA target (GPUTarget('cuda', 90, 32))")
    fn = call.kernel
    kwargs = dict(call.kwargs)
    # The options JITFunction.run adds before binding (present in the triton versions we support).
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*call.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    log = io.StringIO()
    with (
        knobs.compilation.scope(),
        knobs.nvidia.scope(),
        contextlib.redirect_stdout(log),
    ):
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
        )
    return Compiled(
        name=fn.__name__,
        cubin=compiled.asm["cubin"],
        ptx=compiled.asm["ptx"],
        source_file=fn.fn.__code__.co_filename,
        num_warps=compiled.metadata.num_warps,
        shared_bytes=compiled.metadata.shared,
        ptxas_log=log.getvalue(),
    )
