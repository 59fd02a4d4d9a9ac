"""The torch.library ops of the decode kernels (Note [Decode dispatch] in attncc.runtime.decode).

``attncc::decode`` is a ``triton_op`` (its launches through ``wrap_triton``: torch.compile sees
into the kernels on a GPU); ``attncc::decode_opaque`` a ``custom_op`` with a fake, for Triton's
CPU interpreter, which inductor cannot compile. Both are forward only: a decode call is
inference, and the backward of queries over a part of the keys is the general kernels'
(attncc.runtime.library refuses a decode call that needs a gradient). As ``attncc::fwd``, they
take the pattern and the score as text and each optional tensor as its own argument (Note [Term
arguments] in attncc.runtime.library).
"""

from __future__ import annotations

import torch
from torch.library import custom_op, register_fake, triton_op, wrap_triton

from attncc.ir.symbolic import RUNTIME_KINDS
from attncc.runtime import decode


def _decode(q, k, v, pattern, scale, score, q_offset, temperature, alibi, data_, block_table, wrap):
    _, h, lq, d = q.shape
    if block_table is None:
        keys, kv_heads = k.shape[2], k.shape[1]
    else:  # pools [pages, page, H_kv, D] (Note [Paged caches] in attncc.lower.decode)
        keys, kv_heads = block_table.shape[1] * k.shape[1], k.shape[2]
    paged = block_table is not None
    kern = decode.kernel(pattern, keys, lq, h, kv_heads, d, q.dtype, q.device.type, score, paged)
    params = [t for t in (temperature, alibi) if t is not None]
    data = {name: t for name, t in zip(RUNTIME_KINDS, data_) if t is not None}
    return decode.forward(q, k, v, kern, q_offset, scale, params, data, wrap, block_table)


@triton_op("attncc::decode", mutates_args=())
def decode_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: str,
    scale: float,
    score: str,
    q_offset: torch.Tensor,
    temperature: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    block_mask: torch.Tensor | None = None,
    topk_blocks: torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode on ``q [B, H, Lq, D]`` over ``k, v [B, H_kv, N, D]``: (out, lse float32 ``[B, H,
    Lq]``). ``q_offset`` int32 ``[B]``: each batch element's first query position; ``score`` the
    score's form (softmax, with softcap, temperature, alibi); ``temperature``/``alibi`` its
    terms' views (attncc.runtime.terms.inputs); ``block_mask`` .. ``key_mask`` the pattern's
    normalised data (attncc.runtime.data); with ``block_table`` int32 ``[B, pages per sequence]``,
    k and v are pools of pages ``[pages, page, H_kv, D]`` (Note [Paged caches] in
    attncc.lower.decode)."""
    data_ = (block_mask, topk_blocks, documents, key_lengths, key_mask)
    return _decode(
        q, k, v, pattern, scale, score, q_offset, temperature, alibi, data_, block_table, wrap_triton
    )


@custom_op("attncc::decode_opaque", mutates_args=())
def decode_opaque(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: str,
    scale: float,
    score: str,
    q_offset: torch.Tensor,
    temperature: torch.Tensor | None = None,
    alibi: torch.Tensor | None = None,
    block_mask: torch.Tensor | None = None,
    topk_blocks: torch.Tensor | None = None,
    documents: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode_op` as an opaque op (the CPU interpreter)."""
    data_ = (block_mask, topk_blocks, documents, key_lengths, key_mask)
    return _decode(q, k, v, pattern, scale, score, q_offset, temperature, alibi, data_, block_table, None)


@register_fake("attncc::decode_opaque")
def _decode_fake(q, k, v, pattern, scale, score, q_offset, *optional):
    b, h, lq, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, lq), dtype=torch.float32)
