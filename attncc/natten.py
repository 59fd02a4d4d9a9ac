"""``attncc.natten``: NATTEN's functional API (``na1d``, ``na2d``, ``na3d``) on attncc's kernels.

Code written for NATTEN 0.20+ changes one import::

    from natten.functional import na2d   # before
    from attncc.natten import na2d       # after

    out = na2d(q, k, v, kernel_size=(7, 7), dilation=(2, 1), is_causal=(False, False))

The tensors keep NATTEN's heads-last layout ``[batch, *spatial, heads, head_dim]`` and the
arguments keep NATTEN's names, per-axis tuples and meaning: NATTEN's generalized neighborhood rule
(window clamped at the borders, dilation groups, stride groups sharing a window, causal per axis)
is the IR's ``neighborhood`` (tests/test_ir_natten.py). Each call builds that pattern and runs
:func:`attncc.attention` with ``layout="spatial"``, the grid read from the tensors' shape.

Where attncc differs from NATTEN it says so with an :class:`attncc.AttnccError` (a ``ValueError``,
as NATTEN's are), never by computing something else:

- NATTEN's backend and tiling settings are refused unless left at NATTEN's defaults (Note [NATTEN
  backend settings]); so is an argument neither NATTEN nor attncc knows.
- ``value`` must have the query's head dim (NATTEN allows another one).
- ``scale`` must be a number > 0 or None (NATTEN reads ``scale=0`` as "the default").
- ``kernel_size`` 1 is allowed on an axis (NATTEN asks for 2 or more): the query sees only keys at
  its own coordinate along that axis.

``additional_keys`` / ``additional_values`` (neighborhood cross-attention: every query also sees a
fixed set of extra tokens) are supported as NATTEN does them (Note [Additional keys]).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import TypeVar

import torch

from attncc.errors import AttnccError, PatternError, field_error
from attncc.ir.nodes import Pattern, neighborhood
from attncc.runtime.library import attention

IntOrTuple = int | tuple[int, ...]
BoolOrTuple = bool | tuple[bool, ...]
Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
T = TypeVar("T")

_LAYOUTS = {
    1: "[batch, length, heads, head_dim]",
    2: "[batch, height, width, heads, head_dim]",
    3: "[batch, depth, height, width, heads, head_dim]",
}

# Note [NATTEN backend settings]: NATTEN's functional calls also take settings for its own kernels
# (which backend, tile shapes, backward splits, persistent scheduling, flex's torch.compile) and
# `attention_kwargs` for the attention it runs beside the neighborhood one. None of them changes
# the result, and none has an attncc counterpart: attncc picks its backend (ATTNCC_BACKEND) and
# tiles (its plan, or `attncc tune`) itself. Ignoring them would hide that the call does not do
# what it asks, so each is accepted only at the values NATTEN treats as its default (the first
# listed), and any other value is refused by name.
_NATTEN_DEFAULTS: dict[str, tuple[object, ...]] = {
    "attention_kwargs": (None, {}),
    "backend": (None,),
    "q_tile_shape": (None,),
    "kv_tile_shape": (None,),
    "backward_q_tile_shape": (None,),
    "backward_kv_tile_shape": (None,),
    "backward_kv_splits": (None,),
    "backward_use_pt_reduction": (False,),
    "run_persistent_kernel": (True,),
    "kernel_schedule": (None,),
    "torch_compile": (False,),
}


def na1d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple | None = False,
    scale: float | None = None,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    *,
    return_lse: bool = False,
    **natten_settings: object,
) -> Output:
    """1-D neighborhood attention, as ``natten.functional.na1d``.

    ``query`` ``[batch, length, heads, head_dim]``; ``key``/``value`` ``[batch, length, heads_kv,
    head_dim]`` with ``heads_kv`` dividing ``heads`` (GQA/MQA). ``kernel_size``, ``stride``,
    ``dilation``: an int or a 1-tuple; ``is_causal``: a bool or a 1-tuple. Per axis, ``kernel_size
    x dilation`` must fit the axis and ``stride <= kernel_size``. ``scale`` defaults to
    ``head_dim ** -0.5``. ``additional_keys``/``additional_values`` ``[batch, n_extra, heads_kv,
    head_dim]``: extra tokens every query attends to. Returns the output in ``query``'s layout and
    dtype, and with ``return_lse`` the natural-log log-sum-exp ``[batch, length, heads]`` (float32).
    Differentiable in every tensor.

    Example::

        q, k, v = (torch.randn(2, 37, 4, 16) for _ in range(3))
        out = na1d(q, k, v, kernel_size=7, dilation=2, is_causal=True)  # [2, 37, 4, 16]
    """
    return _neighborhood_attention(
        1, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
        additional_values, return_lse, natten_settings,
    )  # fmt: skip


def na2d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple | None = False,
    scale: float | None = None,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    *,
    return_lse: bool = False,
    **natten_settings: object,
) -> Output:
    """2-D neighborhood attention, as ``natten.functional.na2d``: :func:`na1d` on
    ``[batch, height, width, heads, head_dim]``, each argument an int (every axis) or a 2-tuple.

    Example::

        q, k, v = (torch.randn(1, 6, 9, 2, 16) for _ in range(3))
        out = na2d(q, k, v, kernel_size=(3, 5), stride=(1, 2), is_causal=(True, False))
    """
    return _neighborhood_attention(
        2, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
        additional_values, return_lse, natten_settings,
    )  # fmt: skip


def na3d(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple = 1,
    dilation: IntOrTuple = 1,
    is_causal: BoolOrTuple | None = False,
    scale: float | None = None,
    additional_keys: torch.Tensor | None = None,
    additional_values: torch.Tensor | None = None,
    *,
    return_lse: bool = False,
    **natten_settings: object,
) -> Output:
    """3-D neighborhood attention, as ``natten.functional.na3d``: :func:`na1d` on
    ``[batch, depth, height, width, heads, head_dim]``, each argument an int or a 3-tuple.

    Example::

        q, k, v = (torch.randn(1, 3, 4, 5, 2, 16) for _ in range(3))
        out = na3d(q, k, v, kernel_size=(2, 3, 3), is_causal=(True, False, False))
    """
    return _neighborhood_attention(
        3, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
        additional_values, return_lse, natten_settings,
    )  # fmt: skip


def _neighborhood_attention(
    rank: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: IntOrTuple,
    stride: IntOrTuple,
    dilation: IntOrTuple,
    is_causal: BoolOrTuple | None,
    scale: float | None,
    additional_keys: torch.Tensor | None,
    additional_values: torch.Tensor | None,
    return_lse: bool,
    settings: dict[str, object],
) -> Output:
    name = f"na{rank}d"
    _check_settings(name, settings)
    spatial = _check_tensors(name, rank, query, key, value)
    pattern = _pattern(spatial, kernel_size, stride, dilation, is_causal)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if additional_keys is None and additional_values is None:
        return attention(query, key, value, pattern, scale=scale, return_lse=return_lse, layout="spatial")
    _check_additional(key, additional_keys, additional_values)
    out, lse = attention(query, key, value, pattern, scale=scale, return_lse=True, layout="spatial")
    out, lse = _merge_additional(query, out, lse, additional_keys, additional_values, scale)
    return (out, lse) if return_lse else out


def _check_settings(name: str, settings: dict[str, object]) -> None:
    """Note [NATTEN backend settings]."""
    for setting, value in settings.items():
        if setting not in _NATTEN_DEFAULTS:
            known = "query, key, value, kernel_size, stride, dilation, is_causal, scale, "
            known += "additional_keys, additional_values, return_lse, and NATTEN's backend settings"
            raise AttnccError(f"{name} takes no argument {setting!r}; its arguments are {known}")
        accepted = _NATTEN_DEFAULTS[setting]
        if not any(value is a or (type(value) is type(a) and value == a) for a in accepted):
            raise AttnccError(
                f"{setting} = {value!r} is a setting of NATTEN's own kernels, which attncc does not "
                f"run: attncc picks its backend (ATTNCC_BACKEND) and tiles (`attncc tune`) itself; "
                f"drop the argument or leave it at NATTEN's default, {accepted[0]!r}"
            )


def _check_tensors(
    name: str, rank: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[int, ...]:
    """Check NATTEN's layouts; return the spatial extent (the grid)."""
    for arg, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise AttnccError(f"{arg} is a {type(t).__name__}; {name} takes torch.Tensors")
        if t.dim() != rank + 3:
            others = ", ".join(f"na{r}d {r + 3}-D" for r in _LAYOUTS if r != rank)
            allowed = f"{rank + 3} ({name} takes {_LAYOUTS[rank]}; {others})"
            raise field_error(AttnccError, f"{arg}.dim()", t.dim(), allowed)
    batch, *spatial, heads, head_dim = query.shape
    heads_kv = key.shape[-2]
    if key.shape[:-2] != query.shape[:-2] or key.shape[-1] != head_dim or heads_kv < 1 or heads % heads_kv:
        dims = ", ".join(map(str, [batch, *spatial]))
        allowed = f"[{dims}, heads_kv, {head_dim}] with heads_kv dividing {heads} (query's other dims)"
        raise field_error(AttnccError, "key.shape", tuple(key.shape), allowed)
    if value.shape[:-1] == key.shape[:-1] and value.shape[-1] != head_dim:
        raise field_error(
            AttnccError, "value.shape[-1]", value.shape[-1], f"{head_dim}",
            "attncc needs value's head dim equal to the query's; NATTEN allows another",
        )  # fmt: skip
    if value.shape != key.shape:
        raise field_error(AttnccError, "value.shape", tuple(value.shape), f"{tuple(key.shape)} (key's shape)")
    return tuple(spatial)


