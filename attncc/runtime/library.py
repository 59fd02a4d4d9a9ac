"""``attncc.attention`` and the torch.library ops behind it.

Every kernel launch goes through an op in the ``attncc`` namespace, so autograd
and torch.compile see one operator with a registered backward:

- ``attncc::fwd`` / ``attncc::bwd`` are ``triton_op``s whose launches go through
  ``wrap_triton``: on a GPU, torch.compile sees into the kernels.
- ``attncc::fwd_opaque`` / ``attncc::bwd_opaque`` are ``custom_op``s with a
  ``register_fake``: torch.compile treats them as opaque calls. They serve the
  Triton CPU interpreter, which inductor cannot compile, and CUTLASS kernels
  (a C call torch.compile cannot see into): on a GPU they are used whenever
  ``ATTNCC_BACKEND`` lets CUTLASS run (:func:`attncc.settings.backend`).

The pattern travels as its text (``attncc.ir.text``), the score as its text
(``attncc.ir.score``: ``"softmax"``, ``"softcap(30.0) + alibi(0.5, 0.25)"``, ...) and the grid
as a list of ints, so an op's arguments are tensors and constants only: the graph holds no
Python objects, and lowering and rendering happen inside the op on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable

import torch
from torch.library import custom_op, register_autograd, register_fake, triton_op, wrap_triton

from attncc import settings
from attncc.errors import AttnccError, field_error, form_error
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern
from attncc.ir.score import Score, as_score, checked, parse_score
from attncc.ir.segments import BySegments
from attncc.ir.symbolic import RUNTIME_KINDS
from attncc.ir.text import format_pattern, parse
from attncc.ir.validate import validate
from attncc.layouts import Views, cross_views, query_offsets, to_sdpa_views
from attncc.memo import forget_all, memo
from attncc.runtime import cross, decode, decode_op, dynamo, ops, terms  # noqa: F401 (registers the nodes, the ops)
from attncc.runtime import data as call_data
from attncc.runtime import segments as segment_kernels
from attncc.score_fn import ScoreFunction, score_terms


@memo
def _launches(pattern: str, grid: tuple[int, ...], batch: int, heads: int, head_dim: int, dtype: torch.dtype,
              device: str, score: str, region: tuple[int, ...] | None) -> tuple[ops.Launch, ...]:  # fmt: skip
    dtype_ = ops.DTYPES[dtype]
    return ops.launches(parse(pattern), Grid(grid), batch, heads, head_dim, dtype_, device, score, region)


def forget_kernels() -> None:
    """Drop every per-process memo of compiled kernels (the next call looks in the cache and
    the tuning records again): for tests, and after ``attncc cache clear`` in a live process."""
    forget_all()


# Note [Term arguments]: the ops take the score terms' tensors (and dropout's seed) as one
# optional tensor each, in the order of attncc.ir.score.INPUTS, not as a list: AOTInductor
# hands an op an empty Tensor[] argument as None, which the op's schema refuses.
TERMS = ("temperature", "alibi", "rel_pos_bias", "query_bias", "key_bias", "bias", "seed")
Terms = tuple[torch.Tensor | None, ...]
# The data a call gives its pattern's runtime leaves (Note [Runtime plans] in attncc.lower.plan),
# each an optional tensor of the ops for the same reason.
DATA = RUNTIME_KINDS


def _params(terms_: Terms) -> list[torch.Tensor]:
    return [t for t in terms_ if t is not None]


def _data(data_: Terms) -> dict[str, torch.Tensor]:
    return {name: t for name, t in zip(DATA, data_) if t is not None}


def _fwd(q, k, v, pattern, grid, scale, score, bias, terms_, dropout_p, data_, region, q_offset, wrap):
    b, h, _, d = q.shape
    plan = _launches(pattern, tuple(grid), b, h, d, q.dtype, q.device.type, score, _box(region))
    write_lse = parse_score(score).kind == "softmax"
    params, data = _params(terms_), _data(data_)
    return ops.forward(q, k, v, plan, scale, bias, write_lse, params, dropout_p, wrap, data, q_offset)


def _bwd(q, k, v, o, lse, do, dlse, pattern, grid, scale, score, bias, terms_, dropout_p, data_, region,
         q_offset, wrap):  # fmt: skip
    b, h, _, d = q.shape
    plan = _launches(pattern, tuple(grid), b, h, d, q.dtype, q.device.type, score, _box(region))
    params, data = _params(terms_), _data(data_)
    return ops.backward(q, k, v, o, lse, do, dlse, plan, scale, bias, params, dropout_p, wrap, data, q_offset)


def _box(region: list[int] | None) -> tuple[int, ...] | None:
    return None if region is None else tuple(region)


@triton_op("attncc::fwd", mutates_args=())
def fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: str,
    grid: list[int],
    scale: float,
    score: str,
    bias: float,
    temperature: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    rel_pos_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    dense_bias: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    block_mask: torch.Tensor | None = None,
    topk_blocks: torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    region: list[int] | None = None,
    q_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward on ``[B, H, N, D]`` tensors: (out, lse float32 ``[B, H, N]``). ``score`` is the
    score's form (its text: attncc.ir.score); ``temperature`` .. ``seed`` its terms' views
    (attncc.runtime.terms.inputs) and dropout's seed, ``block_mask`` .. ``key_mask`` the
    pattern's runtime data (attncc.runtime.data), None where there are none (Note [Term
    arguments])."""
    terms_ = (temperature, alibi, rel_pos_bias, query_bias, key_bias, dense_bias, seed)
    data_ = (block_mask, topk_blocks, documents, key_lengths, key_mask)
    return _fwd(
        q, k, v, pattern, grid, scale, score, bias, terms_, dropout_p, data_, region, q_offset, wrap_triton
    )


