"""The tensors of a score's terms, as the kernels read them, and their gradients.

:func:`inputs` checks each term's data against the call and gives the views the kernels
take (Note [Term inputs] in attncc.lower.plan); :func:`gradients` turns what the backward
kernels write back into gradients of the user's tensors.

Note [Term gradients]: the backward computes the gradient of each term tensor that
requires grad (the score's form marks them ``grad=True``, so a frozen table costs
nothing), deterministically and without an ``[N, N]`` intermediate (the dense ``bias``
term is itself ``[N, N]``):

- temperature: ``dL/dt[h] = scale * sum_q q . dq_acc`` where ``dq_acc`` is the dQ kernel's
  accumulator of score gradients times keys (the tempered score is linear in ``t``), one
  row sum per query written by the dQ kernel;
- alibi slopes, query bias: row sums of the score gradients (times the distance, for the
  slopes) written by the dQ kernel per query (per axis for 'axes');
- key bias: column sums written by the dK/dV kernel per key and query head;
- bias: the score gradient of each visited pair, written by the dQ kernel;
- the relative position table: each kept pair's score gradient at its query's row and its
  table entry, written by the dK/dV kernel (Note [Table gradient] in attncc.lower.plan).

Every buffer is float32 with one writer per element; the host sums them over queries and
programs in a fixed order and casts to the tensor's dtype. The ops take the term tensors as
the broadcast views of :func:`inputs`, so autograd sums over what a user's tensor
broadcasts (a table shared by the heads, a bias shared by the batch) through the view.
"""

from __future__ import annotations

import torch

from attncc.errors import AttnccError, field_error, form_error
from attncc.ir.grid import Grid
from attncc.ir.score import Score
from attncc.lower.plan import RANK, KernelPlan

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MAX_BIAS_TOKENS = 46340  # the largest N with N * N < 2^31


def inputs(
    score: Score, batch: int, heads: int, grid: Grid, device: torch.device, n_q: int | None = None
) -> list[torch.Tensor]:
    """The tensors of ``score``'s terms for a call on ``[batch, heads, n_q]`` queries over
    ``grid``'s keys (``n_q`` its size unless the queries cover a box of it: Note [Query regions]
    in attncc.lower.plan), in the order of ``score.inputs``, as views the kernels index with
    their strides."""
    n = grid.size
    n_q = n if n_q is None else n_q
    out = []
    for name in score.inputs:
        value = score.value(name)
        if value is None:
            raise field_error(
                AttnccError, name, None, f"data for the term: attncc.ir.{name}(tensor)",
                "the score declares the term but gives no tensor",
            )  # fmt: skip
        if name == "alibi" and isinstance(value, tuple):
            value = _constant(value, device)
        if not isinstance(value, torch.Tensor) or value.dtype not in FLOATS:
            shown = value.dtype if isinstance(value, torch.Tensor) else value
            raise form_error(AttnccError, name, shown, "a float16, bfloat16 or float32 tensor")
        if value.device != device:
            raise field_error(AttnccError, f"{name} device", value.device, f"the device of q ({device})")
        out.append(_view(name, value, score, batch, heads, grid.rank, n, n_q))
    return out


