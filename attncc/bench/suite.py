"""Benchmark cases as data, and the named suites ``attncc bench`` runs.

A suite is split into parts that each fit one 10-minute GPU command
(``benchmarks/gpu_check.sh`` runs one part per command); ``default`` is all of
them. ``issue3`` holds issue 3's eight forward acceptance cases unchanged; ``terms``
holds issue 17's score terms, each case beside the same case without its term.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attncc.errors import AttnccError, field_error
from attncc.ir import (
    Grid,
    Intersection,
    Pattern,
    PerHead,
    Score,
    Union,
    axial,
    block_sparse,
    causal,
    dense,
    global_tokens,
    load_spec,
    neighborhood,
    parse_score,
    per_head,
    sliding_window,
    validate,
)
from attncc.ir.spec import DTYPES, whole_grid

DROPOUT_P = 0.1  # the drop probability of a case whose score declares dropout


@dataclass(frozen=True)
class Case:
    """One benchmark problem: ``[batch, heads, grid.size, head_dim]`` q, k, v of ``dtype``, and
    the score (attncc.ir.score): its terms are declared, their tensors random
    (attncc.bench.terms.random_score); a term marked ``grad=True`` is learned (its gradient
    is computed and checked with ``--fwd-bwd``); ``dropout`` drops :data:`DROPOUT_P`."""

    name: str
    pattern: Pattern
    grid: Grid
    heads: int = 16
    head_dim: int = 128
    dtype: str = "bfloat16"
    batch: int = 1
    score: Score = dataclasses.field(default_factory=Score)

    def __post_init__(self) -> None:
        validate(self.pattern, self.grid, self.heads)
        self.score.check(self.grid, self.heads)
        if self.dtype not in DTYPES:
            raise field_error(AttnccError, f"case {self.name}: dtype", self.dtype, ", ".join(DTYPES))
        for name in ("head_dim", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise field_error(AttnccError, f"case {self.name}: {name}", value, "an integer >= 1")

    @property
    def tokens(self) -> int:
        return self.grid.size

    @property
    def dropout_p(self) -> float:
        return DROPOUT_P if self.score.dropout else 0.0

    @property
    def problem(self) -> tuple:
        """Everything but the name and the score's terms: a case and the same case without its
        terms (the plain case a term's cost is measured against) share it."""
        return (self.pattern, self.grid, self.heads, self.head_dim, self.dtype, self.batch, self.score.kind)


def random_layout(blocks: int, density: float, seed: int) -> tuple[tuple[int, ...], ...]:
    """A block layout keeping about ``density`` of the blocks, the diagonal always
    (so no query row is empty), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    extra = (density * blocks - 1) / (blocks - 1)  # the diagonal already gives 1/blocks
    layout = (rng.random((blocks, blocks)) < extra) | np.eye(blocks, dtype=bool)
    return tuple(tuple(int(v) for v in row) for row in layout)


def _issue3() -> list[Case]:
    return [
        Case("dense-16384", dense(), Grid((16384,))),
        Case("causal-16384", causal(), Grid((16384,))),
        Case("swa-2048-32768", sliding_window(2047, 0), Grid((32768,))),
        Case("na2d-128x128-w31", neighborhood(31), Grid((128, 128))),
        Case("na2d-128x128-w63", neighborhood(63), Grid((128, 128))),
        Case("na2d-128x128-w15-d4", neighborhood(15, dilation=4), Grid((128, 128))),
        Case("na3d-16x48x48-w7x15x15", neighborhood((7, 15, 15)), Grid((16, 48, 48))),
        Case("axial-128x128", axial(), Grid((128, 128))),
    ]


def _grids() -> list[Case]:
    return [
        Case("na2d-128x128-w13", neighborhood(13), Grid((128, 128))),
        Case("na2d-127x129-w31", neighborhood(31), Grid((127, 129))),  # not a multiple of any tile
        Case("na2d-96x96-w7-d2", neighborhood(7, dilation=2), Grid((96, 96))),
        Case("na3d-16x48x48-w5x9x9", neighborhood((5, 9, 9)), Grid((16, 48, 48))),
        Case("gna2d-128x128-w24-s8", neighborhood(24, stride=8), Grid((128, 128))),
        # Stride = window = a 128-token Q tile: every tile sees one KV box, no masking (block-sparse).
        Case("gna2d-128x128-w8x16-s8x16", neighborhood((8, 16), stride=(8, 16)), Grid((128, 128))),
        Case(
            "gna3d-16x48x48-w8x16x16-s4x8x8", neighborhood((8, 16, 16), stride=(4, 8, 8)), Grid((16, 48, 48))
        ),
        Case("gna3d-16x48x48-w2x8x8-s2x8x8", neighborhood((2, 8, 8), stride=(2, 8, 8)), Grid((16, 48, 48))),
    ]


def _flat() -> list[Case]:
    mixture = [neighborhood(15), neighborhood(15, dilation=4), axial(), dense()] * 4
    return [
        Case("dense-4096", dense(), Grid((4096,))),
        Case("causal-4096", causal(), Grid((4096,))),
        Case("band-511-511-16384", sliding_window(511, 511), Grid((16384,))),
        Case("na1d-8192-w255", neighborhood(255), Grid((8192,))),
        Case("block-sparse-10%-16384", block_sparse(random_layout(128, 0.10, 0), 128), Grid((16384,))),
        Case("block-sparse-25%-16384", block_sparse(random_layout(128, 0.25, 1), 128), Grid((16384,))),
        Case(
            "swa-1024-sinks-16384",
            (sliding_window(1023) | global_tokens([0, 1, 2, 3])) & causal(),
            Grid((16384,)),
        ),
        Case("per-head-mix-128x128", per_head(mixture), Grid((128, 128))),
    ]


def _models() -> list[Case]:
    sinks = (sliding_window(4095) | global_tokens([0, 1, 2, 3])) & causal()
    return [
        Case("image-128x128-na2d-w13-d64-fp16", neighborhood(13), Grid((128, 128)), 16, 64, "float16"),
        Case("image-128x128-na2d-w31-d64-bf16", neighborhood(31), Grid((128, 128)), 16, 64),
        Case(
            "video-16x48x80-causal-t-w5x15x15",
            neighborhood((5, 15, 15), causal=(True, False, False)),
            Grid((16, 48, 80)),
        ),
        Case(
            "video-16x48x80-w7x15x15-d64-fp16",
            neighborhood((7, 15, 15)),
            Grid((16, 48, 80)),
            24,
            64,
            "float16",
        ),
        Case("lm-32768-causal", causal(), Grid((32768,))),
        Case("lm-32768-swa-4096-sinks-d64-fp16", sinks, Grid((32768,)), 32, 64, "float16"),
    ]


def _terms() -> list[Case]:
    """Each score term beside the same case without it (``+softmax``): causal LM attention with Gemma-2's cap,
    ALiBi, both, dropout and a per-key bias; a 2-D neighborhood with a learned relative
    position table (Swin's, NATTEN's); a dense bias on a short sequence."""
    lm, image, short = Grid((4096,)), Grid((64, 64)), Grid((2048,))
    return [
        Case("causal-4096+softmax", causal(), lm),
        Case("causal-4096+softcap", causal(), lm, score=parse_score("softcap(50.0)")),
        Case("causal-4096+alibi", causal(), lm, score=parse_score("alibi")),
        Case("causal-4096+softcap+alibi", causal(), lm, score=parse_score("softcap(50.0) + alibi")),
        Case("causal-4096+dropout", causal(), lm, score=parse_score("dropout")),
        Case("causal-4096+key-bias", causal(), lm, score=parse_score("key_bias")),
        Case("na2d-64x64-w13+softmax", neighborhood(13), image),
        Case(
            "na2d-64x64-w13+rpb",
            neighborhood(13),
            image,
            score=parse_score("rel_pos_bias(25, 25, grad=True)"),
        ),
        Case("dense-2048+softmax", dense(), short),
        Case("dense-2048+bias", dense(), short, score=parse_score("bias")),
    ]


def _tiny_terms() -> list[Case]:
    """The terms suite's harness on the CPU: seconds under the Triton interpreter."""
    causal40, na2d = (causal(), Grid((40,))), (neighborhood(3), Grid((6, 9)))
    tiny = dict(heads=2, head_dim=16, dtype="float32")
    return [
        Case("tiny-causal-40+softcap+alibi", *causal40, **tiny, score=parse_score("softcap(5.0) + alibi")),
        Case("tiny-na2d-6x9-w3+rpb", *na2d, **tiny, score=parse_score("rel_pos_bias(5, 5, grad=True)")),
        Case("tiny-causal-40+dropout", *causal40, **tiny, score=parse_score("dropout")),
    ]


def _tiny() -> list[Case]:
    """Seconds under the Triton interpreter: the CPU test of the harness."""
    return [
        Case("tiny-causal-40", causal(), Grid((40,)), 2, 16, "float32"),
        Case("tiny-na2d-6x9-w3", neighborhood(3), Grid((6, 9)), 2, 16, "float32"),
    ]


PARTS = {
    "issue3": _issue3,
    "grids": _grids,
    "flat": _flat,
    "models": _models,
    "terms": _terms,
    "tiny": _tiny,
    "tiny-terms": _tiny_terms,
}
DEFAULT = ("issue3", "grids", "flat", "models")


def suite_names() -> list[str]:
    return ["default", *PARTS]


def load_parts(target: str) -> list[tuple[str, list[Case]]]:
    """The named parts of a suite name (``default``: its parts; a part: itself) or of a spec
    file (one part, named by its path, of one case)."""
    if target == "default":
        return [(part, PARTS[part]()) for part in DEFAULT]
    if target in PARTS:
        return [(target, PARTS[target]())]
    path = Path(target)
    if path.suffix in (".yaml", ".yml", ".json"):
        spec = whole_grid(load_spec(path), "bench")
        name = spec.name or path.stem
        case = Case(name, spec.pattern, spec.grid, spec.heads, spec.head_dim, spec.dtype, score=spec.score)
        return [(target, [case])]
    allowed = ", ".join(suite_names()) + ", or a spec file (.yaml, .yml, .json)"
    raise field_error(AttnccError, "SUITE|SPEC", target, allowed)


def load_cases(target: str) -> list[Case]:
    """The cases of a suite name (``default`` or a part) or of a spec file (one case)."""
    return [case for _, cases in load_parts(target) for case in cases]


_LONG = 8  # a field holding more numbers than this is summarised by short_pattern


def short_pattern(p: Pattern) -> str:
    """The text form of ``p`` (as :func:`attncc.ir.text.format_pattern`) on one short line: a
    field of many numbers (a block layout, document ids) becomes its shape, with the kept
    fraction of a 0/1 layout, and a per-head list its distinct patterns."""
    if isinstance(p, Union):
        return " | ".join(short_pattern(op) for op in p.operands)
    if isinstance(p, Intersection):
        return " & ".join(
            f"({short_pattern(op)})" if isinstance(op, Union) else short_pattern(op) for op in p.operands
        )
    if isinstance(p, PerHead):
        distinct = list(dict.fromkeys(p.patterns))
        if len(distinct) == len(p.patterns):
            return f"per_head([{', '.join(short_pattern(op) for op in distinct)}])"
        each = ", ".join(short_pattern(op) for op in distinct)
        return f"per_head({len(p.patterns)} heads, {len(distinct)} distinct: [{each}])"
    args = []
    for f in dataclasses.fields(p):  # type: ignore[arg-type]
        value = getattr(p, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        values = np.asarray(value) if isinstance(value, tuple) else None
        if values is not None and values.size > _LONG:
            kept = f", {values.mean():.0%} kept" if np.isin(values, (0, 1)).all() else ""
            args.append(f"{f.name}=<{'x'.join(map(str, values.shape))}{kept}>")
        else:
            args.append(f"{f.name}={value!r}")
    return f"{p.NAME}({', '.join(args)})"
