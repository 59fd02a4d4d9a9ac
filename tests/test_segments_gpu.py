"""The segments kernels (Note [Segment kernels] in attncc.lower.segments) on a GPU at realistic
shapes (run: pytest -m gpu), bf16 included (the interpreter's bf16 dot is wrong: the CPU tests
take fp32 and fp16).

Tolerances, relative to the largest magnitude of the float64 oracle's tensor: fp32 1e-4, fp16
1e-2, bf16 3e-2 (8-bit mantissas: about 4e-3 per rounding of P and dS, summed over the keys;
the bench's bf16 tolerance), for the output and every gradient.
"""

import pytest
import torch

import attncc
from attncc.ir import by_segments, causal, dense, key_range, neighborhood, segments
from attncc.reference import attention as reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
CASES = {
    # 77 text tokens beside an 8x24x24 video (4,685 tokens): text dense both ways
    "text77+video8x24x24": by_segments(
        segments(text=77, video=(8, 24, 24)),
        {("text", "*"): dense(), ("video", "video"): neighborhood((3, 7, 7)), ("video", "text"): dense()},
    ),
    # a class token and 4 registers beside a 61x67 image (odd sizes); the image sees the class token
    "cls+4reg+image61x67": by_segments(
        segments(cls=1, reg=4, img=(61, 67)),
        {
            ("cls", "*"): dense(),
            ("reg", "*"): dense(),
            ("img", "img"): neighborhood(13),
            ("img", "cls"): dense(),
        },
    ),
    # a causal prompt beside a dilated image that reads the prompt's first 100 tokens
    "prompt300+image48x48": by_segments(
        segments(prompt=300, img=(48, 48)),
        {
            ("prompt", "prompt"): causal(),
            ("img", "img"): neighborhood(7, dilation=2),
            ("img", "prompt"): key_range(0, 0, 99),
        },
    ),
}


def _close(got, want, rel):
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = ~torch.isinf(want)
    scale = want[finite].abs().max().clamp(min=1.0)
    err = (got[finite].double() - want[finite]).abs().max()
    assert err <= rel * scale, f"max error {err:.3g} over {rel * scale:.3g}"


@pytest.mark.parametrize(
    "dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"]
)
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_backward_on_the_gpu(case, dtype):
    check(case, dtype)


def check(case: str, dtype: torch.dtype) -> None:
    """Forward (out, lse) and dq, dk, dv of ``CASES[case]`` against the float64 oracle (also the
    segments family of tests/test_smoke_gpu.py)."""
    pattern = CASES[case]
    n = pattern.space.size
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 8, n, 64, generator=g, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (
        torch.randn(1, 2, n, 64, generator=g, device="cuda", dtype=dtype, requires_grad=True) for _ in "kv"
    )
    out, lse = attncc.attention(q, k, v, pattern, return_lse=True)
    d_out = torch.randn(out.shape, generator=g, device="cuda", dtype=dtype)
    got = torch.autograd.grad(out, (q, k, v), d_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want, want_lse = reference(q64, k64, v64, pattern, return_lse=True)
    _close(out, want, TOL[dtype])
    _close(lse, want_lse, TOL[dtype])
    for a, b in zip(got, torch.autograd.grad(want, (q64, k64, v64), d_out.double())):
        _close(a, b, TOL[dtype])
