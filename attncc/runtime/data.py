"""The data of a pattern's runtime primitives: checked against the call, normalised for the kernels.

A pattern declares primitives whose data are given at call time (Note [Runtime data] in
attncc.ir.nodes); ``attncc.attention(q, k, v, pattern, data={...})`` gives them, one tensor per
kind, and :func:`checked` turns them into the forms the kernels (and the oracle,
:func:`attncc.ir.mask.mask`) read.

Note [Runtime data forms]: what a user may give, and what :func:`checked` returns (every
returned tensor contiguous, on q's device; ``B'``/``H'`` are 1 where the user gave 1, or
expanded the dimension with stride 0, else the call's batch / query heads):

=============== ===================================== ==========================================
key             given                                 normalised (key)
=============== ===================================== ==========================================
block_mask      bool or integer ``[B|1, H|1, QB, KB]`` int8 0/1 ``[B', H', QB, KB]`` (block_mask)
topk_blocks     integer ``[B|1, H|1, QB, K]``,         int8 0/1 ``[B', H', QB, KB]``, scattered on
                block indices in ``[-1, KB)``          the device, -1 ignored (topk_blocks)
documents       integer ids ``[B|1, N]``               int32 ``[B', N]`` (documents)
cu_seqlens      integer offsets ``[S + 1]``            int32 ``[1, N]`` sequence index per token,
                                                       by ``torch.searchsorted`` (documents)
key_lengths     integer ``[B]``                        int32 ``[B]``, cut to ``0..N`` (key_lengths)
key_mask        bool or integer ``[B|1, N]`` or        int8 0/1 ``[B', H', N]`` (key_mask)
                ``[B|1, H|1, N]``
=============== ===================================== ==========================================

A cross call (q on a grid of its own: Note [Cross-attention] in attncc.runtime.cross) takes the
keys' forms on the keys' grid (``N`` = Nk), and with ``documents`` the queries' ids too:
``query_documents``, integer ``[B|1, Nq]`` → int32 ``[B', Nq]``; a query sees the keys whose id
is its own (an interval of keys when the keys' ids are sorted: the text of an image sees that
image). ``cu_seqlens`` has no cross form (offsets of one sequence).

``QB = KB`` is the number of blocks of the primitive on the grid (ceil(N / block) flat, the
product of ceil(axis / block) for box blocks). A bool layout or key mask is taken as int8 without
a copy; a key mask ``[B|1, N]`` is the same for every head (``H' = 1``).

Note [Values the checker cannot see]: the checks read only what the host knows without waiting
for the device (keys, dtypes, devices, shapes): no ``.item()``, ``.tolist()`` or ``.any()`` on
the data, so a call never syncs and :func:`checked` traces under ``torch.compile(fullgraph=True)``
as torch ops. Values are not checked; each form is made safe to index whatever they are, and
values outside the documented ranges give a well-defined mask, not a fault:

- ``block_mask``: every value is valid (non-zero keeps);
- ``topk_blocks``: an index outside ``[-1, KB)`` selects no block (like -1);
- ``documents``: ids are compared as int32, so ids that differ by a multiple of 2**32 meet;
- ``cu_seqlens``: offsets that are not non-decreasing give ``torch.searchsorted``'s answer for
  unsorted input (some index in ``[-1, S]`` per token); tokens before ``cu[0]`` get id -1;
- ``key_lengths``: a length below 0 keeps no key, one above N every key;
- ``key_mask``: every value is valid (non-zero keeps).

The kernels index only the normalised tensors, within their shapes, so no value of the user's
can make them read out of bounds.
"""

from __future__ import annotations

import torch

from attncc.errors import AttnccError, field_error, form_error
from attncc.ir.grid import Grid
from attncc.ir.nodes import BlockMask, Documents, KeyLengths, KeyMask, Pattern, TopkBlocks
from attncc.ir.validate import block_count, validate
from attncc.memo import memo

KEYS: dict[str, str] = {
    "block_mask": BlockMask.NAME,
    "topk_blocks": TopkBlocks.NAME,
    "documents": Documents.NAME,
    "cu_seqlens": Documents.NAME,
    "key_lengths": KeyLengths.NAME,
    "key_mask": KeyMask.NAME,
}
"""Every key of ``data=``, and the primitive (by name) whose data it gives."""

INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def checked(
    pattern: Pattern, grid: Grid, batch: int, heads: int, data: dict | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """The data of ``pattern``'s runtime primitives for a call on ``batch`` x ``heads`` (query
    heads) on ``grid``, checked and normalised (Note [Runtime data forms]).

    ``pattern`` fits ``grid`` (canonical or not: canonicalisation keeps every runtime leaf,
    Note [Runtime leaves survive] in attncc.ir.canonical); ``device`` is q's. Raises an
    :class:`AttnccError` naming the key for an unknown key, missing data, data for a primitive
    the pattern lacks, a wrong dtype, device or shape. Values are not read (Note [Values the
    checker cannot see]), so the call never waits for the device. For example
    ``checked(causal() & key_lengths(), Grid((16,)), 2, 4, {"key_lengths": lengths}, q.device)``
    gives ``{"key_lengths": lengths}`` as int32, cut to ``0..16``.
    """
    if not isinstance(pattern, Pattern):  # perhaps unhashable: the check says what it is instead
        validate(pattern, grid)
    leaves = {name: (text, extent) for name, text, extent in _leaves(pattern, tuple(grid.shape))}
    given = _given(data, leaves)
    out = {}
    for key, value in given.items():
        text, extent = leaves[KEYS[key]]
        if not isinstance(value, torch.Tensor):
            raise form_error(AttnccError, f"data[{key!r}]", _shown(value), f"a tensor (the data of {text})")
        if value.device != device:
            raise field_error(AttnccError, f"{key} device", value.device, f"the device of q ({device})")
        if key == "block_mask":
            out[key] = _block_mask(value, batch, heads, extent, text)
        elif key == "topk_blocks":
            out[key] = _topk_blocks(value, batch, heads, extent, text)
        elif key == "documents":
            out[key] = _documents(value, batch, extent)
        elif key == "cu_seqlens":
            out["documents"] = _cu_seqlens(value, extent)
        elif key == "key_lengths":
            out[key] = _key_lengths(value, batch, extent)
        else:
            out[key] = _key_mask(value, batch, heads, extent)
    return out


def checked_cross(
    pattern: Pattern, n_q: int, grid: Grid, batch: int, heads: int, data: dict | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """:func:`checked` for a cross call: ``n_q`` queries on a grid of their own over keys on
    ``grid`` (Note [Runtime data forms]): the keys' data as :func:`checked` takes them, and
    ``query_documents`` beside ``documents``. The pattern has been checked by
    :func:`attncc.ir.validate.validate_cross`."""
    given = dict(data) if isinstance(data, dict) else data
    query_ids = given.pop("query_documents", None) if isinstance(given, dict) else None
    if isinstance(given, dict) and "cu_seqlens" in given:
        allowed = "documents and query_documents (ids per key and per query) when q has a q_grid"
        raise field_error(AttnccError, "data key", "cu_seqlens", allowed, "one sequence's offsets")
    out = checked(pattern, grid, batch, heads, given, device)
    if "documents" in out and query_ids is None:
        raise AttnccError(
            "data['query_documents'] is missing (documents() across grids compares each query's id "
            f"with each key's); give integer ids [B or 1, {n_q}], one per query"
        )
    if query_ids is not None:
        if "documents" not in out:
            expected, why = "data of a primitive of the pattern", "the pattern has no documents()"
            raise form_error(AttnccError, "data['query_documents']", _shown(query_ids), expected, why)
        if not isinstance(query_ids, torch.Tensor):
            raise form_error(AttnccError, "data['query_documents']", _shown(query_ids), "a tensor of ids")
        if query_ids.device != device:
            allowed = f"the device of q ({device})"
            raise field_error(AttnccError, "query_documents device", query_ids.device, allowed)
        out["query_documents"] = _documents(query_ids, batch, n_q, "query_documents")
    return out


@torch.compiler.assume_constant_result  # read once per trace, like the pattern's text
def _leaves(pattern: Pattern, shape: tuple[int, ...]) -> tuple[tuple[str, str, int], ...]:
    """:func:`_leaves_of`, which torch.compile calls once per trace and keeps as a constant
    (Note [Patterns under torch.compile] in attncc.runtime.dynamo)."""
    return _leaves_of(pattern, shape)


@memo  # eager calls check and walk the pattern once
def _leaves_of(pattern: Pattern, shape: tuple[int, ...]) -> tuple[tuple[str, str, int], ...]:
    """``(name, text, extent)`` of each runtime leaf of ``pattern``, checked on the grid: the
    extent is the number of blocks of a block primitive, else the number of tokens."""
    grid = Grid(shape)
    validate(pattern, grid)
    return tuple(
        (
            leaf.NAME,
            str(leaf),
            block_count(leaf, grid) if isinstance(leaf, (BlockMask, TopkBlocks)) else grid.size,
        )
        for leaf in pattern.runtime_leaves
    )


def _given(data: object, leaves: dict[str, tuple[str, int]]) -> dict[str, object]:
    """``data`` as a dict whose keys are exactly the pattern's runtime primitives' (one each)."""
    found = ", ".join(text for text, _ in leaves.values()) or "none"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        expected = f"a dict of tensors keyed by {', '.join(KEYS)}"
        raise form_error(
            AttnccError, "data", _shown(data), expected, f"the pattern's runtime primitives: {found}"
        )
    for key in data:
        if key not in KEYS:
            allowed = f"{', '.join(KEYS)} (the pattern's runtime primitives: {found})"
            raise field_error(AttnccError, "data key", _shown(key), allowed, "unknown key")
        if KEYS[key] not in leaves:
            expected = f"data of a primitive of the pattern (its runtime primitives: {found})"
            why = f"the pattern has no {KEYS[key]}(...)"
            raise form_error(AttnccError, f"data[{key!r}]", _shown(data[key]), expected, why)
    if "documents" in data and "cu_seqlens" in data:
        raise field_error(
            AttnccError, "data keys", ("documents", "cu_seqlens"), "one of them (the same documents)"
        )
    for name, (text, _) in leaves.items():
        keys = [key for key, kind in KEYS.items() if kind == name]
        if not any(key in data for key in keys):
            forms = " or ".join(f"data[{key!r}]: {_FORMS[key]}" for key in keys)
            raise AttnccError(f"data[{keys[0]!r}] is missing ({text} reads it at call time); give {forms}")
    return data


_FORMS = {
    "block_mask": "bool or integer [B or 1, H or 1, QB, KB]",
    "topk_blocks": "integer [B or 1, H or 1, QB, K], block indices in [-1, KB)",
    "documents": "integer ids [B or 1, N]",
    "cu_seqlens": "integer offsets [S + 1] (FlashAttention varlen)",
    "key_lengths": "integer [B]",
    "key_mask": "bool or integer [B or 1, N] or [B or 1, H or 1, N]",
}


def _shown(value: object) -> object:
    """``value`` as an error quotes it: a tensor by its shape, short values whole, others by type."""
    if isinstance(value, torch.Tensor):
        return f"<Tensor{list(value.shape)}>"
    if isinstance(value, (str, int, float, bool, type(None))) and len(repr(value)) <= 80:
        return value
    return f"<{type(value).__name__}>"


def _dtype(key: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...], words: str) -> None:
    if t.dtype not in allowed:
        raise field_error(AttnccError, f"{key} dtype", t.dtype, words)


def _leading(
    key: str, t: torch.Tensor, sizes: tuple[int, ...], rest: tuple[int, ...], form: str
) -> torch.Tensor:
    """``t`` checked to be ``[s or 1 for s in sizes] + rest`` (an entry of ``rest`` below 0 is any
    size), with each leading dimension expanded with stride 0 taken back to size 1."""
    shape = tuple(t.shape)
    fits = (
        len(shape) == len(sizes) + len(rest)
        and all(got in (1, want) for got, want in zip(shape, sizes))
        and all(want < 0 or got == want for got, want in zip(shape[len(sizes) :], rest))
    )
    if not fits:
        raise field_error(AttnccError, f"{key} shape", shape, form)
    for dim in range(len(sizes)):
        if t.shape[dim] > 1 and t.stride(dim) == 0:  # broadcast by expand: no copy of it
            t = t.narrow(dim, 0, 1)
    return t


def _block_mask(t: torch.Tensor, batch: int, heads: int, blocks: int, text: str) -> torch.Tensor:
    _dtype("block_mask", t, (torch.bool, *INTEGERS), "bool or an integer type (non-zero keeps)")
    form = f"({batch} or 1, {heads} or 1, {blocks}, {blocks}): [B, H, QB, KB], {blocks} blocks of {text}"
    t = _leading("block_mask", t, (batch, heads), (blocks, blocks), form)
    keep = t if t.dtype == torch.bool else t != 0
    return keep.view(torch.int8).contiguous()


def _topk_blocks(t: torch.Tensor, batch: int, heads: int, blocks: int, text: str) -> torch.Tensor:
    """The top-k indices as the layout they select: int8 ``[B', H', QB, KB]``, scattered on the
    device into one spare column more, where the indices outside ``[0, KB)`` land."""
    _dtype("topk_blocks", t, INTEGERS, "an integer type (block indices, -1 for none)")
    form = f"({batch} or 1, {heads} or 1, {blocks}, K): [B, H, QB, K], {blocks} blocks of {text}"
    t = _leading("topk_blocks", t, (batch, heads), (blocks, -1), form)
    index = t.long()
    index = torch.where((index >= 0) & (index < blocks), index, blocks)
    layout = torch.zeros((*t.shape[:3], blocks + 1), dtype=torch.int8, device=t.device)
    return layout.scatter(-1, index, 1)[..., :blocks].contiguous()


def _documents(t: torch.Tensor, batch: int, n: int, key: str = "documents") -> torch.Tensor:
    _dtype(key, t, INTEGERS, "an integer type (document ids)")
    t = _leading(key, t, (batch,), (n,), f"({batch} or 1, {n}): [B, N], one id per token")
    return t.to(torch.int32).contiguous()


def _cu_seqlens(t: torch.Tensor, n: int) -> torch.Tensor:
    """FlashAttention's ``cu_seqlens`` as document ids ``[1, N]``: the index of the sequence
    each token is in (``S`` for the tokens from ``cu[-1]`` on)."""
    _dtype("cu_seqlens", t, INTEGERS, "an integer type (int32 as FlashAttention takes it)")
    if t.dim() != 1 or t.shape[0] < 1:
        raise field_error(
            AttnccError, "cu_seqlens shape", tuple(t.shape), "(S + 1,): the offsets of S sequences"
        )
    offsets = (t if t.dtype in (torch.int32, torch.int64) else t.long()).contiguous()
    tokens = torch.arange(n, dtype=offsets.dtype, device=t.device)
    return (torch.searchsorted(offsets, tokens, right=True, out_int32=True) - 1)[None]


def _key_lengths(t: torch.Tensor, batch: int, n: int) -> torch.Tensor:
    _dtype("key_lengths", t, INTEGERS, "an integer type (keys per batch element)")
    if tuple(t.shape) != (batch,):
        raise field_error(
            AttnccError, "key_lengths shape", tuple(t.shape), f"({batch},): one length per batch element"
        )
    return t.long().clamp(0, n).to(torch.int32)


def _key_mask(t: torch.Tensor, batch: int, heads: int, n: int) -> torch.Tensor:
    """The valid keys as int8 0/1 ``[B', H', N]``: a mask ``[B|1, N]`` gains a head dimension of 1."""
    _dtype("key_mask", t, (torch.bool, *INTEGERS), "bool or an integer type (non-zero: the key may be seen)")
    form = f"({batch} or 1, {n}) or ({batch} or 1, {heads} or 1, {n}): [B, N] or [B, H, N], one flag per key"
    if t.dim() == 2:
        t = _leading("key_mask", t, (batch,), (n,), form)[:, None]
    else:
        t = _leading("key_mask", t, (batch, heads), (n,), form)
    keep = t if t.dtype == torch.bool else t != 0
    return keep.view(torch.int8).contiguous()
