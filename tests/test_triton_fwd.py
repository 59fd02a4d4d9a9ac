"""The Triton forward kernel against the brute-force reference.

On the CPU these run under TRITON_INTERPRET=1 at small shapes (fp32 and fp16:
the interpreter's bf16 dot is wrong, see shared/TOOLCHAIN.md); bf16 and
realistic shapes run in tests/test_triton_fwd_gpu.py on a GPU.

Tolerances: fp32 runs the dots in IEEE fp32, so the output differs from the
fp32 reference only by summation order: 1e-5 on O(1) values. fp16 rounds P to
fp16 before the PV dot and stores O in fp16 (each ~2^-11 relative), so the
output of a convex combination of O(1) values is within ~2e-3.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE

from attncc import AttnccError
from attncc.ir import (
    Grid,
    axial,
    block_sparse,
    causal,
    dense,
    document,
    global_tokens,
    neighborhood,
    per_head,
    sliding_window,
    strided,
)
from attncc.reference import attention as reference
from attncc.runtime.library import attention

CASES = [
    ("dense-37", dense(), Grid((37,))),
    ("dense-128-full-tiles", dense(), Grid((128,))),
    ("causal-200", causal(), Grid((200,))),
    ("na2d-w13-20x24-full-tiles", neighborhood(13), Grid((20, 24))),
    ("causal-50", causal(), Grid((50,))),
    ("band-70", sliding_window(5, 3), Grid((70,))),
    ("na1d-w7-33", neighborhood(7), Grid((33,))),
    ("na1d-even-w4-d2-s2-29", neighborhood(4, dilation=2, stride=2), Grid((29,))),
    ("na2d-w3-d2-9x10", neighborhood(3, dilation=2), Grid((9, 10))),
    ("na2d-causal-stride-7x11", neighborhood((3, 5), stride=(2, 3), causal=(True, False)), Grid((7, 11))),
    ("na3d-3x5x6", neighborhood((2, 3, 3)), Grid((3, 5, 6))),
    (
        "na3d-causal-t-4x5x6",
        neighborhood((2, 3, 5), causal=(True, False, False)),
        Grid((4, 5, 6)),
    ),
    ("axial-6x7", axial(), Grid((6, 7))),
    ("axial-7x9-ragged-full-tiles", axial(), Grid((7, 9))),
    ("global-band-150", sliding_window(40, 0) | global_tokens([0, 99]), Grid((150,))),
    ("axial0-6x7", axial(0), Grid((6, 7))),
    ("strided-band-40", strided(3, 1) & sliding_window(7, 0), Grid((40,))),
    ("sparse-transformer-150", sliding_window(15, 0) | (strided(16, 3) & causal()), Grid((150,))),
    (
        "spec-strided-130",
        (sliding_window(15) | strided(16)) & causal(),
        Grid((130,)),
    ),  # as examples/specs/strided.yaml
    ("na-or-axial-9x10", neighborhood(3) | axial(0), Grid((9, 10))),
    ("block-sparse-40", block_sparse([[1, 0], [1, 1]], 20), Grid((40,))),
    ("global-causal-50", causal() | global_tokens([3, 40]), Grid((50,))),
    ("document-causal-45", document([0] * 20 + [1] * 25) & causal(), Grid((45,))),
    ("na2d-or-global-7x9", neighborhood(3) | global_tokens([0, 1]), Grid((7, 9))),
    # a table plan whose rule divides negative numbers (Note [Floor division in kernels])
    ("na2d-d2-or-global-7x9", neighborhood((3, 3), dilation=(2, 1)) | global_tokens([0]), Grid((7, 9))),
]


def _inputs(b, h, h_kv, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape, generator=g).to(dtype=dtype, device=DEVICE)
        for shape in ((b, h, n, d), (b, h_kv, n, d), (b, h_kv, n, d))
    ]


def _check(pattern, grid, q, k, v, atol, **kw):
    out = torch.full_like(q, math.nan)  # poisoned: an unwritten element fails
    o, lse = attention(q, k, v, pattern, grid=grid, return_lse=True, out=out, **kw)
    r, r_lse = reference(q, k, v, pattern, grid=grid, return_lse=True, **kw)
    assert o is out and not o.isnan().any()
    torch.testing.assert_close(o.float(), r.float(), atol=atol, rtol=0)
    assert torch.equal(torch.isinf(lse), torch.isinf(r_lse))
    finite = torch.isfinite(r_lse)
    # lse grows with the scores: fp32 keeps it to ~1e-7 relative.
    torch.testing.assert_close(lse[finite], r_lse[finite], atol=max(atol, 1e-5), rtol=1e-6)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name,pattern,grid", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference(name, pattern, grid, dtype, atol):
    q, k, v = _inputs(2, 4, 2, grid.size, 16, dtype)  # B=2, GQA 4:2
    _check(pattern, grid, q, k, v, atol)


@pytest.mark.parametrize("d", [24, 32, 64], ids=["D24-padded", "D32", "D64"])
def test_head_dims_and_mqa(d):
    q, k, v = _inputs(1, 3, 1, 30, d, torch.float32)
    _check(neighborhood(5) & causal(), Grid((30,)), q, k, v, 1e-5, scale=0.2)


def test_per_head_patterns():
    q, k, v = _inputs(1, 2, 1, 33, 16, torch.float32)
    _check(per_head([causal(), neighborhood(5)]), Grid((33,)), q, k, v, 1e-5)


def test_spatial_and_non_contiguous_layouts():
    grid = Grid((5, 7))
    q, k, v = _inputs(1, 2, 2, grid.size, 16, torch.float32)
    spatial = [t.transpose(1, 2).unflatten(1, grid.shape) for t in (q, k, v)]  # [B, 5, 7, H, D] views
    assert not spatial[0].is_contiguous()
    o = attention(*spatial, neighborhood(3))
    r = reference(*spatial, neighborhood(3))
    assert o.shape == (1, 5, 7, 2, 16)
    torch.testing.assert_close(o, r, atol=1e-5, rtol=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's bf16 (a GPU runs bf16 kernels)")
def test_bf16_on_the_cpu_is_right_forward_and_backward():
    # Note [bf16 on the CPU]: the interpreter's bf16 dot is wrong by orders of magnitude, so a
    # bf16 call there computes in float32 and rounds to bf16. Against the float32 reference on
    # the same bf16 values, only that rounding differs: 2^-9 relative on values below ~4.
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, 40, 16, torch.bfloat16))
    out, lse = attention(q, k, v, neighborhood(7), return_lse=True)
    wide = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = reference(*wide, neighborhood(7), return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (out * do).sum().backward()
    (ref * do.float()).sum().backward()
    for got, want in zip((q, k, v), wide):
        assert got.grad.dtype == torch.bfloat16
        torch.testing.assert_close(got.grad.float(), want.grad, atol=2e-2, rtol=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU tensors")
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    # Without TRITON_INTERPRET a launch on CPU tensors dies in Triton ("0 active drivers").
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k, v = _inputs(1, 2, 2, 16, 16, torch.float32)
    with pytest.raises(
        AttnccError, match=r"device = 'cpu' is out of range; allowed: cuda, or cpu with TRITON_INTERPRET=1"
    ):
        attention(q, k, v, causal())


_LATE = """
import os, torch, triton
os.environ["TRITON_INTERPRET"] = "1"
import attncc
from attncc.ir import causal
q = torch.randn(1, 2, 16, 16)
try:
    attncc.attention(q, q, q, causal())
