"""``attncc compile``: write a spec's kernels as a standalone importable package.

The package holds the rendered kernel modules of each distinct head pattern (one per
variant of Note [Package variants] in package_init.py.j2: with and without dropout, with and
without term gradients, as the spec's score allows), their int32 tables, a ``_terms`` module
that checks the score terms' tensors (package_terms.py.j2), and an ``__init__`` spelled from
``package_init.py.j2`` whose ``forward`` (differentiable: the backward kernels are in the same
modules) needs only torch and triton. A spec with ``q_grid`` (cross-attention) is written as
the one-grid problem it embeds into (Note [Cross-attention] in attncc.runtime.cross), behind a
``forward`` that takes q on ``q_grid`` and k/v on the keys' grid.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import keyword
import math
import sys
import unicodedata
from pathlib import Path

import numpy as np

from attncc import __version__
from attncc.errors import SpecError, field_error
from attncc.ir.canonical import canonicalize, resolve_heads
from attncc.ir.grid import Grid
from attncc.ir.score import Score
from attncc.ir.spec import Spec
from attncc.ir.text import format_pattern, parse
from attncc.ir.validate import required_heads
from attncc.lower.lowering import LaunchConfig, kernel_tables, lower
from attncc.lower.plan import KernelPlan
from attncc.lower.render import ENV, render
from attncc.runtime.cache import write_atomic
from attncc.runtime.ops import DKDV_GRADS
from attncc.runtime.terms import MAX_BIAS_TOKENS

# Note [Package names]: a package is imported by its directory's name, so a name that is
# importable already (torch, triton, attncc, numpy, a stdlib module, ...) would shadow that
# module wherever the package lies on the path, or be shadowed by it; and Python NFKC-normalises
# identifiers, so a non-ASCII name can import as another ("ﬁle" is "file"). Only ASCII
# identifiers that name nothing importable are taken. A package never overwrites files
# unasked: a directory that holds anything needs ``force`` (``attncc compile --force``).
_NEEDED = ("attncc", "math", "torch", "triton")  # what a compiled package and attncc import


def _write(path: Path, text: str) -> None:
    """Write atomically (Note [File modes] in attncc.runtime.cache), and not at all when
    unchanged (nothing rebuilds for no reason)."""
    if path.exists() and path.read_text() == text:
        return
    write_atomic(path, text.encode())


def _check_package_dir(out: Path, force: bool = False) -> None:
    """Raise a :class:`SpecError` naming ``out`` unless a package may be written there
    (Note [Package names])."""
    name = out.name
    allowed = "a directory named as an ASCII Python identifier that no importable module has"
    if not (name.isascii() and name.isidentifier()) or keyword.iskeyword(name):
        nfkc = unicodedata.normalize("NFKC", name)
        why = f"Python would import it as {nfkc!r}" if nfkc != name else ""
        raise field_error(SpecError, "-o", str(out), allowed, why)
    if name in _NEEDED or name in sys.stdlib_module_names:
        raise field_error(SpecError, "-o", str(out), allowed, f"it would shadow the module {name}")
    where = _importable_elsewhere(name, out)
    if where is not None:
        raise field_error(SpecError, "-o", str(out), allowed, f"{name} is importable already, from {where}")
    if out.is_file():
        raise field_error(SpecError, "-o", str(out), "a directory", "it is a file")
    names = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if names and not force:
        held = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        allowed = "a new or empty directory, or --force to write over what it holds"
        raise field_error(SpecError, "-o", str(out), allowed, f"it holds {held}")


def _importable_elsewhere(name: str, out: Path) -> str | None:
    """Where ``import name`` finds a module other than a package at ``out``, or None."""
    try:
        found = importlib.util.find_spec(name)
    except ValueError:  # in sys.modules without a spec, as ``__main__`` may be
        return "sys.modules"
    if found is None:
        return None
    places = list(found.submodule_search_locations or [])
    if places and all(Path(p).resolve() == out.resolve() for p in places):
        return None  # the package written there before, which --force writes over
    return found.origin or places[0]


def learned(score: Score) -> tuple[str, ...]:
    """The terms whose gradients a package's backward computes (Note [Package variants] in
    package_init.py.j2): those the spec's score marks ``grad=True``, else every tensor term
    whose data a caller passes (alibi's slopes given as numbers are constants)."""
    constant = isinstance(score.value("alibi"), tuple)
    if constant and "alibi" in score.grads:
        why = "its slopes are the spec's numbers, constants of the package"
        raise field_error(
            SpecError, "score", score.text, "grad=True on a term whose tensor a call passes", why
        )
    if score.grads:
        return tuple(name for name in score.inputs if name in score.grads)
    return tuple(name for name in score.inputs if not (name == "alibi" and constant))


def _variants(score: Score, learn: tuple[str, ...]) -> list[tuple[bool, bool, Score]]:
    """(dropout, grads, the kernels' form of the score) of every kernel variant a package holds
    (Note [Package variants] in package_init.py.j2)."""
    out = []
    for dropout in (False, True) if score.dropout else (False,):
        for grads in (False, True) if learn else (False,):
            form = dataclasses.replace(score.form, grads=learn if grads else (), dropout=dropout)
            out.append((dropout, grads, form))
    return out


def given(score: Score) -> tuple[str, ...]:
    """The tensor terms a package's caller passes: all but alibi when its slopes are numbers."""
    return tuple(n for n in score.inputs if not (n == "alibi" and isinstance(score.value("alibi"), tuple)))


def usage(spec: Spec, name: str) -> str:
    """How a package of ``spec`` named ``name`` is called: ``name.forward(q, k, v, key_bias=...)``."""
    keywords = [f"{t}=..." for t in given(spec.score)] + (["dropout_p=..."] if spec.score.dropout else [])
    keywords += ["q_offset=..."] if spec.queries else []
    return f"{name}.forward({', '.join(['q', 'k', 'v', *keywords])})"


def write_package(spec: Spec, out_dir: str | Path, device_type: str = "cuda", force: bool = False) -> Path:
    """Write ``out_dir`` as a package named after its last path component; a directory
    that holds anything is written over only with ``force`` (Note [Package names]). Every
    file is rendered before any is written: a spec lowering refuses leaves no folder."""
    out = Path(out_dir)
    _check_package_dir(out, force)
    files = _render_package(spec, out.name, device_type)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        _write(out / name, text)
    return out


def _cross(spec: Spec) -> tuple[Spec, dict | None]:
    """A spec with ``q_grid`` as the one-grid spec of its embedded problem (Note
    [Cross-attention] in attncc.runtime.cross: the queries a region of a 1-D grid, the keys its
    first tokens, zero keys after them cut by the pattern), and what the package's ``forward``
    needs to take the caller's tensors to it; ``spec`` itself and None without ``q_grid``."""
    if spec.q_grid is None:
        return spec, None
    from attncc.runtime import cross

    text, embedding = cross.plan(spec.pattern, spec.q_grid.shape, spec.grid.shape, spec.heads)
    region = (embedding.queries,) if embedding.queries < embedding.length else None
    one_grid = dataclasses.replace(
        spec, pattern=parse(text), grid=Grid((embedding.length,)), queries=region, q_grid=None
    )
    about = {
        "q_grid": spec.q_grid.shape,
        "grid": spec.grid.shape,
        "n_queries": embedding.queries,
        "n_keys": embedding.keys,
        "padding": embedding.padding,
        "offset": embedding.offset,
    }
    return one_grid, about


def _render_package(spec: Spec, name: str, device_type: str) -> dict[str, str]:
    """The files of the package ``name``: its kernel modules (Note [Package variants] in
    package_init.py.j2), tables, term checks and ``__init__``."""
    spec, cross = _cross(spec)
    learn = learned(spec.score)
    if spec.pattern.runtime_leaves:
        kinds = ", ".join(leaf.NAME for leaf in spec.pattern.runtime_leaves)
        why = "the package has no builder of the tile lists its data need (attncc.runtime.tables)"
        allowed = "a pattern without data given per call; call attncc.attention(..., data=...) for these"
        raise field_error(SpecError, "pattern (for attncc compile)", kinds, allowed, why)
    if spec.score.bias and spec.grid.size > MAX_BIAS_TOKENS:
        why = "a dense bias is N x N; the kernels index it with 32-bit offsets"
        allowed = f"1..{MAX_BIAS_TOKENS} tokens (or query_bias/key_bias)"
        raise field_error(SpecError, "grid (for the score's bias)", spec.grid.size, allowed, why)
    shared = required_heads(spec.pattern) is None
    groups: dict = {}
    for head, pattern in enumerate(resolve_heads(spec.pattern, 1 if shared else spec.heads)):
        groups.setdefault(canonicalize(pattern, spec.grid), []).append(head)
    files, kernels, tables, dkdv_tables = {}, [], [], []
    config = LaunchConfig.default(device_type, spec.head_dim, spec.dtype)
    dkdv_config = LaunchConfig.default_dkdv(device_type, spec.head_dim, spec.dtype)
    plans: list[KernelPlan] = []
    for i, (pattern, heads) in enumerate(groups.items()):
        variants = []
        for dropout, grads, form in _variants(spec.score, learn):
            plan, dkdv = (
                lower(
                    pattern,
                    spec.grid,
                    spec.head_dim,
                    spec.dtype,
                    score=form,
                    config=c,
                    device_type=device_type,
                    region=spec.queries,
                )
                for c in (config, dkdv_config)
            )
            module = f"_kernel{i}" + "_dropout" * dropout + "_grads" * grads
            files[f"{module}.py"] = render(plan)
            files[f"{module}_dkdv.py"] = render(dkdv)  # Note [Backward tiles]
            variants.append((dropout, grads, module))
            plans.append(plan)
            if len(variants) == 1:  # the score changes no tile: every variant walks these tables
                for into, p in ((tables, plan), (dkdv_tables, dkdv)):
                    into.append(
                        tuple(a.astype(np.int32).tolist() for a in kernel_tables(pattern, spec.grid, p))
                    )
        kernels.append({"variants": variants, "heads": None if shared else heads})
    files["_tables.py"] = (
        '"""int32 tables of the kernels (values, offsets, entries, kv_offsets, kv_entries): TABLES for\n'
        'the forward and dQ kernels, DKDV_TABLES for the dK/dV kernels (their own tiles)."""\n\n'
        f"TABLES = {tables!r}\nDKDV_TABLES = {dkdv_tables!r}\n"
    )
    score, plan = spec.score, plans[0]
    passed, shapes = given(score), _shapes(spec, cross["n_keys"] if cross else spec.grid.size)
    q_tokens = math.prod(spec.queries or spec.grid.shape)
    common = dict(
        name=name,
        grid_tuple=repr(tuple(spec.grid.shape)),
        tokens=spec.grid.size,
        q_tokens=q_tokens,
        score_text=score.text,
    )
    files["_terms.py"] = ENV.get_template("package_terms.py.j2").render(
        **common,
        inputs=repr(score.inputs),
        given=repr(passed),
        learn=repr(learn),
        alibi=repr(plan.alibi),
        slopes=repr(score.value("alibi") if "alibi" not in passed else None),
        table=repr(score.rel_pos_bias),
        dkdv=repr(DKDV_GRADS),
        shapes=repr(shapes),
    )
    op_terms = ["dense_bias" if n == "bias" else n for n in score.inputs]
    op_params = f"[{', '.join(op_terms)}]" + (" + ([seed] if dropout_p > 0 else [])" if score.dropout else "")
    files["__init__.py"] = ENV.get_template("package_init.py.j2").render(
        **common,
        version=__version__,
        pattern_text=format_pattern(spec.pattern),
        grid="x".join(map(str, spec.grid.shape)),
        grid_dims=", ".join(map(str, spec.grid.shape)),
        head_dim=spec.head_dim,
        dtype=spec.dtype,
        heads=None if shared else spec.heads,
        kernels=kernels,
        sigmoid=score.kind == "sigmoid",
        terms=passed,
        shapes=shapes,
        op_terms=op_terms,
        op_params=op_params,
        p="dropout_p" if score.dropout else "0.0",
        dropout=score.dropout,
        learn=learn,
        fast_tanh=plan.fast_tanh,
        region=spec.queries,
        offsets="q_offsets" if spec.queries else "None",
        cross=cross,
    )
    return files


def _shapes(spec: Spec, n: int) -> dict[str, str]:
    """Each term tensor's shape as the package's docstring and refusals show it (``n``: the keys)."""
    rank = spec.grid.rank
    n_q = math.prod(spec.queries or spec.grid.shape)
    per_axis = spec.score.alibi == "axes" and rank > 1
    return {
        "temperature": "[H]",
        "alibi": "[H]" + (f" or [H, {rank}]" if per_axis else ""),
        "rel_pos_bias": f"[H or 1, {', '.join(map(str, spec.score.rel_pos_bias or ()))}]",
        "query_bias": f"[B or 1, H or 1, {n_q}]",
        "key_bias": f"[B or 1, H or 1, {n}]",
        "bias": f"[B or 1, H or 1, {n_q}, {n}]",
    }