@triton_op("attncc::bwd", mutates_args=())
def bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    dlse: torch.Tensor,
    pattern: str,
    grid: list[int],
    scale: float,
    score: str,
    bias: float,
    temperature: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    rel_pos_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    dense_bias: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    block_mask: torch.Tensor | None = None,
    topk_blocks: torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    region: list[int] | None = None,
    q_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Backward: (dq, dk, dv, the gradients of the score's ``grad=True`` terms, in its order),
    given the gradients of out (``do``) and of lse (``dlse``)."""
    terms_ = (temperature, alibi, rel_pos_bias, query_bias, key_bias, dense_bias, seed)
    data_ = (block_mask, topk_blocks, documents, key_lengths, key_mask)
    return _bwd(
        q, k, v, o, lse, do, dlse, pattern, grid, scale, score, bias, terms_, dropout_p, data_, wrap_triton
    )


@custom_op("attncc::fwd_opaque", mutates_args=())
def fwd_opaque(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: str,
    grid: list[int],
    scale: float,
    score: str,
    bias: float,
    temperature: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    rel_pos_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    dense_bias: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    block_mask: torch.Tensor | None = None,
    topk_blocks: torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    region: list[int] | None = None,
    q_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fwd` as an opaque op (the CPU interpreter)."""
    terms_ = (temperature, alibi, rel_pos_bias, query_bias, key_bias, dense_bias, seed)
    data_ = (block_mask, topk_blocks, documents, key_lengths, key_mask)
    return _fwd(q, k, v, pattern, grid, scale, score, bias, terms_, dropout_p, data_, region, q_offset, None)


@custom_op("attncc::bwd_opaque", mutates_args=())
def bwd_opaque(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    do: torch.Tensor,
    dlse: torch.Tensor,
    pattern: str,
    grid: list[int],
    scale: float,
    score: str,
    bias: float,
    temperature: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    rel_pos_bias: torch.Tensor | None = None,
    query_bias: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
    dense_bias: torch.Tensor | None = None,
    seed: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    block_mask: torch.Tensor | None = None,
    topk_blocks: torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    region: list[int] | None = None,
    q_offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """:func:`bwd` as an opaque op."""
    terms_ = (temperature, alibi, rel_pos_bias, query_bias, key_bias, dense_bias, seed)
    data_ = (block_mask, topk_blocks, documents, key_lengths, key_mask)
    return _bwd(
        q, k, v, o, lse, do, dlse, pattern, grid, scale, score, bias, terms_, dropout_p, data_, region,
        q_offset, None,
    )  # fmt: skip


@register_fake("attncc::fwd_opaque")
def _fwd_fake(q, k, v, pattern, grid, scale, score, bias, *terms_and_p):
    b, h, n, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, n), dtype=torch.float32)


@register_fake("attncc::bwd_opaque")
def _bwd_fake(q, k, v, o, lse, do, dlse, pattern, grid, scale, score, bias, *terms_and_p):
    by_name = dict(zip(TERMS, terms_and_p))  # then dropout_p and the data
    grads = [torch.empty_like(by_name[name]) for name in parse_score(score).grads]
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), grads


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, pattern, grid, scale, score, bias, *rest = inputs
    terms_, dropout_p = rest[: len(TERMS)], rest[len(TERMS)]
    data_, (region, q_offset) = rest[len(TERMS) + 1 : -2], rest[-2:]
    o, lse = output
    ctx.given = tuple(t is not None for t in (*terms_, *data_, q_offset))
    ctx.save_for_backward(q, k, v, o, lse, *_params((*terms_, *data_, q_offset)))
    ctx.args = (pattern, grid, scale, score, bias)
    ctx.dropout_p, ctx.region = dropout_p, region


