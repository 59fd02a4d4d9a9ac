"""Every shipped spec through the kernels: forward and backward against the reference.

The specs' grids are model-sized (up to 16k tokens), too large for Triton's interpreter, so each
spec has a small twin here: the same expression (primitives, combinators and their order) with
smaller windows, indices and grids that are not multiples of the tiles. A twin must print like its
spec up to the numbers, so a spec that changes shape or a new spec without a twin fails here.
The GPU tests (tests/test_triton_*_gpu.py) run the families at realistic shapes.
"""

import re

import pytest
import torch
from conftest import DEVICE, SPECS

from attncc.ir import (
    Grid,
    axial,
    band,
    block_diagonal,
    block_sparse,
    causal,
    congruent,
    dense,
    document,
    global_tokens,
    key_range,
    load_spec,
    neighborhood,
    per_head,
    sliding_window,
    strided,
)
from attncc.reference import attention as reference
from attncc.runtime.library import attention

_LAYOUT = [[int(i == j or (3 * i + j) % 4 == 0) for j in range(5)] for i in range(5)]
TWINS = {
    "axial.yaml": (axial(axes=(0, 1)), (6, 7)),
    "block_diagonal.yaml": (block_diagonal(axis=0, block=9), (40,)),
    "block_sparse.yaml": (block_sparse(_LAYOUT, 9), (43,)),
    "causal.yaml": (causal(), (77,)),
    "congruent.yaml": (congruent(0, modulus=3) & congruent(1, modulus=3), (7, 10)),
    "dense.yaml": (dense(), (37,)),
    "document.json": (document([0] * 20 + [1] * 9 + [2] * 31) & causal(), (60,)),
    "global_tokens.yaml": ((sliding_window(left=9) | global_tokens([0, 1, 2, 3])) & causal(), (70,)),
    "gna2d_strided.yaml": (neighborhood(window=(6, 6), stride=(2, 2)), (13, 15)),
    "local_video.yaml": (band(0, lo=-1, hi=1) & band(1, lo=-2, hi=2) & band(2, lo=-2, hi=2), (4, 6, 7)),
    "na1d.yaml": (neighborhood(window=7), (41,)),
    "na2d.yaml": (neighborhood(window=(5, 5)), (11, 13)),
    "na2d_cls.yaml": (neighborhood(window=(3, 3)) | global_tokens([0, 1, 2, 3]), (9, 10)),
    "na2d_dilated.yaml": (neighborhood(window=3, dilation=2), (11, 12)),
    "na3d.yaml": (neighborhood(window=(3, 3, 5)), (4, 6, 7)),
    "na3d_causal_time.yaml": (neighborhood(window=(3, 3, 3), causal=(True, False, False)), (4, 5, 7)),
    # its queries' box runs in tests/test_regions.py (the last frames) and test_compile_regions.py
    "na3d_last_frames.yaml": (neighborhood(window=(3, 3, 5), causal=(True, False, False)), (4, 5, 6)),
    "prefix_lm.yaml": (causal() | key_range(axis=0, hi=13), (60,)),
    "per_head.yaml": (
        per_head([neighborhood(window=3), neighborhood(window=3, dilation=2), axial(), dense()]),
        (8, 9),
    ),
    "sliding_window.yaml": (sliding_window(left=15, right=0), (70,)),
    "strided.yaml": ((sliding_window(left=7) | strided(stride=8)) & causal(), (70,)),
    # its cross-attention (q_grid) runs in tests/test_spec_cross.py and test_compile_cross.py
    "text_to_image_cross.yaml": (dense(), (6, 7)),
    "video_chunks.yaml": (
        block_diagonal(axis=0, block=2)
        & (band(1, lo=-1, hi=1) & band(2, lo=-1, hi=1) | congruent(1, modulus=4) & congruent(2, modulus=4)),
        (4, 8, 8),
    ),
}
SPEC_FILES = sorted(p.name for p in SPECS.iterdir() if p.suffix in (".yaml", ".yml", ".json"))


def _shape(pattern) -> str:
    """The pattern's text with numbers blanked and long runs of them (ids, layout rows) collapsed:
    tuples of up to four numbers (a window, a few indices) keep their length, so a rank shows."""
    text = re.sub(r"#(, #){4,}", "#*", re.sub(r"-?\d+", "#", str(pattern)))
    return re.sub(r"\(#\*\)(, \(#\*\))*", "rows", text)


def test_every_spec_has_a_twin_of_its_shape():
    assert sorted(TWINS) == SPEC_FILES
    for name, (twin, _) in TWINS.items():
        assert _shape(twin) == _shape(load_spec(SPECS / name).pattern), name


def _heads(name):
    spec = load_spec(SPECS / name)
    return (spec.heads, spec.heads) if name == "per_head.yaml" else (2, 1)  # GQA: 2 query heads per KV head


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", sorted(TWINS))
def test_forward_of_each_spec(name, dtype, atol):
    pattern, shape = TWINS[name]
    grid, (h, h_kv) = Grid(shape), _heads(name)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, n, grid.size, 32, generator=g).to(DEVICE, dtype) for n in (h, h_kv, h_kv))
    out = torch.full_like(q, float("nan"))  # poisoned: an unwritten element fails
    o, lse = attention(q, k, v, pattern, grid=grid, return_lse=True, out=out)
    r, r_lse = reference(q, k, v, pattern, grid=grid, return_lse=True)
    torch.testing.assert_close(o.float(), r.float(), atol=atol, rtol=0)
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse))
    finite = torch.isfinite(r_lse)
    torch.testing.assert_close(lse[finite], r_lse[finite], atol=max(atol, 1e-5), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(TWINS))
def test_backward_of_each_spec(name):
    """fp32 gradients against float64 autograd through the reference (1e-4: sums over ~100 keys)."""
    pattern, shape = TWINS[name]
    grid, (h, h_kv) = Grid(shape), _heads(name)
    g = torch.Generator().manual_seed(2)
    inputs = [torch.randn(1, n, grid.size, 32, generator=g, dtype=torch.float64) for n in (h, h_kv, h_kv)]
    do = torch.randn(1, h, grid.size, 32, generator=g, dtype=torch.float64)
    ours = [t.to(DEVICE, torch.float32).requires_grad_() for t in inputs]
    want = [t.clone().requires_grad_() for t in inputs]
    attention(*ours, pattern, grid=grid).backward(do.to(DEVICE, torch.float32))
    reference(*want, pattern, grid=grid).backward(do)
    for label, a, b in zip("qkv", ours, want):
        err = (a.grad.cpu().double() - b.grad).abs().max().item()
        assert err < 1e-4, f"d{label} of {name}: max abs error {err:.3g}"