def _pattern(
    spatial: tuple[int, ...],
    kernel_size: IntOrTuple,
    stride: IntOrTuple,
    dilation: IntOrTuple,
    is_causal: BoolOrTuple | None,
) -> Pattern:
    """NATTEN's arguments, checked against the spatial extent, as a ``neighborhood`` pattern.
    ``stride``, ``dilation`` and ``is_causal`` may be None, as in NATTEN (1, 1, False)."""
    rank = len(spatial)
    kernel = _per_axis("kernel_size", kernel_size, rank, _to_positive_int, "an int >= 1")
    strides = _per_axis("stride", 1 if stride is None else stride, rank, _to_positive_int, "an int >= 1")
    dilations = _per_axis(
        "dilation", 1 if dilation is None else dilation, rank, _to_positive_int, "an int >= 1"
    )
    causal = _per_axis(
        "is_causal", False if is_causal is None else is_causal, rank, _to_bool, "True or False"
    )
    for a, extent in enumerate(spatial):
        k, d, s = kernel[a], dilations[a], strides[a]
        if k > extent:
            allowed = f"1..{extent} (spatial axis {a} has {extent} tokens)"
            raise field_error(PatternError, _axis("kernel_size", a, rank), k, allowed)
        if k * d > extent:
            why = f"dilation x kernel_size = {d} x {k} must fit spatial axis {a}, {extent} tokens"
            raise field_error(PatternError, _axis("dilation", a, rank), d, f"1..{extent // k}", why)
        if s > k:
            allowed = f"1..{k} ({_axis('kernel_size', a, rank)})"
            raise field_error(PatternError, _axis("stride", a, rank), s, allowed)
    return neighborhood(kernel, dilation=dilations, stride=strides, causal=causal)


