"""Score terms in the benchmarks: random term tensors of a case, and the same terms for the peers.

A case's score (attncc.ir.score) declares its terms; :func:`random_score` gives them data of the
shapes a model would pass (the tuner times its candidates with it too). The peers get the same
tensors: FlexAttention as a ``score_mod`` closing over them (:func:`score_mod`), and SDPA as a
dense float ``attn_mask`` (:func:`dense_bias`), which only additive terms can be.

Note [Peer score terms]: :func:`score_mod` spells Note [Score terms] (attncc.ir.score) with
torch operations on FlexAttention's ``(score, b, h, q_idx, kv_idx)``, as
:mod:`attncc.bench.flexmask` spells a pattern: the soft-cap as ``c * tanh(s / c)``, ALiBi on
flat or per-axis distances, the relative position table looked up by the key's offset from
the query per grid axis (in units of the pattern's dilation, clamped to the table's edge like
the reference), and the biases indexed by ``b``, ``h`` and the flat positions. Every operation
broadcasts, so the same function evaluated over whole index tensors gives SDPA's dense bias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from attncc.ir.canonical import canonicalize, resolve_heads
from attncc.ir.grid import Grid
from attncc.ir.nodes import Pattern
from attncc.ir.score import Score, table_units

if TYPE_CHECKING:
    from attncc.bench.suite import Case

ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi's geometric slopes ``2^(-8 (h + 1) / H)`` (Press et al.), float32 ``[H]``."""
    return torch.exp2(-8.0 * torch.arange(1, heads + 1, dtype=torch.float32) / heads)


def random_score(
    score: Score,
    batch: int,
    heads: int,
    grid: Grid,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
) -> Score:
    """``score`` with data for each tensor term it declares (alibi's numbers kept), of the shapes a
    call passes: temperature ``[H]`` around 1, ALiBi's slopes (per axis for 'axes'), a table
    ``[H, sizes...]`` and biases ``[B, H, N]`` / ``[B, H, N, N]`` of standard normal values."""
    n = grid.size

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    values = dict(score.values)
    for name in score.inputs:
        if name in values:
            continue
        if name == "temperature":
            values[name] = (0.5 + torch.rand(heads, generator=generator, device=device)).to(dtype)
        elif name == "alibi":
            slopes = alibi_slopes(heads).to(device)
            per_axis = score.alibi == "axes" and grid.rank > 1
            values[name] = (slopes[:, None].expand(heads, grid.rank).contiguous() if per_axis else slopes).to(
                dtype
            )
        elif name == "rel_pos_bias":
            values[name] = normal(heads, *(score.rel_pos_bias or ()))
        elif name == "bias":
            values[name] = normal(batch, heads, n, n)
        else:
            values[name] = normal(batch, heads, n)
    return dataclasses.replace(score, values=tuple(values.items()))


def tensors(score: Score) -> dict[str, torch.Tensor]:
    """The term tensors of ``score``'s data (alibi's numbers as a float32 tensor)."""
    out = {}
    for name in score.inputs:
        value = score.value(name)
        out[name] = torch.tensor(value, dtype=torch.float32) if isinstance(value, tuple) else value
    return out


