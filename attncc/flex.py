"""FlexAttention's front door: a ``mask_mod(b, h, q_idx, kv_idx)`` traced into the pattern IR,
and a ``score_mod(score, b, h, q_idx, kv_idx)`` into score terms.

A FlexAttention mask over a 1-D sequence becomes an attncc pattern, exactly, or
is refused with a :class:`~attncc.errors.TraceError` that quotes the
sub-expression::

    import attncc.flex

    doc = torch.tensor([0] * 300 + [1] * 700 + [2] * 24)  # document id of each token

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    attncc.flex.pattern(document_causal, 1024)   # causal() & document(ids=(0, 0, ...))
    out = attncc.flex.flex_attention(q, k, v, document_causal)  # q, k, v: [B, H, 1024, D]

The ``mask_mod`` runs once on traced values (the tracer of :mod:`attncc.jit`):
``q_idx`` and ``kv_idx`` are the query's and key's token indices, and it may
use everything the ``@attncc.jit`` grammar allows on them (``q.index`` there),
torch's spellings included (``torch.abs``, ``torch.logical_and``, ``&``, ``|``,
``~``), and lookups ``t[q_idx]``/``t[kv_idx]`` into 1-D integer tensors it
captures. What has a pattern, in FlexAttention's terms:

=========================================================  ========================================
``q_idx >= kv_idx``                                        ``causal()``
``q_idx - kv_idx <= w`` (with causal: sliding window)      ``sliding_window``
``(kv_idx < 16) | (q_idx >= kv_idx)`` (prefix LM)          ``causal() | key_range(0, hi=15)``
``doc[q_idx] == doc[kv_idx]``                              ``document(ids)``: ``doc``'s values
``q_idx // 64 >= kv_idx // 64`` (block-causal)             ``causal() | block_diagonal(0, 64)``
``and_masks``/``or_masks`` of these, ``&``, ``|``, ``~``   intersections and unions
=========================================================  ========================================

``b`` and ``h`` may be ignored. ``b`` (the batch index) may read per-batch data on the key
alone, given at call time (Note [Per-batch masks]): ``valid[b, kv_idx]`` (a bool or integer
``[B, N]`` tensor) is ``key_mask()``, ``kv_idx < lengths[b]`` (an integer ``[B]`` tensor)
``key_lengths()``, combined with the rest as usual (``valid[b, kv_idx] & (q_idx >= kv_idx)``);
any other use of ``b`` is refused, quoted: an attncc pattern is the same for every batch
element, its data are not. A mask that
uses ``h`` is traced once per head with ``h`` a plain ``int`` (``heads=``
must be given; :func:`flex_attention` takes it from ``query``) and becomes
``per_head([...])``; 0-d integer tensors (``windows[h]``) are constants.

A ``score_mod`` (:func:`flex_attention`'s ``score_mod=``) is traced by :mod:`attncc.score_fn`
into the terms of Note [Score terms] in attncc.ir.score, fused in the kernels, or refused with
a :class:`~attncc.errors.TraceError` that quotes the sub-expression with no term::

    table = torch.zeros(H, 2 * 64 - 1, requires_grad=True)  # a learned bias per offset kv - q

    def score_mod(score, b, h, q_idx, kv_idx):
        return 30 * torch.tanh(score / 30) + table[h, kv_idx - q_idx + 63]

    out = attncc.flex.flex_attention(q, k, v, sliding_window, score_mod=score_mod)

=========================================================  ========================================
``c * torch.tanh(score / c)``                              ``softcap(c)``
``score * t[h]`` (also inside the cap)                     ``temperature(t)``
``score + (kv_idx - q_idx) * s[h]``, ``- s[h] * abs(..)``  ``alibi(s, distance='signed')``,
                                                           ``alibi(s)``; ``s`` a captured tensor or
                                                           an expression of ``h`` (attention-gym's
                                                           ``torch.exp2(-(h + 1) * 8.0 / H)``)
``t[h, kv_idx - q_idx + r]`` (or ``q_idx - kv_idx``,       ``rel_pos_bias(t)``: ``r`` the centre
clamped to the table's edges)                              of the table
``t[kv_idx]``, ``t[b, h, q_idx]``, ``t[h]``                ``key_bias``, ``query_bias``
``t[b, h, q_idx, kv_idx]``, ``t[q_idx, kv_idx]``           ``bias``
=========================================================  ========================================

The captured tensors become the terms' tensors (or views of them), so they learn and new values
reuse the kernel; a function that branches (``torch.where``), puts a bias inside the cap or
multiplies two tensors has no term. Under torch.compile the ``score_mod`` must be defined outside
the compiled function (Note [Score functions under torch.compile] in attncc.score_fn).

Note [No trace cache]: :func:`flex_attention` traces on every call, as the
captured tensors (document ids) may change between calls while the function
stays the same; tracing costs milliseconds, and the kernel is cached per
pattern. (A ``score_mod``'s trace is memoised: only the shapes of its tensors
matter.) A loop that reuses one mask can call :func:`pattern` once and
:func:`attncc.attention` with it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from attncc.errors import AttnccError, TraceError, field_error, form_error
from attncc.ir.canonical import canonicalize
from attncc.ir.grid import Grid
from attncc.ir.nodes import KeyLengths, KeyMask, Pattern, dense, per_head
from attncc.ir.nodes import block_mask as ir_block_mask
from attncc.jit import match
from attncc.runtime.library import attend, attention, checked_text
from attncc.score_fn import ScoreFunction
from attncc.trace import Cond, Int, Opaque, Used, run, tensor_reads

__all__ = ["flex_attention", "pattern"]

_RETURNS = "a condition on q_idx and kv_idx (comparisons joined with &, |, ~), or True/False"
_NAME = ("n",)  # the axis of a 1-D sequence, for messages that name no coordinate


def _positional_names(mask_mod: Callable) -> tuple[str, str]:
    """The names ``mask_mod`` gives its query and key index (for messages), after checking
    that it takes ``(b, h, q_idx, kv_idx)``."""
    shown = getattr(mask_mod, "__name__", type(mask_mod).__name__)
    if not callable(mask_mod):
        raise form_error(TraceError, "mask_mod", mask_mod, "a function mask_mod(b, h, q_idx, kv_idx)")
    try:
        signature = inspect.signature(mask_mod)
        signature.bind(None, None, None, None)
    except (TypeError, ValueError):
        raise TraceError(
            f"mask_mod {shown} must take four arguments (b, h, q_idx, kv_idx); a score_mod "
            "(score, b, h, q_idx, kv_idx) is given as score_mod="
        ) from None
    params = [
        p.name
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return (params[2], params[3]) if len(params) >= 4 else ("q_idx", "kv_idx")


def pattern(mask_mod: Callable, seq_len: int, heads: int | None = None) -> Pattern:
    """The canonical pattern of ``mask_mod(b, h, q_idx, kv_idx)`` on a sequence of ``seq_len``
    tokens (see the module doc for what traces).

    ``heads`` is needed only when ``mask_mod`` uses ``h``: it is then traced once per head
    and the result is ``per_head([...])`` (or one pattern, if every head gives the same).
    Raises :class:`~attncc.errors.TraceError` naming the sub-expression that has no pattern.
    A mask reading per-batch data (``valid[b, kv_idx]``, ``kv_idx < lengths[b]``) gives
    ``key_mask()``/``key_lengths()``, whose tensors a call passes as ``data=`` (Note
    [Per-batch masks]).

    Example: ``pattern(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, 128)`` is ``causal()``.
    """
    return _traced(mask_mod, seq_len, heads)[0]


def _traced(mask_mod: Callable, seq_len: int, heads: int | None) -> tuple[Pattern, dict[str, torch.Tensor]]:
    """:func:`pattern`, and the per-batch tensors it reads by their data names (Note
    [Per-batch masks])."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise field_error(TraceError, "seq_len", seq_len, "an integer >= 1 (tokens in the sequence)")
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
        raise field_error(TraceError, "heads", heads, "an integer >= 1, or None")
    names = _positional_names(mask_mod)
    grid = Grid((seq_len,))
    where = (
        f"attncc.flex mask_mod {getattr(mask_mod, '__name__', type(mask_mod).__name__)} on {seq_len} tokens"
    )
    b = _Batch()
    h = Opaque("h", "the head index; give heads= to trace one pattern per head")
    try:
        return _one(mask_mod, grid, names, (b, h), where), b.data
    except Used as e:  # h was used: trace once per head
        if heads is None:
            raise TraceError(f"{where}: {e}") from None
    patterns = [_one(mask_mod, grid, names, (b, head), f"{where}, head h = {head}") for head in range(heads)]
    return canonicalize(per_head(patterns), grid), b.data


