"""The CUTLASS forward kernels on an H100 (run: pytest -m gpu; skipped off sm_90 or without nvcc/cutlass).

Every case runs through ``attncc.attention`` with ``ATTNCC_BACKEND=cutlass``,
so a plan the templates refuse fails here instead of falling back. Outputs
are poisoned (NaN) before the call. Tolerances against the fp32 reference,
as for the Triton kernels: fp16 rounds P and O to 11 bits (2e-3), bf16 to 8
bits (1.5e-2). The backward of a CUTLASS forward is Triton's: its gradients
are checked too, since it reads the CUTLASS output and log-sum-exp.
"""

import pytest
import torch

from attncc.autotune.tuner import tune
from attncc.ir import (
    Grid,
    band,
    block_sparse,
    canonicalize,
    causal,
    dense,
    global_tokens,
    neighborhood,
    sliding_window,
)
from attncc.lower.cutlass import cutlass_plan
from attncc.lower.lowering import lower
from attncc.reference import attention as reference
from attncc.runtime import cutlass_kernel
from attncc.runtime.library import attention, forget_kernels
from attncc.runtime.ops import cutlass_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or cutlass_kernel.unavailable("cuda") is not None,
        reason="needs an sm_90 GPU, nvcc and nvidia-cutlass",
    ),
]

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
_LAYOUT = [[int(i == j or (i + 2 * j) % 3 == 0) for j in range(8)] for i in range(8)]
CASES = [
    ("dense-4096", dense(), Grid((4096,))),
    ("causal-4099", causal(), Grid((4099,))),
    ("band-1023-8191", sliding_window(1023, 0), Grid((8191,))),
    ("na2d-w13-64x64", neighborhood(13), Grid((64, 64))),
    ("na2d-w7-d4-61x67", neighborhood(7, dilation=4), Grid((61, 67))),
    ("na3d-3x7x7-8x24x24", neighborhood((3, 7, 7)), Grid((8, 24, 24))),
    ("na3d-causal-t-8x24x24", neighborhood((3, 7, 7), causal=(True, False, False)), Grid((8, 24, 24))),
    # Table plans (tiles and rule baked into the source)
    ("band-global-4097", sliding_window(511) | global_tokens([0, 1, 2, 3, 2048]), Grid((4097,))),
    ("block-sparse-4000", block_sparse(_LAYOUT, 500), Grid((4000,))),
    ("na2d-global-61x67", neighborhood(13) | global_tokens([0, 2000]), Grid((61, 67))),
]


@pytest.fixture(scope="module", autouse=True)
def _prebuilt():
    """Every case's kernels, built in parallel first (one nvcc run takes a core for a minute)."""
    plans = []
    for _, p, g in CASES:
        pattern = canonicalize(p, g)
        for dtype in ("float16", "bfloat16"):
            for d in (64, 128):
                plan = lower(pattern, g, d, dtype, config=cutlass_config(d))
                plans.append(cutlass_plan(plan, pattern, g))
    cutlass_kernel.prebuild(plans)


@pytest.fixture(autouse=True)
def _cutlass(monkeypatch):
    monkeypatch.setenv("ATTNCC_BACKEND", "cutlass")
    forget_kernels()
    yield
    forget_kernels()


def _inputs(b, h, h_kv, n, d, dtype, grad=False):
    shapes = ((b, h, n, d), (b, h_kv, n, d), (b, h_kv, n, d))
    return [torch.randn(s, device="cuda", dtype=dtype, requires_grad=grad) for s in shapes]


@pytest.mark.parametrize("d", [64, 128], ids=["D64", "D128"])
@pytest.mark.parametrize("dtype", list(TOL), ids=["fp16", "bf16"])
@pytest.mark.parametrize("name,pattern,grid", CASES, ids=[c[0] for c in CASES])
def test_cutlass_forward_matches_reference(name, pattern, grid, dtype, d):
    q, k, v = _inputs(2, 4, 2, grid.size, d, dtype)  # GQA: two query heads per KV head
    out = torch.full_like(q, float("nan"))
    o, lse = attention(q, k, v, pattern, grid=grid, return_lse=True, out=out, scale=0.1)
    r, r_lse = reference(q, k, v, pattern, grid=grid, return_lse=True, scale=0.1)
    assert not o.isnan().any()
    torch.testing.assert_close(o.float(), r.float(), atol=TOL[dtype], rtol=0)
    finite = torch.isfinite(r_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    torch.testing.assert_close(lse[finite], r_lse[finite], atol=TOL[dtype], rtol=1e-5)


def test_cutlass_forward_feeds_the_triton_backward():
    grid = Grid((40, 52))
    pattern = neighborhood(9, dilation=2)
    q, k, v = _inputs(1, 4, 4, grid.size, 128, torch.float16, grad=True)
    do = torch.randn_like(q)
    attention(q, k, v, pattern, grid=grid).backward(do)
    got = [t.grad.float() for t in (q, k, v)]
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    reference(qr, kr, vr, pattern, grid=grid).backward(do.float())
    for g, want in zip(got, (qr.grad, kr.grad, vr.grad)):
        torch.testing.assert_close(g, want, atol=2e-2, rtol=0)


def test_rows_with_no_key_give_zero_and_minus_inf():
    grid = Grid((1000,))
    pattern = band(0, 3, 70)  # keys 3 to 70 ahead: the last three rows keep none
    q, k, v = _inputs(1, 2, 2, grid.size, 64, torch.bfloat16)
    o, lse = attention(q, k, v, pattern, grid=grid, return_lse=True)
    r, r_lse = reference(q, k, v, pattern, grid=grid, return_lse=True)
    torch.testing.assert_close(o.float(), r.float(), atol=1.5e-2, rtol=0)
    torch.testing.assert_close(lse[:, :, :-3], r_lse[:, :, :-3], atol=1.5e-2, rtol=1e-5)
    assert torch.equal(o[:, :, -3:], torch.zeros_like(o[:, :, -3:]))
    assert (lse[:, :, -3:] == float("-inf")).all() and torch.isfinite(lse[:, :, :-3]).all()


def test_autotuner_times_both_backends(monkeypatch):
    monkeypatch.setenv("ATTNCC_BACKEND", "auto")
    result = tune(neighborhood(13), Grid((64, 64)), 1, 8, 128, "bfloat16", top=4, save=False, progress=False)
    timed = [t for t in result.trials if t.timing is not None or t.error]
    backends = {t.ranked.config.backend for t in timed}
    assert backends == {"triton", "cutlass"}, backends
    assert not [t.error for t in timed if t.ranked.config.backend == "cutlass" and t.error]