def score_mod(score: Score, pattern: Pattern, grid: Grid, heads: int, device: torch.device) -> ScoreMod:
    """FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx)`` of ``score``'s terms (Note [Peer
    score terms]): the softmax's scores after the terms, closing over the score's tensors as
    given (so gradients reach them), each widened to float32 where it is read."""
    data = {name: t.to(device) for name, t in tensors(score).items()}
    strides = torch.tensor(grid.strides, device=device)
    sizes = torch.tensor(grid.shape, device=device)
    units = reach = None
    if score.rel_pos_bias is not None:
        per_head = [table_units(canonicalize(p, grid), grid) for p in resolve_heads(pattern, heads)]
        units = torch.tensor(per_head, device=device)  # [H, rank]: offsets in units of the dilation
        reach = torch.tensor(score.rel_pos_bias, device=device) // 2
    per_axis = score.alibi == "axes" and grid.rank > 1

    def coords(i: torch.Tensor) -> torch.Tensor:  # [..., rank]: grid coordinates of flat indices
        return (i[..., None] // strides) % sizes

    def read(name: str, *index: torch.Tensor, lead: int = 1) -> torch.Tensor:
        """``data[name]`` at ``index``, in float32; its first ``lead`` dimensions (head, or batch
        and head) may be 1 (broadcast), and are then read at 0."""
        t = data[name]
        at = tuple(i if t.shape[d] > 1 else 0 for d, i in enumerate(index[:lead])) + index[lead:]
        return t[at].to(torch.float32)

    def mod(
        s: torch.Tensor, b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> torch.Tensor:
        if score.temperature:
            s = s * read("temperature", h)
        if score.softcap is not None:
            s = score.softcap * torch.tanh(s / score.softcap)
        if score.alibi == "signed":
            s = s + read("alibi", h) * (k - q)
        elif per_axis:
            slopes = data["alibi"].reshape(heads, -1)[h].to(torch.float32)  # [1] or [rank]
            s = s - (slopes * (coords(k) - coords(q)).abs()).sum(-1)
        elif score.alibi is not None:
            s = s - read("alibi", h) * (k - q).abs()
        if units is not None and reach is not None:
            index = torch.div(coords(k) - coords(q), units[h], rounding_mode="floor") + reach
            index = torch.minimum(index.clamp(min=0), 2 * reach)  # past the reach: its edge entry
            s = s + read("rel_pos_bias", h, *index.unbind(-1))
        if score.query_bias:
            s = s + read("query_bias", b, h, q, lead=2)
        if score.key_bias:
            s = s + read("key_bias", b, h, k, lead=2)
        if score.bias:
            s = s + read("bias", b, h, q, k, lead=2)
        return s

    return mod


def dense_bias(
    mod: ScoreMod, batch: int, heads: int, n: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The additive bias ``[B, H, N, N]`` of an additive-only ``score_mod`` (Note [Peer score
    terms]): the function evaluated over every (b, h, q, k), one head at a time."""
    q = torch.arange(n, device=device)[:, None]
    k = torch.arange(n, device=device)[None, :]
    zero = torch.zeros((), device=device)
    out = torch.empty((batch, heads, n, n), device=device, dtype=dtype)
    for b in range(batch):
        for h in range(heads):
            index = (torch.tensor(b, device=device), torch.tensor(h, device=device))
            out[b, h] = mod(zero, *index, q, k).to(dtype)
    return out


@dataclass(frozen=True, eq=False)
class CaseTerms:
    """A case's score terms as every implementation gets them: ``score`` with its tensors (no
    ``grad`` marks: a call decides by what requires grad), dropout's probability and seed, and
    ``learned``, the tensors whose gradients a forward + backward computes and checks."""

    score: Score
    dropout_p: float
    seed: int
    learned: tuple[torch.Tensor, ...]

    @property
    def plain(self) -> bool:
        return self.score.plain and not self.dropout_p


DROPOUT_SEED = 1234  # one seed per run: every timed call of a case draws the same mask


def case_terms(case: Case, device: torch.device, mode: str, seed: int = 0) -> CaseTerms:
    """The terms of ``case`` with random tensors (:func:`random_score`); with ``mode`` 'fwd-bwd'
    the tensors of its ``grad=True`` terms require grad."""
    dtype = getattr(torch, case.dtype)
    gen = torch.Generator(device).manual_seed(seed)
    score = random_score(case.score, case.batch, case.heads, case.grid, dtype, device, gen)
    learned = []
    for name in case.score.grads if mode == "fwd-bwd" else ():
        value = score.value(name)
        if isinstance(value, torch.Tensor):
            learned.append(value.requires_grad_())
    form = dataclasses.replace(score, grads=(), dropout=False)
    return CaseTerms(form, case.dropout_p, DROPOUT_SEED, tuple(learned))