def _one(mask_mod: Callable, grid: Grid, names: tuple[str, str], bh: tuple, where: str) -> Pattern:
    q_idx, kv_idx = (Int("var", (side, 0), name) for side, name in zip("qk", names))
    try:
        cond = _key_lengths(run(mask_mod, (*bh, q_idx, kv_idx), _RETURNS), bh[0])
    except Used as e:
        if e.opaque is bh[1]:
            raise  # the head index, when it is not given: pattern() traces once per head
        raise TraceError(f"{where}: {e}") from None
    except TraceError as e:
        raise TraceError(f"{where}: {e}") from None
    return match(cond, grid, _NAME, where)


# Note [Per-batch masks]: FlexAttention masks often read a per-batch tensor on the key alone:
# valid[b, kv_idx] (padding that is not a suffix, a cache's evicted slots) or kv_idx < lengths[b]
# (padding). An attncc pattern is the same for every batch element, but the primitives
# key_mask() and key_lengths() take such data per call (Note [Runtime data] in attncc.ir.nodes),
# so those two forms trace to them: the batch index b is a _Batch, whose lookups are a
# key_mask() condition or a per-batch length (an Int of kind "batch") that a comparison
# kv_idx < lengths[b] makes key_lengths() (_key_lengths). The tensors are kept by their data
# names and passed with the call; their values are never read while tracing, so new values
# reuse the kernels. Any other use of b (q_idx < lengths[b], lengths[b] - 1, valid[b, q_idx])
# is refused, quoted.