except attncc.AttnccError as e:
    print("AttnccError:", e)
"""


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter is the CPU's")
def test_interpreter_switched_on_after_triton_was_imported_is_named(tmp_path):
    # Note [A late TRITON_INTERPRET]: Triton itself raises "Cannot call @triton.jit'd outside
    # of the scope of a kernel" from deep in the launch.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(  # from tmp_path: the repository root's ./attncc would shadow the install
        [sys.executable, "-c", _LATE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert "AttnccError: TRITON_INTERPRET = '1' was set after triton was imported" in run.stdout, run.stderr


def test_ambiguous_4d_layout_is_refused_until_named():
    # Note [Ambiguous layouts]: NATTEN's [B, L, H, D] = [1, 40, 2, 16] would read as SDPA's
    # 40 heads of 2 tokens; attncc refuses to guess, and layout= (or grid=) says which.
    q, k, v = (t.transpose(1, 2) for t in _inputs(1, 2, 2, 40, 16, torch.float32))  # [1, 40, 2, 16]
    with pytest.raises(AttnccError, match=r"q.shape = \(1, 40, 2, 16\) is ambiguous.*layout='spatial'"):
        attention(q, k, v, neighborhood(7))
    o = attention(q, k, v, neighborhood(7), layout="spatial")
    torch.testing.assert_close(o, attention(q, k, v, neighborhood(7), grid=(40,)), atol=0, rtol=0)
    torch.testing.assert_close(o, reference(q, k, v, neighborhood(7), layout="spatial"), atol=1e-5, rtol=0)
    sdpa = attention(q, k, v, dense(), layout="sdpa")  # 40 heads of 2 tokens, as stated
    assert sdpa.shape == q.shape
    with pytest.raises(AttnccError, match=r"layout = 'bhnd' is out of range; allowed: 'sdpa'"):
        attention(q, k, v, dense(), layout="bhnd")


def test_query_with_no_keys():
    q, k, v = _inputs(1, 2, 2, 9, 16, torch.float32)
    o, lse = attention(q, k, v, strided(2, 1) & sliding_window(1, 0), return_lse=True)
    assert (o[:, :, 0] == 0).all() and (lse[:, :, 0] == -math.inf).all()
    assert torch.isfinite(o).all()


def test_large_scores_do_not_overflow():
    q, k, v = _inputs(1, 2, 2, 40, 16, torch.float32)
    _check(neighborhood(9), Grid((40,)), q * 300, k * 300, v, 1e-4)


def test_nan_in_query_or_key_reaches_only_rows_that_see_it():
    p = sliding_window(2, 2)
    q, k, v = _inputs(1, 1, 1, 40, 16, torch.float32)
    q[0, 0, 5] = math.nan
    k[0, 0, 20] = math.nan
    o = attention(q, k, v, p)
    bad = o.isnan().any(-1)[0, 0]
    assert bad.nonzero().flatten().tolist() == [5, 18, 19, 20, 21, 22]


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_non_finite_value_is_never_hidden(value, score):
    """Note [Non-finite values]: every row that sees v[j] comes out non-finite; other rows of a
    tile that loads v[j] may too (0 * v[j] in the P V product, as in SDPA and FlexAttention,
    which make every row NaN), and every row that comes out finite is right."""
    p, grid = neighborhood(3), Grid((12, 12))  # 144 tokens: several Q and KV tiles
    q, k, v = _inputs(1, 1, 1, grid.size, 16, torch.float32)
    v[0, 0, 16, 3] = value  # token (1, 4)
    o = attention(q, k, v, p, grid=grid, score=score)[0, 0]
    r = reference(q, k, torch.where(torch.isfinite(v), v, 0.0), p, grid=grid, score=score)[0, 0]
    y, x = torch.div(torch.arange(grid.size), 12, rounding_mode="floor"), torch.arange(grid.size) % 12
    first_y, first_x = (y - 1).clamp(0, 9), (x - 1).clamp(0, 9)  # the 3x3 window, clamped
    sees = (first_y <= 1) & (1 <= first_y + 2) & (first_x <= 4) & (4 <= first_x + 2)
    finite = torch.isfinite(o).all(-1)
    assert not finite[sees].any()
    assert finite.any()  # rows whose tiles never load token 16
    torch.testing.assert_close(o[finite], r[finite], atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [0.0, -0.5, math.inf, math.nan], ids=["zero", "negative", "inf", "nan"])
def test_a_scale_that_is_not_positive_is_refused(scale):
    # Note [Scale]: the kernels fold a positive scale into the exponent.
    q, k, v = _inputs(1, 1, 1, 16, 16, torch.float32)
    with pytest.raises(AttnccError, match=r"scale = .*a finite number > 0"):
        attention(q, k, v, causal(), scale=scale)


def test_bad_dtype_is_refused():
    q, k, v = _inputs(1, 1, 1, 16, 16, torch.float32)
    with pytest.raises(AttnccError, match="dtype"):
        attention(q.double(), k.double(), v.double(), causal())


@pytest.mark.parametrize(
    "name,pattern,grid", [CASES[4], CASES[11], CASES[13]], ids=[CASES[i][0] for i in (4, 11, 13)]
)
def test_sigmoid_attention(name, pattern, grid):
    q, k, v = _inputs(1, 2, 1, grid.size, 16, torch.float32)
    out = torch.full_like(q, math.nan)
    o = attention(q, k, v, pattern, grid=grid, score="sigmoid", out=out)
    r = reference(q, k, v, pattern, grid=grid, score="sigmoid")
    torch.testing.assert_close(o, r, atol=1e-5, rtol=0)
    with pytest.raises(AttnccError, match="return_lse"):
        attention(q, k, v, pattern, grid=grid, score="sigmoid", return_lse=True)
