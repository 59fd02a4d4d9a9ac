"""The Triton forward kernel on a GPU at realistic shapes (run: pytest -m gpu).

Tolerances against the fp32 reference: fp32 dots run in IEEE fp32 (1e-4 at
thousands of keys); fp16 rounds P and O to 11 bits (2e-3); bf16 to 8 bits,
so a convex combination of O(1) values is within ~2^-8 relative: 1.5e-2.
"""

import pytest
import torch

from attncc.ir import Grid, block_sparse, causal, dense, global_tokens, neighborhood, sliding_window
from attncc.reference import attention as reference
from attncc.runtime.library import attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
CASES = [
    ("dense-4096", dense(), Grid((4096,))),
    ("causal-4099", causal(), Grid((4099,))),
    ("band-1023-8191", sliding_window(1023, 0), Grid((8191,))),
    ("na2d-w13-64x64", neighborhood(13), Grid((64, 64))),
    ("na2d-w7-d4-61x67", neighborhood(7, dilation=4), Grid((61, 67))),
    ("gna2d-w16-s8-64x64", neighborhood(16, stride=8), Grid((64, 64))),
    ("na3d-7x15x15-8x24x24", neighborhood((3, 7, 7)), Grid((8, 24, 24))),
    ("na3d-causal-t-8x24x24", neighborhood((3, 7, 7), causal=(True, False, False)), Grid((8, 24, 24))),
    ("global-band-4096", sliding_window(255, 0) | global_tokens([0, 1, 2, 3]), Grid((4096,))),
    (
        "block-sparse-4096",
        block_sparse([[int((i + j) % 3 == 0) for j in range(32)] for i in range(32)], 128),
        Grid((4096,)),
    ),
]


def _inputs(b, h, h_kv, n, d, dtype):
    shapes = ((b, h, n, d), (b, h_kv, n, d), (b, h_kv, n, d))
    return [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]


@pytest.mark.parametrize("dtype", list(TOL), ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("name,pattern,grid", CASES, ids=[c[0] for c in CASES])
def test_forward_matches_reference_on_gpu(name, pattern, grid, dtype):
    q, k, v = _inputs(1, 4, 2, grid.size, 128, dtype)
    out = torch.full_like(q, float("nan"))
    o, lse = attention(q, k, v, pattern, grid=grid, return_lse=True, out=out)
    r, r_lse = reference(q, k, v, pattern, grid=grid, return_lse=True)
    assert not o.isnan().any()
    torch.testing.assert_close(o.float(), r.float(), atol=TOL[dtype], rtol=0)
    finite = torch.isfinite(r_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], r_lse[finite], atol=TOL[dtype], rtol=1e-5)


@pytest.mark.parametrize("d", [32, 64, 96, 256], ids=["D32", "D64", "D96-padded", "D256"])
def test_head_dims_on_gpu(d):
    q, k, v = _inputs(2, 8, 1, 2048, d, torch.bfloat16)
    pattern = neighborhood(9)
    o = attention(q, k, v, pattern, grid=Grid((32, 64)))
    r = reference(q, k, v, pattern, grid=Grid((32, 64)))
    torch.testing.assert_close(o.float(), r.float(), atol=TOL[torch.bfloat16], rtol=0)


def test_offsets_past_2_pow_31_elements():
    # 16 heads x 1,048,640 tokens x 128 > 2^31 elements per tensor.
    n, h, d = 1_048_640, 16, 128
    q, k, v = _inputs(1, h, h, n, d, torch.bfloat16)
    o = attention(q, k, v, sliding_window(63, 0))
    tail = slice(n - 512, n)  # a band is translation invariant away from the start
    r = reference(q[:, :, tail], k[:, :, tail], v[:, :, tail], sliding_window(63, 0))
    torch.testing.assert_close(
        o[:, :, n - 256 :].float(), r[:, :, 256:].float(), atol=TOL[torch.bfloat16], rtol=0
    )