def _view(
    name: str, t: torch.Tensor, score: Score, batch: int, heads: int, rank: int, n: int, n_q: int
) -> torch.Tensor:
    shape = tuple(t.shape)
    if name == "temperature":
        if shape not in ((heads,), (1,)):
            raise field_error(
                AttnccError, "temperature shape", shape, f"({heads},) or (1,): one per query head"
            )
        return t.expand(heads)
    if name == "alibi":
        per_axis = score.alibi == "axes" and rank > 1
        allowed = [(heads,)] + ([(heads, rank)] if per_axis else [])
        if shape not in allowed:
            why = "one slope per query head" + (", or per head and axis" if per_axis else "")
            raise field_error(AttnccError, "alibi slopes shape", shape, " or ".join(map(str, allowed)), why)
        if not per_axis:
            return t.reshape(heads, 1)
        # Note [Term inputs]: 'axes' slopes padded to rank 3 like the grid (axes of size 1 get 0).
        slopes = t.reshape(heads, -1).expand(heads, rank)
        return torch.cat([slopes.new_zeros(heads, RANK - rank), slopes], dim=1)
    if name == "rel_pos_bias":
        sizes = score.rel_pos_bias or ()
        if len(shape) != 1 + rank or shape[0] not in (1, heads) or shape[1:] != sizes:
            allowed = f"({heads} or 1, {', '.join(map(str, sizes))})"
            raise field_error(AttnccError, "rel_pos_bias shape", shape, allowed)
        # Note [Term inputs]: each head's table contiguous (the kernels index it with constants).
        padded = t.contiguous().reshape(shape[0], *(1,) * (RANK - rank), *sizes)
        return padded.expand(heads, *(1,) * (RANK - rank), *sizes)
    full = {
        "query_bias": (batch, heads, n_q),
        "key_bias": (batch, heads, n),
        "bias": (batch, heads, n_q, n),
    }[name]
    if name == "bias" and n > MAX_BIAS_TOKENS:
        why = "a dense bias is N x N; the kernels index it with 32-bit offsets"
        raise field_error(
            AttnccError, "bias tokens", n, f"1..{MAX_BIAS_TOKENS} (or query_bias/key_bias)", why
        )
    if (
        len(shape) != len(full)
        or any(s not in (1, f) for s, f in zip(shape[:2], full[:2]))
        or shape[2:] != full[2:]
    ):
        dims = ", ".join(map(str, full[2:]))
        allowed = f"({batch} or 1, {heads} or 1, {dims}) (the SDPA layout's flat positions)"
        raise field_error(AttnccError, f"{name} shape", shape, allowed)
    view = t.expand(full)
    if name == "bias" and (n - 1) * (abs(view.stride(2)) + abs(view.stride(3))) >= 2**31:
        view = t.contiguous().expand(full)  # a dense [N, N] slice's offsets fit 32 bits
    return view


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """Slopes given as numbers, as a float32 tensor (made once per device for eager calls)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=torch.float32, device=device)
    key = (values, device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _CONSTANTS[key]


def placeholders(
    plan: KernelPlan, batch: int, heads: int, n: int, device: str, n_q: int | None = None
) -> list[torch.Tensor]:
    """Tensors shaped as a call's term views (and the seed) of ``plan``, contiguous: what the
    static profile launches with (attncc.machine.launch; ``device="meta"``); ``n_q``: q's rows
    (default ``n``)."""
    n_q = n if n_q is None else n_q
    shapes = {
        "temperature": (heads,),
        "alibi": (heads, RANK if plan.alibi == "axes" else 1),
        "rel_pos_bias": (heads, *(plan.rel_pos_bias or ())),
        "query_bias": (batch, heads, n_q),
        "key_bias": (batch, heads, n),
        "bias": (batch, heads, n_q, n),
    }
    out = [torch.empty(shapes[name], device=device, dtype=torch.float32) for name in plan.inputs]
    if plan.dropout:
        out.append(torch.empty(1, device=device, dtype=torch.int64))
    return out


def needs_grad(score: Score) -> tuple[str, ...]:
    """The terms whose tensors require grad in this call (Note [Term gradients])."""
    if not torch.is_grad_enabled():
        return ()
    return tuple(
        n for n in score.inputs if isinstance(score.value(n), torch.Tensor) and score.value(n).requires_grad
    )


def seed_for(seed: int | None, device: torch.device) -> torch.Tensor:
    """The dropout seed as an int64 ``[1]`` tensor: ``seed``, or drawn from torch's generator
    (so ``torch.manual_seed`` makes a run repeatable)."""
    if seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device="cpu").to(device)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise field_error(AttnccError, "dropout_seed", seed, "an int in 0..2**63 - 1, or None (drawn)")
    return torch.tensor([seed], dtype=torch.int64, device=device)


def buffers(plan: KernelPlan, params: list[torch.Tensor], batch: int, heads: int, n_q: int, n: int,
            device: torch.device) -> dict[str, torch.Tensor]:  # fmt: skip
    """Zeroed float32 buffers the backward kernels write each learned input's parts into
    (Note [Term gradients]): ``[B, H, N]`` rows (``[B, H, N, A]`` for the slopes), the dense
    bias's ``[B, H, N, N]``, and the table's ``[B, H, N, T]`` (a row of entries per query:
    Note [Table gradient] in attncc.lower.plan)."""
    out = {}
    for name in plan.grads:
        if name == "bias":
            shape: tuple[int, ...] = (batch, heads, n_q, n)
        elif name == "alibi":
            shape = (batch, heads, n_q, params[plan.inputs.index("alibi")].shape[1])
        elif name == "rel_pos_bias":  # Note [Table gradient] in attncc.lower.plan: a row per query
            shape = (batch, heads, n_q, plan.table_entries)
        elif name == "key_bias":
            shape = (batch, heads, n)
        else:
            shape = (batch, heads, n_q)
        out[name] = torch.zeros(shape, device=device, dtype=torch.float32)
    return out


def gradient(name: str, part: torch.Tensor, like: torch.Tensor, scale: float) -> torch.Tensor:
    """The gradient of the kernels' view ``like`` of term ``name`` (attncc.runtime.terms.inputs;
    autograd takes it on through the view to the user's tensor) from its float32 buffer."""
    if name == "temperature":
        grad = part.sum(dim=(0, 2)) * scale  # [H]
    elif name == "alibi":
        grad = part.sum(dim=(0, 2))  # [H, A]
    elif name == "rel_pos_bias":
        grad = part.sum(dim=(0, 2)).reshape(like.shape)  # [H, S0, S1, S2]
    else:
        grad = part
    return grad.to(like.dtype)