def _axis(field: str, a: int, rank: int) -> str:
    """How an error names axis ``a`` of a per-axis argument: ``kernel_size[1]``; plain in 1-D."""
    return field if rank == 1 else f"{field}[{a}]"


def _to_positive_int(x: object) -> int | None:
    ok = isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 1
    return int(x) if ok else None  # type: ignore[arg-type]


def _to_bool(x: object) -> bool | None:
    return x if isinstance(x, bool) else None


def _per_axis(
    field: str, value: object, rank: int, convert: Callable[[object], T | None], element: str
) -> tuple[T, ...]:
    """``value`` as one item per spatial axis (NATTEN's "an int, or a per-axis tuple"), each item
    converted by ``convert`` (None: refused)."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
    if len(items) != rank:
        allowed = f"{element}, or a tuple of {rank} ({rank} spatial axes)"
        raise field_error(PatternError, field, value, allowed)
    out = []
    for a, item in enumerate(items):
        converted = convert(item)
        if converted is None:
            raise field_error(PatternError, _axis(field, a, rank), item, element)
        out.append(converted)
    return tuple(out)


def _check_additional(
    key: torch.Tensor, extra_keys: torch.Tensor | None, extra_values: torch.Tensor | None
) -> None:
    """NATTEN's rules for the extra tokens: both or neither, ``[batch, n_extra, heads_kv, head_dim]``."""
    if extra_keys is None or extra_values is None:
        given, missing = ("additional_keys", "additional_values")
        if extra_keys is None:
            given, missing = missing, given
        raise AttnccError(
            f"{given} is a tensor but {missing} is None: pass both (the extra keys and their values) "
            "or neither"
        )
    batch, heads_kv, head_dim = key.shape[0], key.shape[-2], key.shape[-1]
    for arg, t in (("additional_keys", extra_keys), ("additional_values", extra_values)):
        if not isinstance(t, torch.Tensor):
            raise AttnccError(f"{arg} is a {type(t).__name__}; it must be a torch.Tensor")
        if (
            t.dim() != 4
            or t.shape[0] != batch
            or t.shape[1] < 1
            or tuple(t.shape[2:]) != (heads_kv, head_dim)
        ):
            allowed = f"[{batch}, n_extra >= 1, {heads_kv}, {head_dim}] (key's batch, heads and head dim)"
            raise field_error(AttnccError, f"{arg}.shape", tuple(t.shape), allowed)
        if t.dtype != key.dtype or t.device != key.device:
            allowed = f"{key.dtype} on {key.device} (key's)"
            raise field_error(AttnccError, f"{arg} dtype/device", (t.dtype, str(t.device)), allowed)
    if extra_values.shape != extra_keys.shape:
        allowed = f"{tuple(extra_keys.shape)} (additional_keys' shape)"
        raise field_error(AttnccError, "additional_values.shape", tuple(extra_values.shape), allowed)