class _Batch(Opaque):
    """FlexAttention's ``b`` (Note [Per-batch masks]): ``valid[b, kv_idx]`` and ``lengths[b]``
    trace; ``data`` collects the tensors they read."""

    def __init__(self) -> None:
        meaning = (
            "the batch index; attncc reads it only as valid[b, kv_idx] (key_mask) and "
            "kv_idx < lengths[b] (key_lengths): an attncc pattern is the same for every batch element"
        )
        super().__init__("b", meaning)
        self.data: dict[str, torch.Tensor] = {}

    def lookup(self, table: Any, index: Any, shown: str) -> Int | Cond:
        key = index[1] if isinstance(index, tuple) and len(index) == 2 and index[0] is self else None
        if index is self and isinstance(table, torch.Tensor) and table.dim() == 1:
            self._keep("key_lengths", table, shown)
            return Int("batch", (table,), shown)
        if (
            isinstance(key, Int)
            and key.kind == "var"
            and key.args[0] == "k"
            and isinstance(table, torch.Tensor)
        ):
            self._keep("key_mask", table, shown)
            return Cond("pattern", (KeyMask(),), shown)
        raise self.used(shown)

    def _keep(self, name: str, table: torch.Tensor, shown: str) -> None:
        if self.data.setdefault(name, table) is not table:
            allowed = f"one {name} tensor per mask (a pattern has one {name}() primitive)"
            raise field_error(TraceError, f"{shown}: the tensor", name, allowed, "a second one is read")


def _key_lengths(cond: Cond | bool, b: _Batch) -> Cond | bool:
    """``cond`` with each comparison ``kv_idx < lengths[b]`` (or ``lengths[b] > kv_idx``) as a
    ``key_lengths()`` condition; any other comparison of a per-batch length is refused, quoted
    (Note [Per-batch masks])."""
    if isinstance(cond, bool) or cond.kind in ("const", "pattern"):
        return cond
    if cond.kind != "cmp":
        return Cond(cond.kind, tuple(_key_lengths(c, b) for c in cond.args), cond.text, cond.strength)
    op, left, right = cond.args
    if not (_per_batch(left) or _per_batch(right)):
        return cond
    key, length = (left, right) if op == "<" else (right, left) if op == ">" else (None, None)
    if isinstance(key, Int) and key.kind == "var" and key.args[0] == "k" and length.kind == "batch":
        return Cond("pattern", (KeyLengths(),), cond.text)
    allowed = "kv_idx < lengths[b] (key_lengths(): the keys before each batch element's length)"
    raise field_error(TraceError, "per-batch length comparison", cond.text, allowed)