def _backward_with(op):
    def backward(ctx, do, dlse):
        q, k, v, o, lse, *params = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else do
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        given = iter(params)
        both = [next(given) if here else None for here in ctx.given]
        terms_, data_, q_offset = both[: len(TERMS)], both[len(TERMS) : -1], both[-1]
        dq, dk, dv, grads = op(
            q, k, v, o, lse, do, dlse, *ctx.args, *terms_, ctx.dropout_p, *data_, ctx.region, q_offset
        )
        dterms: list[torch.Tensor | None] = [None] * len(TERMS)
        for name, grad in zip(parse_score(ctx.args[3]).grads, grads):
            dterms[TERMS.index(name)] = grad
        return dq, dk, dv, None, None, None, None, None, *dterms, None, *[None] * len(DATA), None, None

    return backward


register_autograd("attncc::fwd", _backward_with(bwd), setup_context=_setup_context)
register_autograd("attncc::fwd_opaque", _backward_with(bwd_opaque), setup_context=_setup_context)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float | None = None,
    return_lse: bool = False,
    grid: Grid | tuple[int, ...] | None = None,
    out: torch.Tensor | None = None,
    score: str | Score = "softmax",
    sigmoid_bias: float | None = None,
    layout: str | None = None,
    score_mod: Score | Callable | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    data: dict[str, torch.Tensor] | None = None,
    q_offset: object = None,
    q_grid: Grid | tuple[int, ...] | int | None = None,
    block_table: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention of ``pattern`` with fused, pattern-specialised kernels (differentiable).

    Same layouts and semantics as :func:`attncc.reference.attention`: SDPA
    ``[B, H, N, D]`` (grid from ``grid`` or ``(N,)``) or spatial
    ``[B, *grid, H, D]``; ``k``/``v`` may have fewer heads (GQA/MQA). Returns
    the output in ``q``'s dtype and layout, and with ``return_lse`` the
    natural-log log-sum-exp in float32 (differentiable too). ``out`` (same
    shape and dtype as ``q``) receives a copy of the result when given.
    ``score="sigmoid"`` computes sigmoid attention (bias default ``-ln(N)``,
    no log-sum-exp). ``score_mod`` (or ``score``) takes score terms (Note [Score terms] in
    attncc.ir.score), composed with ``+``: ``attncc.ir.softcap(c)`` (``c * tanh(s / c)`` of the
    scaled score ``s``, Gemma-2), ``temperature(t)`` (``[H]``), ``alibi(slopes)`` (one slope
    per query head; ``distance=`` 'flat', 'signed' or 'axes'), ``rel_pos_bias(table)``
    (``[H or 1, 2 r + 1, ...]``, NATTEN's and Swin's), ``query_bias``/``key_bias``
    (``[B or 1, H or 1, N]``) and ``bias`` (``[B or 1, H or 1, N, N]``), e.g.
    ``score_mod=softcap(50.0) + rel_pos_bias(table)``, or a function ``score_mod(score, b, h,
    q, k)`` traced into those terms (attncc.score_fn: ``lambda score, b, h, q, k: score +
    table[h, k.index - q.index + 6]``; ``q``/``k`` carry ``index`` and the grid coordinates
    ``n``, or ``h, w``, or ``t, h, w``). Gradients flow to q, k, v and every
    term tensor that requires grad. ``dropout_p`` drops attention probabilities (the kept ones
    scaled by ``1 / (1 - p)``) by a Philox stream of ``dropout_seed`` (drawn from torch's
    generator when None); the backward regenerates the same mask. ``layout`` ('sdpa' or
    'spatial') says how a 4-D q reads where its shape does not (Note [Ambiguous layouts] in
    attncc.layouts). ``data`` gives the pattern's primitives whose data come with each call
    (``block_mask``, ``topk_blocks``, ``documents``/``cu_seqlens``, ``key_lengths``, ``key_mask``:
    attncc.runtime.data); new data reuse the compiled kernels.

    ``q`` may cover a part of ``k``'s grid (a KV cache's newest rows, a chunk of a prefill,
    a box of an image): whole rows (SDPA), or a box of whole slices (spatial, or SDPA on a
    ``grid``); ``q_offset`` places it, in grid coordinates: None (the last rows, i.e.
    bottom-right), an int or a tuple per axis, or a tensor ``[B]``/``[B, rank]`` per batch element
    (clamped to the grid; new values reuse the kernels and torch.compile's graph). Patterns read
    every query at its place in the grid (Note [Query regions] in attncc.lower.plan); a region
    along a dilated axis is refused. A forward call with 1 to 64 queries over a longer 1-D key
    sequence is a decode step, run by the decode kernels (Note [Decode dispatch] in
    attncc.runtime.decode).

    ``block_table`` (an integer ``[B, pages per sequence]`` tensor) says k and v are pools of pages
    ``[pages, page size, H_kv, D]`` (a paged KV cache, as vLLM and FlashInfer keep it): sequence
    ``b``'s keys ``j x page .. (j + 1) x page - 1`` are page ``block_table[b, j]``, its length is
    pages per sequence x page size, and ``q_offset`` places the queries in it as in a contiguous
    cache (pass each sequence's position: its later pages are never seen by a causal pattern;
    add ``key_lengths()`` for others). A decode step reads the pools in place (Note [Paged
    caches] in attncc.lower.decode); any other call gathers them first.

    ``q_grid`` (a Grid, a tuple of sizes, or an int for a sequence) puts q on a grid of its own,
    independent of k's: cross-attention (Note [Cross-attention] in attncc.runtime.cross). q is
    then ``[B, H, prod(q_grid), D]`` (any length, longer or shorter than k's) or, spatial,
    ``[B, *q_grid, H, D]`` (the one q's shape fits, else ``layout`` or k's shape says: attncc.layouts.
    cross_views); ``grid`` stays k's.
    Across grids a pattern compares no query's place with a key's: ``dense()``,
    ``key_lengths()``, ``key_range`` on a 1-D k, and ``documents()`` with ``data={"documents":
    key_ids [B|1, Nk], "query_documents": query_ids [B|1, Nq]}`` (a query sees the keys of its
    id: the text tokens of an image see that image), combined with ``|``, ``&``, ``per_head``;
    the score terms temperature, softcap, query_bias ``[.., Nq]``, key_bias ``[.., Nk]``, bias
    ``[.., Nq, Nk]``, and dropout. Others, and ``q_offset``, are refused. For example, text
    tokens over the keys of their image::

        out = attncc.attention(text_q, image_k, image_v, documents(), q_grid=77,
                               data={"documents": image_of_key, "query_documents": image_of_text})

    A pattern per pair of segments (``by_segments``: Note [Segment spaces] in attncc.ir.segments)
    runs on ``[B, H, N, D]`` tensors of its whole space (``N = pattern.space.size``; k and v may
    have fewer heads) as one kernel per direction, each segment tiled on its own grid (Note
    [Segment kernels] in attncc.lower.segments): softmax with ``scale``, ``return_lse`` and
    ``out``; the other arguments are refused, naming them::

        space = segments(text=226, video=(16, 48, 48))
        pattern = by_segments(space, {("text", "*"): dense(), ("video", "video"): neighborhood((3, 7, 7)),
                                      ("video", "text"): dense()})
        out = attncc.attention(q, k, v, pattern)  # q, k, v: [B, H, 226 + 16 * 48 * 48, D]
    """
    if isinstance(pattern, BySegments):  # Note [Segment kernels] in attncc.lower.segments
        others = {
            "grid": grid, "q_offset": q_offset, "q_grid": q_grid, "block_table": block_table, "data": data,
            "sigmoid_bias": sigmoid_bias, "dropout_seed": dropout_seed,
        }  # fmt: skip
        return _segments(
            q, k, v, pattern, scale, return_lse, out, score, score_mod, layout, dropout_p, others
        )
    pages = None
    if block_table is not None:  # Note [Paged caches] in attncc.lower.decode
        if q_grid is not None:
            raise field_error(AttnccError, "q_grid", q_grid, "None with a block_table (a paged KV cache)")
        k, v, pages = _paged(q, k, v, block_table, grid, layout)
    if q_grid is not None:
        if q_offset is not None:
            allowed = "None with q_grid (queries on a grid of their own have no place among the keys)"
            raise field_error(AttnccError, "q_offset", q_offset, allowed)
        return _cross(
            q, k, v, pattern, q_grid, scale, return_lse, grid, out, score, sigmoid_bias, layout, score_mod,
            dropout_p, dropout_seed, data,
        )  # fmt: skip
    text_of = functools.partial(_text, pattern)
    data_of = functools.partial(_data_of, pattern, data)
    return attend(
        q, k, v, text_of, scale, return_lse, grid, out, score, sigmoid_bias, layout, score_mod, dropout_p,
        dropout_seed, data_of, q_offset, pages,
    )  # fmt: skip


def _segments(q, k, v, pattern, scale, return_lse, out, score, score_mod, layout, dropout_p, others):
    """:func:`attention` of a pattern per pair of segments (Note [Segment kernels] in
    attncc.lower.segments): softmax with a scale and an optional soft-cap on ``[B, H, N, D]``
    tensors of its whole space; every other argument is refused, naming it."""
    why = "a pattern per pair of segments runs softmax (soft-capped or not) on [B, H, N, D] of its space"
    for name, value in others.items():
        if value is not None and not (name == "data" and not value):
            shown = sorted(value) if name == "data" and isinstance(value, dict) else value
            raise field_error(AttnccError, name, shown, "None", why)
    if callable(score_mod) and not isinstance(score_mod, Score):
        raise field_error(AttnccError, "score_mod", "a function", "None or score terms", why)
    terms_ = _combined(score, score_mod, "", Grid((1,)), 1, q.device)  # a function was refused above
    if dataclasses.replace(terms_, softcap=None) != Score():
        allowed = "softmax with softcap(c) or nothing (the segments kernels take no other term yet)"
        raise field_error(AttnccError, "score", terms_.text, allowed, why)
    if _probability(dropout_p) > 0:
        raise field_error(AttnccError, "dropout_p", dropout_p, "0.0 (no dropout yet)", why)
    if layout not in (None, "sdpa"):
        raise field_error(AttnccError, "layout", layout, "None or 'sdpa'", why)
    n = pattern.space.size
    views = to_sdpa_views(q, k, v, (n,), "sdpa")
    if views.region != views.grid.shape:
        allowed = f"[B, H, {n}, D]: every token of {pattern.space}"
        raise field_error(AttnccError, "q shape", tuple(q.shape), allowed)
    if q.dtype not in ops.DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        allowed = "float16, bfloat16 or float32, the same for q, k and v"
        raise field_error(AttnccError, "dtype", (q.dtype, k.dtype, v.dtype), allowed)
    if not (q.device == k.device == v.device):
        raise field_error(AttnccError, "device", (q.device, k.device, v.device), "one device for q, k, v")
    if q.device.type == "cpu":
        _check_interpreter()
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise field_error(AttnccError, "out", (tuple(out.shape), out.dtype), f"{tuple(q.shape)} {q.dtype}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else _real("scale", scale)
    if not (math.isfinite(scale) and scale > 0):  # Note [Scale] in the Triton template
        raise field_error(AttnccError, "scale", scale, "a finite number > 0 (or None: 1 / sqrt(head dim))")
    qs, ks, vs = views.q, views.k, views.v
    wide = q.device.type == "cpu" and q.dtype == torch.bfloat16  # Note [bf16 on the CPU]
    if wide:
        qs, ks, vs = qs.float(), ks.float(), vs.float()
    o, lse = segment_kernels.attention(qs, ks, vs, pattern, scale, terms_.softcap)
    result = views.out.output(o.to(q.dtype) if wide else o)
    if out is not None:
        result = out.copy_(result)
    return (result, views.out.lse(lse)) if return_lse else result


def _paged(q, k, v, table, grid, layout) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Logical ``[B, H_kv, N, D]`` stand-ins for pools of pages ``k``/``v`` ``[pages, page, H_kv,
    D]`` read through ``table`` ``[B, pages per sequence]`` (N = pages per sequence x page; they
    hold no data: the decode kernels read the pools, other calls gather them), and the pools
    with the table as int32 (Note [Paged caches] in attncc.lower.decode)."""
    if not isinstance(table, torch.Tensor):
        raise form_error(AttnccError, "block_table", type(table).__name__, "a tensor [B, pages per sequence]")
    if table.dtype.is_floating_point or table.dtype == torch.bool:
        raise field_error(AttnccError, "block_table dtype", table.dtype, "an integer type (page indices)")
    if q.dim() != 4 or layout not in (None, "sdpa"):
        allowed = "q [B, H, Lq, D] (SDPA layout) with a block_table"
        raise field_error(AttnccError, "q shape", tuple(q.shape), allowed)
    if k.dim() != 4 or k.shape != v.shape:
        allowed = "k and v alike, pools of pages [pages, page size, H_kv, D]"
        raise field_error(AttnccError, "k/v shape", (tuple(k.shape), tuple(v.shape)), allowed)
    if table.dim() != 2 or table.shape[0] != q.shape[0] or table.shape[1] < 1:
        allowed = f"({q.shape[0]}, pages per sequence >= 1): a row of page indices per sequence"
        raise field_error(AttnccError, "block_table shape", tuple(table.shape), allowed)
    if table.device != q.device:
        raise field_error(AttnccError, "block_table device", table.device, f"the device of q ({q.device})")
    n = table.shape[1] * k.shape[1]
    if grid is not None and tuple(grid.shape if isinstance(grid, Grid) else grid) != (n,):
        raise field_error(AttnccError, "grid", grid, f"None or ({n},): pages per sequence x page size")
    logical = (q.shape[0], k.shape[2], n, k.shape[3])
    stand_ins = (t.new_zeros(()).expand(logical) for t in (k, v))
    return *stand_ins, (k, v, table.to(torch.int32).contiguous())


def _gathered(pool: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """A pool of pages ``[pages, page, H_kv, D]`` as each sequence's ``[B, H_kv, N, D]`` keys
    (a copy; entries out of the pool read its last page, which no kept key reaches)."""
    pages = pool[table.clamp(0, pool.shape[0] - 1).long()]  # [B, pages per sequence, page, H_kv, D]
    return pages.flatten(1, 2).transpose(1, 2)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    text_of: Callable[[tuple[int, ...], int], str],
    scale: float | None = None,
    return_lse: bool = False,
    grid: Grid | tuple[int, ...] | None = None,
    out: torch.Tensor | None = None,
    score: str | Score = "softmax",
    sigmoid_bias: float | None = None,
    layout: str | None = None,
    score_mod: Score | Callable | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    data_of: Callable[[Grid, int, int, torch.device], dict[str, torch.Tensor]] | None = None,
    q_offset: object = None,
    pages: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention`, the pattern given as ``text_of(grid shape, heads)``: its text, checked
    against the call's grid and head count. The front doors (a pattern, ``@attncc.jit``,
    ``attncc.flex``) differ only in that function, which torch.compile calls at trace time
    (Note [Patterns under torch.compile] in attncc.runtime.dynamo). ``pages``: k and v are
    stand-ins for these pools of pages and their block table (:func:`_paged`)."""
    views = to_sdpa_views(q, k, v, grid, layout)
    grid, qs, ks, vs, found = views.grid, views.q, views.k, views.v, views.out
    if q.dtype not in ops.DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        allowed = "float16, bfloat16 or float32, the same for q, k and v"
        raise field_error(AttnccError, "dtype", (q.dtype, k.dtype, v.dtype), allowed)
    if not (q.device == k.device == v.device):
        raise field_error(AttnccError, "device", (q.device, k.device, v.device), "one device for q, k, v")
    if q.device.type == "cpu":
        _check_interpreter()
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise field_error(AttnccError, "out", (tuple(out.shape), out.dtype), f"{tuple(q.shape)} {q.dtype}")
    b, h, n_q, d = qs.shape
    n = grid.size
    pattern_text = text_of(grid.shape, h)
    terms_ = checked(_combined(score, score_mod, pattern_text, grid, h, q.device), grid, h, return_lse)
    params = terms.inputs(terms_, b, h, grid, q.device, n_q)
    dropout_p = _probability(dropout_p)
    if dropout_p > 0:
        params.append(terms.seed_for(dropout_seed, q.device))
    score_text = _form_text(terms_.form.text, terms.needs_grad(terms_), dropout_p > 0)
    scale = 1.0 / math.sqrt(d) if scale is None else _real("scale", scale)
    if not (math.isfinite(scale) and scale > 0):  # Note [Scale] in the Triton template
        raise field_error(AttnccError, "scale", scale, "a finite number > 0 (or None: 1 / sqrt(head dim))")
    bias = -math.log(n) if sigmoid_bias is None else _real("sigmoid_bias", sigmoid_bias)
    if not math.isfinite(bias):
        raise field_error(AttnccError, "sigmoid_bias", bias, "a finite number (or None: -ln(N))")
    visible = q.device.type == "cuda" and settings.backend() == "triton"
    op = torch.ops.attncc.fwd if visible else torch.ops.attncc.fwd_opaque
    # Note [bf16 on the CPU]: Triton's interpreter computes bf16 dots wrongly (off by orders of
    # magnitude, ../shared/TOOLCHAIN.md), so on the CPU a bf16 call runs the float32 kernels on
    # widened inputs and rounds the output to bf16: more exact than a GPU's bf16, never garbage.
    wide = q.device.type == "cpu" and q.dtype == torch.bfloat16
    pools = pages[:2] if pages is not None else ()
    if wide:
        qs = qs.float()
        ks, vs = (ks, vs) if pages is not None else (ks.float(), vs.float())
        pools = tuple(t.float() for t in pools)
    by_name = dict(zip((*terms_.inputs, "seed"), params))
    terms_args = [by_name.get(name) for name in TERMS]  # Note [Term arguments]
    runtime_data = data_of(grid, b, h, q.device) if data_of is not None else {}
    data_args = [runtime_data.get(name) for name in DATA]
    forward_only = not (torch.is_grad_enabled() and any(t.requires_grad for t in (qs, ks, vs, *pools)))
    part = views.region != grid.shape
    if part and forward_only and decode.takes(grid.shape, views.region, score_text, pattern_text, h):
        if pages is not None:  # the decode kernels read the pools through the table
            ks, vs = pools
        table = None if pages is None else pages[2]
        o, lse = _decode(views, qs, ks, vs, q_offset, pattern_text, score_text, scale, terms_args, data_args,
                         table)  # fmt: skip
    else:
        if pages is not None:
            ks, vs = (_gathered(pool, pages[2]) for pool in pools)
        region, offsets = None, None
        if views.region != grid.shape:  # Note [Query regions] in attncc.lower.plan
            region = list(views.region)
            per_axis = query_offsets(views, q_offset, b, q.device).to(torch.int32)
            offsets = torch.cat([per_axis.new_zeros(b, 3 - grid.rank), per_axis], 1).contiguous()
        o, lse = op(
            qs, ks, vs, pattern_text, list(grid.shape), scale, score_text, bias, *terms_args, dropout_p,
            *data_args, region, offsets,
        )  # fmt: skip
    result = found.output(o.to(q.dtype) if wide else o)
    if out is not None:
        result = out.copy_(result)
    if not return_lse:
        return result
    return result, found.lse(lse)


def _cross(
    q, k, v, pattern: Pattern, q_grid: object, scale, return_lse: bool, grid, out, score, sigmoid_bias,
    layout, score_mod, dropout_p, dropout_seed, data,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`attention` with q on ``q_grid``: the embedded problem of Note [Cross-attention]
    (attncc.runtime.cross) run by :func:`attend` as queries over a region of one 1-D grid."""
    views = cross_views(q, k, v, grid, q_grid, layout)
    b, h = views.q.shape[:2]
    text, embedding = cross.plan(pattern, views.q_grid.shape, views.grid.shape, h)
    given = call_data.checked_cross(pattern, embedding.queries, views.grid, b, h, data, q.device)
    kernel_data = cross.kernel_data(given, embedding)
    cross.refuse_score_function(score_mod)
    terms_ = cross.score(_combined(score, score_mod, text, views.grid, h, q.device), embedding)
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise field_error(AttnccError, "out", (tuple(out.shape), out.dtype), f"{tuple(q.shape)} {q.dtype}")
    bias = -math.log(embedding.keys) if sigmoid_bias is None else sigmoid_bias  # N is k's length
    found = attend(
        views.q, cross.padded(views.k, embedding), cross.padded(views.v, embedding), lambda *_: text, scale,
        return_lse, (embedding.length,), None, terms_, bias, "sdpa", None, dropout_p, dropout_seed,
        lambda *_: kernel_data, embedding.offset,
    )  # fmt: skip
    o, lse = found if return_lse else (found, None)
    result = views.out.output(o)
    if out is not None:
        result = out.copy_(result)
    return (result, views.out.lse(lse)) if return_lse else result


def _decode(views: Views, qs, ks, vs, q_offset: object, pattern_text: str, score_text: str, scale: float,
            terms_args: list, data_args: list, block_table: torch.Tensor | None,
            ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(out, lse) of a decode step, from the decode kernels (Note [Decode dispatch] in
    attncc.runtime.decode): ``qs``/``ks``/``vs`` the call's views (widened for the CPU's bf16),
    or with ``block_table`` the pools of pages as ``ks``/``vs``; ``terms_args``/``data_args`` the
    ops' optional tensors."""
    by_name = dict(zip(TERMS, terms_args))
    offsets = query_offsets(views, q_offset, qs.shape[0], qs.device)[:, 0].to(torch.int32).contiguous()
    visible = qs.device.type == "cuda"
    op = torch.ops.attncc.decode if visible else torch.ops.attncc.decode_opaque
    return op(qs, ks, vs, pattern_text, scale, score_text, offsets, by_name["temperature"], by_name["alibi"],
              *data_args, block_table)  # fmt: skip


def _real(name: str, value: object) -> float:
    """A real number as a float; a string or a bool (which float() would take) is refused."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymFloat)):
        raise form_error(AttnccError, name, value, "a real number (a float or an int)")
    return float(value)


@torch.compiler.assume_constant_result  # read once per trace, like the pattern's text
def _check_interpreter() -> None:
    """CPU tensors run under Triton's interpreter, which must have been on when triton was
    first imported (Note [A late TRITON_INTERPRET])."""
    if not settings.interpreter():
        allowed = "cuda, or cpu with TRITON_INTERPRET=1 set before triton is imported (Triton's interpreter)"
        raise field_error(AttnccError, "device", "cpu", allowed)
    # Note [A late TRITON_INTERPRET]: triton.language's own @triton.jit helpers are decorated
    # when triton is imported, as compiled functions unless the interpreter was on then; a
    # kernel decorated later is interpreted but cannot call them (Triton raises "Cannot call
    # @triton.jit'd outside of the scope of a kernel" deep in the launch). One of them tells.
    import triton.language.standard
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(triton.language.standard.sigmoid, InterpretedFunction):
        raise AttnccError(
            "TRITON_INTERPRET = '1' was set after triton was imported, so Triton's interpreter is "
            "only half on; set it before the first `import triton` (in the shell, or at the top "
            "of the script before importing torch extensions, attncc or triton)"
        )


def _combined(score: str | Score, score_mod: object, pattern_text: str, grid: Grid, heads: int,
              device: torch.device) -> Score:  # fmt: skip
    """The call's score: ``score`` (a normaliser, or terms) and the terms of ``score_mod``
    (terms, or a score function traced into terms: attncc.score_fn)."""
    found = Score(*_parsed(score)) if isinstance(score, str) else as_score(score)
    if score_mod is None:
        return found
    if isinstance(score_mod, Score):
        return found + score_mod
    if callable(score_mod) or isinstance(score_mod, ScoreFunction):
        return found + score_terms(score_mod, pattern_text, grid, heads, device)
    expected = (
        "score terms (attncc.ir.softcap, alibi, rel_pos_bias, ... composed with +) or a "
        "function score_mod(score, b, h, q, k)"
    )
    raise form_error(AttnccError, "score_mod", score_mod, expected)


def _probability(p: object) -> float:
    value = _real("dropout_p", p)
    if not 0.0 <= value < 1.0:
        raise field_error(AttnccError, "dropout_p", value, "a number in [0, 1)")
    return value


@torch.compiler.assume_constant_result  # torch.compile reads a score's text once, not its parser
def _parsed(text: str) -> tuple:
    """The fields of the score ``text`` reads as (Note [Constants under torch.compile] at
    :func:`_form_text`: a constant is plain data, the Score is made from it in the graph)."""
    return dataclasses.astuple(parse_score(text))


@torch.compiler.assume_constant_result  # like the pattern's text: the op takes a constant
def _form_text(form: str, grads: tuple[str, ...], dropout: bool) -> str:
    """The text of the kernels' form of the call's score: its terms (``form``, the text of a
    score without values), which of them the backward differentiates, and dropout (Note
    [Score terms] in attncc.ir.score). Note [Constants under torch.compile]: it takes text,
    not a Score: an object made inside a compiled region reaches an
    ``assume_constant_result`` function without its fields."""
    return dataclasses.replace(parse_score(form), grads=grads, dropout=dropout).text


@torch.compiler.assume_constant_result  # Note [Patterns under torch.compile] in attncc.runtime.dynamo
def _text(pattern: Pattern, grid: tuple[int, ...], heads: int) -> str:
    """:func:`checked_text`, which torch.compile calls once per trace and keeps: the graph holds
    the text, and no pattern is inspected in it."""
    return checked_text(pattern, grid, heads)


def _data_of(pattern: Pattern, data: dict | None, grid: Grid, batch: int, heads: int, device) -> dict:
    """The call's data for ``pattern``'s runtime leaves, checked and normalised (attncc.runtime.data)."""
    return call_data.checked(pattern, grid, batch, heads, data, device)


def checked_text(pattern: Pattern, grid: tuple[int, ...], heads: int) -> str:
    """The text of ``pattern``, after checking it against the call's grid and head count."""
    if not isinstance(pattern, Pattern):  # perhaps unhashable: the check says what it is instead
        validate(pattern, Grid(grid), heads)
    return _checked_text(pattern, grid, heads)


@memo  # eager calls pay for checking and formatting once
def _checked_text(pattern: Pattern, grid: tuple[int, ...], heads: int) -> str:
    validate(pattern, Grid(grid), heads)
    return format_pattern(pattern)