def _merge_additional(
    query: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    extra_keys: torch.Tensor,
    extra_values: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Note [Additional keys]: NATTEN's neighborhood cross-attention lets every query see, besides
    its neighborhood, ``n_extra`` tokens that are not on the grid (text tokens, registers). The
    answer is one softmax over both key sets. It is computed as NATTEN computes it, from two partial
    attentions and their log-sum-exps: the neighborhood one from attncc's kernel (``out``, ``lse``),
    the extra one dense, here; then ``out = sum_i out_i * exp(lse_i - lse)`` with ``lse =
    logaddexp(lse_1, lse_2)``. Gradients flow through both terms (attncc's lse is differentiable).
    The extra part runs in torch, in float32, and holds ``[batch, heads, N, n_extra]`` scores:
    cheap for the few extra tokens this is for, not a kernel for many."""
    heads = query.shape[-2]
    q = query.flatten(1, -3).transpose(1, 2).float()  # [B, H, N, D]
    k, v = (
        t.transpose(1, 2).float().repeat_interleave(heads // t.shape[2], dim=1)  # [B, H, n_extra, D]
        for t in (extra_keys, extra_values)
    )
    scores = (q @ k.transpose(-1, -2)) * scale  # [B, H, N, n_extra]
    extra_lse = torch.logsumexp(scores, dim=-1).transpose(1, 2).reshape(lse.shape)  # [B, *spatial, H]
    extra_out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(out.shape)
    total = torch.logaddexp(lse, extra_lse)
    kept, extra = torch.exp(lse - total)[..., None], torch.exp(extra_lse - total)[..., None]
    return (out.float() * kept + extra_out * extra).to(query.dtype), total
