"""Every kernel family on a GPU, forward and backward, each dtype: the correctness half of
``bash benchmarks/gpu_check.sh smoke`` (run: pytest -m gpu tests/test_smoke_gpu.py).

One case per way a plan walks its tiles (Note [Loops] in attncc.lower.plan): a
single-term range plan with full and partial tiles (2-D neighborhood, dilated, causal),
a two-term range plan (axial), a congruence term (a strided band), a table plan (a band
with global tokens); shapes that are not multiples of a tile, GQA 4:2; and the segments kernels
(Note [Segment kernels] in attncc.lower.segments: a text beside a video, bf16). Tolerances are those of
tests/test_triton_fwd_gpu.py, tests/test_triton_bwd_gpu.py and tests/test_segments_gpu.py.
"""

import pytest
import torch
from test_segments_gpu import check as check_segments
from test_triton_bwd_gpu import _check as check_backward
from test_triton_fwd_gpu import TOL, _inputs

from attncc.ir import Grid, axial, causal, global_tokens, neighborhood, sliding_window, strided
from attncc.reference import attention as reference
from attncc.runtime.library import attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FAMILIES = [
    ("na2d-w13-61x67", neighborhood(13), Grid((61, 67))),
    ("na2d-w7-d3-45x50", neighborhood(7, dilation=3), Grid((45, 50))),
    ("causal-2049", causal(), Grid((2049,))),
    ("axial-40x56", axial(), Grid((40, 56))),
    ("strided-band-2000", sliding_window(127, 0) | (strided(128) & causal()), Grid((2000,))),
    ("global-band-2000", sliding_window(255, 0) | global_tokens([0, 1, 2]), Grid((2000,))),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("name,pattern,grid", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_forward_and_backward(name, pattern, grid, dtype):
    d = 64 if dtype == torch.float32 else 128
    q, k, v = _inputs(1, 4, 2, grid.size, d, dtype)
    out = torch.full_like(q, float("nan"))
    o, lse = attention(q, k, v, pattern, grid=grid, return_lse=True, out=out)
    r, r_lse = reference(q, k, v, pattern, grid=grid, return_lse=True)
    assert not o.isnan().any()
    torch.testing.assert_close(o.float(), r.float(), atol=TOL[dtype], rtol=0)
    finite = torch.isfinite(r_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], r_lse[finite], atol=TOL[dtype], rtol=1e-5)
    check_backward(pattern, grid, 1, 4, 2, d, dtype)


def test_segments_family_forward_and_backward():
    """bf16 only: the smoke call's budget (tests/test_segments_gpu.py takes every dtype)."""
    check_segments("text77+video8x24x24", torch.bfloat16)