def _per_batch(value: object) -> bool:
    if not isinstance(value, Int):
        return False
    return value.kind == "batch" or any(_per_batch(arg) for arg in value.args)


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask_mod: Any = None,
    *,
    score_mod: Callable | None = None,
    block_mask: Any = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``torch.nn.attention.flex_attention.flex_attention`` on attncc's kernels: a ``mask_mod``
    (or a ``block_mask``) and a ``score_mod``, each traced.

    ``query`` is ``[B, H, N, D]`` (SDPA layout), ``key``/``value`` ``[B, H_kv, N, D]``
    with ``H_kv == H`` unless ``enable_gqa`` (then ``H_kv`` divides ``H``; query head
    ``h`` reads key head ``h // (H / H_kv)``, as in FlexAttention). The sequence length
    ``N`` is taken from the shapes (query and key lengths must agree: self-attention
    over one sequence). The mask is ``mask_mod`` (traced by :func:`pattern`, with
    ``heads = H``), or the ``mask_mod`` of a FlexAttention ``block_mask`` (given as
    ``block_mask=`` or in ``mask_mod``'s place; its block tables are not used: attncc plans
    its own), or none (dense). ``score_mod(score, b, h, q_idx, kv_idx)`` is traced into
    fused score terms (see the module doc), its captured tensors learned through them.
    ``scale`` defaults to ``1 / sqrt(D)``. Returns the output ``[B, H, N, D]`` and, with
    ``return_lse``, the natural-log log-sum-exp ``[B, H, N]`` in float32.

    Example::

        out = attncc.flex.flex_attention(q, k, v, lambda b, h, q_idx, kv_idx: q_idx >= kv_idx)
        softcap = lambda score, b, h, q_idx, kv_idx: 30 * torch.tanh(score / 30)
        out = attncc.flex.flex_attention(q, k, v, score_mod=softcap)
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            shown = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise form_error(AttnccError, f"{name} shape", shown, "[B, H, N, D] (FlexAttention's layout)")
    n = query.shape[2]
    if key.shape[2] != n:
        raise field_error(
            AttnccError, "key length", key.shape[2], f"{n}, the query length (one sequence attends to itself)"
        )
    if not enable_gqa and key.shape[1] != query.shape[1]:
        raise field_error(
            AttnccError,
            "key heads",
            key.shape[1],
            f"{query.shape[1]} (the query heads), or enable_gqa=True for fewer key heads",
        )
    if hasattr(mask_mod, "mask_mod") and hasattr(mask_mod, "seq_lengths"):  # a BlockMask in mask_mod's place
        if block_mask is not None:
            raise AttnccError("flex_attention got two block masks (mask_mod and block_mask); give one")
        mask_mod, block_mask = None, mask_mod
    if block_mask is not None:
        if mask_mod is not None:
            raise AttnccError("flex_attention got both mask_mod and block_mask; give one of them")
        lengths = tuple(getattr(block_mask, "seq_lengths", ()))
        if not hasattr(block_mask, "mask_mod") or lengths != (n, n):
            raise form_error(
                AttnccError,
                "block_mask seq_lengths",
                lengths,
                f"({n}, {n}): a BlockMask built for these shapes",
            )
        mask_mod = block_mask.mask_mod
    terms = None if score_mod is None else ScoreFunction(score_mod, "flex")
    if block_mask is not None and _no_mask_mod(mask_mod):  # Note [Block masks as data]
        size = _block_size(block_mask)
        return attention(
            query, key, value, ir_block_mask(size), scale=scale, return_lse=return_lse, layout="sdpa",
            score_mod=terms, data={"block_mask": _layout(block_mask)},
        )  # fmt: skip
    if mask_mod is not None and not torch.compiler.is_compiling():  # trace here, per-batch data included
        found, data = _traced(mask_mod, n, query.shape[1])
        return attention(
            query, key, value, found, scale=scale, return_lse=return_lse, layout="sdpa", score_mod=terms,
            data=data or None,
        )  # fmt: skip
    text_of = functools.partial(_text, mask_mod)
    return attend(
        query, key, value, text_of, scale=scale, return_lse=return_lse, layout="sdpa", score_mod=terms
    )


# Note [Block masks as data]: a BlockMask whose mask_mod keeps everything (BlockMask.from_kv_blocks
# without one: SeerAttention's, VSA's and NSA's selected blocks) is its block tables: they become
# the data of a block_mask(BLOCK_SIZE) pattern, read by the kernels per call (issue 18: new tables
# never recompile). A BlockMask with a mask_mod (create_block_mask's) is that mask_mod, traced into
# a pattern with closed forms; its tables are taken to be the ones create_block_mask derives from
# it, which attncc plans for itself.


def _no_mask_mod(mask_mod: Callable | None) -> bool:
    try:
        from torch.nn.attention.flex_attention import noop_mask
    except ImportError:  # a torch without FlexAttention has no BlockMask either
        return False
    return mask_mod is noop_mask


def _block_size(block_mask: Any) -> int:
    q_block, kv_block = block_mask.BLOCK_SIZE
    if q_block != kv_block:
        allowed = "equal query and key block sizes (attncc's block_mask blocks both sides alike)"
        raise field_error(AttnccError, "block_mask BLOCK_SIZE", (q_block, kv_block), allowed)
    return int(q_block)


def _layout(block_mask: Any) -> torch.Tensor:
    """The BlockMask's kept blocks as an int8 ``[B, H, QB, KB]`` layout (partial and full ones),
    by one scatter per table on the device."""
    idx = block_mask.kv_indices
    kb = idx.shape[-1]
    out = torch.zeros((*idx.shape[:-1], kb + 1), dtype=torch.int8, device=idx.device)
    for num, ids in (
        (block_mask.kv_num_blocks, idx),
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
    ):
        if num is None:
            continue
        used = torch.arange(kb, device=ids.device) < num[..., None]
        out.scatter_(-1, torch.where(used, ids.long(), kb), 1)
    return out[..., :kb]


@torch.compiler.assume_constant_result  # Note [Patterns under torch.compile] in attncc.runtime.dynamo
def _text(mask_mod: Callable | None, grid: tuple[int, ...], heads: int) -> str:
    """The checked text of ``mask_mod``'s pattern (dense for None) on a sequence of ``grid[0]``
    tokens, traced afresh (Note [No trace cache]): what torch.compile keeps (an eager call
    traces in :func:`flex_attention`, where per-batch data can be passed on)."""
    if mask_mod is None:
        return checked_text(dense(), grid, heads)
    with tensor_reads() as reads:
        found, data = _traced(mask_mod, grid[0], heads)
    if data:  # the graph takes no tensors from here: pass them as attncc.attention's data
        raise TraceError(
            f"attncc.flex mask_mod {getattr(mask_mod, '__name__', type(mask_mod).__name__)} reads per-batch "
            f"data ({', '.join(data)}: Note [Per-batch masks]) inside torch.compile; build the pattern "
            "outside the compiled region, attncc.flex.pattern(mask_mod, N, heads), and call "
            "attncc.attention(q, k, v, pattern, data=...) inside it, with those tensors by those names"
        )
    if reads:
        # Note [Tensors under torch.compile]: the compiled graph keeps the pattern of its
        # first trace and nothing guards the values of a tensor the mask_mod reads, so a
        # later call with other values would silently reuse the old pattern.
        raise TraceError(
            f"attncc.flex mask_mod {getattr(mask_mod, '__name__', type(mask_mod).__name__)} reads the "
            f"values of {', '.join(dict.fromkeys(reads))} inside torch.compile, where the graph would keep "
            "the pattern of its first call; build the pattern outside the compiled region, "
            "attncc.flex.pattern(mask_mod, N, heads), and call attncc.attention(q, k, v, pattern) "
            "inside it (another pattern recompiles)"
        )
    return checked_text(found, grid, heads)
