"""The kernels of a pattern per pair of segments (Note [Segment kernels] in
attncc.lower.segments) through ``attncc.attention(q, k, v, by_segments(...))``, against the
float64 oracle (attncc.reference.attention, itself checked against the definitions in
test_segments.py), at odd sizes: segments of one token, a text beside a 7x9 image, a class token
and registers beside an odd 3-D video, pairs whose rules read lookup tables, a segment that sees
nothing; GQA and MQA heads.

Tolerances, relative to the largest magnitude of the oracle's tensor: fp32 1e-4 (a few ulps of
float32 accumulations over at most a few hundred keys), fp16 1e-2 (its 11-bit mantissa: about
5e-4 per rounding of P and dS, summed over the keys), as in test_cross.py. Rows that see no key
must be 0 with a log-sum-exp of -inf, as the oracle's. Outputs start as NaN (ATTNCC_POISON, set
in conftest.py), so a row no program writes fails.
"""

import pytest
import torch
import torch._dynamo.testing
from conftest import DEVICE

import attncc
from attncc.errors import AttnccError
from attncc.ir import (
    analyze_segments,
    block_sparse,
    by_segments,
    causal,
    dense,
    global_tokens,
    key_bias,
    key_range,
    neighborhood,
    segments,
    softcap,
)
from attncc.lower.segments import lower_segments, segment_tables
from attncc.reference import attention as reference
from attncc.runtime import segments as segment_runtime

CASES = {
    # a text of one token beside a 7x9 image: each sees the text, the image its neighbourhood
    "text1-image7x9": by_segments(
        segments(text=1, img=(7, 9)),
        {("text", "*"): dense(), ("img", "img"): neighborhood((3, 5)), ("img", "text"): dense()},
    ),
    # 5 text tokens (causal among themselves) beside a 7x9 image with a dilated neighbourhood,
    # which sees the text's first 3 tokens
    "text5-image7x9": by_segments(
        segments(text=5, img=(7, 9)),
        {
            ("text", "text"): causal(),
            ("text", "img"): dense(),
            ("img", "img"): neighborhood((3, 3), dilation=(2, 1)),
            ("img", "text"): key_range(0, 0, 2),
        },
    ),
    # a class token and 4 registers (they see everything) beside a 3x5x7 video that sees its
    # neighbourhood and the class token, not the registers
    "cls-reg-video3x5x7": by_segments(
        segments(cls=1, reg=4, video=(3, 5, 7)),
        {
            ("cls", "*"): dense(),
            ("reg", "*"): dense(),
            ("video", "video"): neighborhood((3, 3, 5)),
            ("video", "cls"): dense(),
        },
    ),
    # pairs whose rules read lookup tables (global tokens, a block layout)
    "lookups": by_segments(
        segments(a=21, b=(6, 6)),
        {
            ("a", "a"): global_tokens([0, 7]) | causal(),
            ("b", "b"): block_sparse([[1, 0, 1], [0, 1, 0], [1, 1, 1]], 12),
            ("b", "a"): dense(),
        },
    ),
    # the text lists no pair: its rows see nothing
    "sees-nothing": by_segments(segments(text=3, img=(4, 5)), {("img", "*"): dense()}),
}
HEADS = {"text1-image7x9": (4, 2), "cls-reg-video3x5x7": (2, 1)}  # (H, H_KV): GQA, MQA; else (2, 2)
D = 16


def _inputs(pattern, dtype, batch=2, requires_grad=False):
    h, h_kv = HEADS.get(next(k for k, v in CASES.items() if v == pattern), (2, 2))
    n = pattern.space.size
    g = torch.Generator().manual_seed(n)
    q = torch.randn(batch, h, n, D, generator=g)
    k, v = (torch.randn(batch, h_kv, n, D, generator=g) for _ in range(2))
    return tuple(t.to(DEVICE, dtype).requires_grad_(requires_grad) for t in (q, k, v))


def _close(got, want, rel):
    """Within ``rel`` of the largest magnitude of ``want``, -inf where it is."""
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = ~torch.isinf(want)
    scale = want[finite].abs().max().clamp(min=1.0)
    err = (got[finite].double() - want[finite]).abs().max()
    assert err <= rel * scale, f"max error {err:.3g} over {rel * scale:.3g}"


TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_the_float64_oracle(case, dtype):
    pattern = CASES[case]
    q, k, v = _inputs(pattern, dtype)
    out, lse = attncc.attention(q, k, v, pattern, return_lse=True)
    want, want_lse = reference(q.double(), k.double(), v.double(), pattern, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == q.shape[:3]
    _close(out, want, TOLERANCE[dtype])
    _close(lse, want_lse, TOLERANCE[dtype])


def test_rows_that_see_nothing_are_zero_with_lse_minus_inf():
    pattern = CASES["sees-nothing"]
    q, k, v = _inputs(pattern, torch.float32)
    out, lse = attncc.attention(q, k, v, pattern, return_lse=True)
    assert torch.equal(out[:, :, :3], torch.zeros_like(out[:, :, :3]))
    assert torch.isneginf(lse[:, :, :3]).all() and torch.isfinite(lse[:, :, 3:]).all()


@pytest.mark.parametrize("case", ["text1-image7x9", "text5-image7x9", "cls-reg-video3x5x7", "lookups"])
def test_gradients_match_the_float64_oracle(case):
    """dq, dk, dv (the GQA heads of a KV head summed; two batch elements), with a gradient of the
    log-sum-exp too."""
    pattern = CASES[case]
    q, k, v = _inputs(pattern, torch.float32, batch=2, requires_grad=True)
    out, lse = attncc.attention(q, k, v, pattern, return_lse=True)
    g = torch.Generator().manual_seed(7)
    d_out = torch.randn(out.shape, generator=g).to(DEVICE)
    d_lse = torch.randn(lse.shape, generator=g).to(DEVICE)
    got = torch.autograd.grad((out * d_out).sum() + (lse * d_lse).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want_out, want_lse = reference(q64, k64, v64, pattern, return_lse=True)
    loss = (want_out * d_out.double()).sum() + (want_lse * d_lse.double()).sum()
    want = torch.autograd.grad(loss, (q64, k64, v64))
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32, name
        _close(a, b, 1e-4)


def test_fp16_gradients_within_fp16_tolerance():
    pattern = CASES["text5-image7x9"]
    q, k, v = _inputs(pattern, torch.float16, batch=1, requires_grad=True)
    out = attncc.attention(q, k, v, pattern)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.float16)
    got = torch.autograd.grad(out, (q, k, v), d_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(reference(q64, k64, v64, pattern), (q64, k64, v64), d_out.double())
    for a, b in zip(got, want):
        _close(a, b, 1e-2)


def test_one_launch_per_kernel_for_the_whole_space(monkeypatch):
    """One forward launch over every segment and pair (not a kernel per pair and a merge), one
    dQ and one dK/dV launch in the backward."""
    pattern = CASES["cls-reg-video3x5x7"]
    q, k, v = _inputs(pattern, torch.float32, batch=1, requires_grad=True)
    module = segment_runtime.compiled(pattern, D, "float32", q.device.type).module
    calls = []
    for name in ("segments_fwd_kernel", "segments_dq_kernel", "segments_dkdv_kernel"):
        kernel = getattr(module, name)

        class Counted:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                calls.append((self.name, grid))
                return self.kernel[grid]

        monkeypatch.setattr(module, name, Counted(kernel, name))
    out = attncc.attention(q, k, v, pattern)
    out.sum().backward()
    plan = segment_runtime.compiled(pattern, D, "float32", q.device.type).plan
    assert calls == [
        ("segments_fwd_kernel", (plan.q_tiles, 2)),
        ("segments_dq_kernel", (plan.q_tiles, 2)),
        ("segments_dkdv_kernel", (plan.kv_tiles, 1)),
    ]


def test_the_kernels_visit_the_tiles_the_analysis_counts():
    """The tile lists hold exactly the analysis's non-empty tile pairs of the plan's tiles, by Q
    tile and by KV tile; each segment keeps its own boxes (a box in the video, a run in the text)."""
    pattern = CASES["cls-reg-video3x5x7"]
    plan = lower_segments(pattern, 64, "float16", 64, 64)
    cls, reg, video = (s.q_box for s in plan.segments)
    assert cls == reg == (1, 1, 64) and sum(t > 1 for t in video) > 1
    _, fwd_offsets, fwd_entries, bwd_offsets, bwd_entries = segment_tables(pattern, plan)
    tiles = [s.q_box[3 - g.rank :] for s, g in zip(plan.segments, pattern.space.grids)]
    a = analyze_segments(
        pattern, tiles, [s.kv_box[3 - g.rank :] for s, g in zip(plan.segments, pattern.space.grids)]
    )
    visited = a.partial_tiles + a.full_tiles
    assert len(fwd_entries) == len(bwd_entries) == visited
    assert fwd_offsets[-1] == bwd_offsets[-1] == visited


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"score_mod": key_bias(torch.zeros(1, 1, 64))}, r"score = 'key_bias' .*softcap\(c\) or nothing"),
        ({"score_mod": lambda s, b, h, q, k: s}, r"score_mod = 'a function' .*None or score terms"),
        ({"score": "sigmoid"}, r"score = 'sigmoid.*softcap\(c\) or nothing"),
        ({"dropout_p": 0.1}, r"dropout_p = 0\.1"),
        ({"grid": (68,)}, r"grid = \(68,\)"),
        ({"q_offset": 3}, r"q_offset = 3"),
        ({"layout": "spatial"}, r"layout = 'spatial'"),
        ({"scale": -1.0}, r"scale = -1\.0"),
    ],
    ids=["score-terms", "score-function", "sigmoid", "dropout", "grid", "q-offset", "layout", "scale"],
)
def test_what_the_kernels_do_not_take_is_refused_naming_it(kwargs, match):
    pattern = CASES["text1-image7x9"]
    q, k, v = _inputs(pattern, torch.float32)
    with pytest.raises(AttnccError, match=match):
        attncc.attention(q, k, v, pattern, **kwargs)


def test_q_over_part_of_the_space_is_refused():
    pattern = CASES["text1-image7x9"]
    q, k, v = _inputs(pattern, torch.float32)
    with pytest.raises(AttnccError, match=r"q shape = \(2, 4, 60, 16\) .*every token of segments\(text=1"):
        attncc.attention(q[:, :, :60], k, v, pattern)


def test_per_head_pairs_are_refused_by_the_kernels():
    from attncc.ir import per_head

    pattern = by_segments(segments(a=4, b=(2, 3)), {("a", "a"): per_head([dense(), causal()])})
    q = torch.randn(1, 2, pattern.space.size, D, device=DEVICE)
    with pytest.raises(AttnccError, match=r"by_segments pairs = 'per_head' .*one pattern for every head"):
        attncc.attention(q, q, q, pattern)


# --- front doors: attncc.nn.SparseAttention -------------------------------------------------


def test_sparse_attention_over_a_space_of_segments():
    """``[B, N, dim]`` over the whole space, GQA, gradients to x; the same as the projections
    around the oracle."""
    from attncc.nn import SparseAttention

    pattern = CASES["text1-image7x9"]
    torch.manual_seed(0)
    module = SparseAttention(32, 4, pattern, kv_heads=2).to(DEVICE)
    assert module.grid.shape == (pattern.space.size,)
    x = torch.randn(2, pattern.space.size, 32, device=DEVICE, requires_grad=True)
    y = module(x)
    y.sum().backward()
    q = module.q(x).unflatten(-1, (4, 8)).transpose(1, 2)
    k, v = (t.transpose(1, 2) for t in module.kv(x).unflatten(-1, (2, 2, 8)).unbind(-3))
    want = module.proj(reference(q, k, v, pattern).transpose(1, 2).flatten(-2))
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert SparseAttention(32, 4, pattern, pattern.space).grid == module.grid  # the space, or None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"rel_pos_bias": True}, r"rel_pos_bias = True .*False with a pattern per pair of segments"),
        ({"attn_drop": 0.1}, r"attn_drop = 0\.1 .*0\.0 with a pattern per pair of segments"),
        (
            {"grid": segments(text=1, img=(9, 7))},
            r"grid = 'segments\(text=1, img=\(9, 7\)\)' .*the pattern's space",
        ),
    ],
    ids=["rel-pos-bias", "attn-drop", "other-space"],
)
def test_sparse_attention_refuses_what_the_segments_kernels_lack(kwargs, match):
    from attncc.nn import SparseAttention

    with pytest.raises(AttnccError, match=match):
        SparseAttention(32, 4, CASES["text1-image7x9"], **kwargs)


def test_sparse_attention_takes_a_space_only_with_by_segments_and_no_cache():
    from attncc.nn import SparseAttention

    with pytest.raises(AttnccError, match=r"grid = 'segments\(a=4\)' .*by_segments"):
        SparseAttention(32, 4, dense(), segments(a=4))
    module = SparseAttention(32, 4, CASES["text1-image7x9"])
    with pytest.raises(AttnccError, match=r"cache = 'a KVCache' .*take no cache yet"):
        module(torch.randn(1, 64, 32), cache=module.new_cache(1))


def test_the_front_doors_example_runs():
    """docs/front-doors.md's example of token spaces of segments runs as written."""
    import re

    from conftest import REPO

    doc = (REPO / "docs" / "front-doors.md").read_text()
    section = doc[doc.index("### Token spaces of segments") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "docs/front-doors.md (Token spaces of segments)", "exec"), scope)
    assert scope["out"].shape == (2, 4, 77, 16) and scope["q"].grad is not None
    assert scope["y"].shape == (2, 77, 64)


def test_the_shipped_segments_spec_analyses(tmp_path):
    """examples/segment_specs/text_video.yaml through attncc analyze: box tiles in the video beat
    flat runs of as many tokens."""
    from click.testing import CliRunner
    from conftest import REPO

    from attncc.cli import cli

    result = CliRunner().invoke(
        cli, ["analyze", str(REPO / "examples" / "segment_specs" / "text_video.yaml")]
    )
    assert result.exit_code == 0, result.output
    assert "segments(text=226, video=(16, 48, 48)) (37,090 tokens)" in result.output
    assert "8.11x" in result.output and "5.76x" in result.output


def _random_case(seed: int):
    """A space of 2-3 segments of random ranks and odd sizes (single tokens included), and
    random pairs: within a segment a neighbourhood, causal, a band or dense; across two
    segments dense or, on a 1-D key segment, a key range; some pairs left out."""
    import random

    from attncc.ir import sliding_window

    rng = random.Random(seed)
    shapes = {}
    for i in range(rng.randint(2, 3)):
        rank = rng.randint(1, 3)
        shape = tuple(rng.choice([1, 2, 3, 5, 7]) for _ in range(rank))
        shapes[f"s{i}"] = shape[0] if rank == 1 else shape
    space = segments(**shapes)
    pairs = {}
    for q_name in space.names:
        for k_name, grid in zip(space.names, space.grids):
            if rng.random() < 0.25:
                continue
            if q_name == k_name:
                window = tuple(rng.randint(1, n) for n in grid.shape)
                options = [dense(), neighborhood(window)]
                if grid.rank == 1:
                    options += [causal(), sliding_window(rng.randint(0, 3), rng.randint(0, 3))]
            else:
                options = [dense()]
                if grid.rank == 1:
                    options.append(key_range(0, 0, rng.randint(0, grid.size - 1)))
            pairs[(q_name, k_name)] = rng.choice(options)
    if not pairs:
        pairs[(space.names[0], space.names[0])] = dense()
    return by_segments(space, pairs)


@pytest.mark.parametrize("seed", range(6))
def test_random_spaces_match_the_oracle(seed):
    pattern = _random_case(seed)
    n = pattern.space.size
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, n, D, generator=g).to(DEVICE)
    k, v = (torch.randn(1, 1, n, D, generator=g).to(DEVICE) for _ in range(2))
    out, lse = attncc.attention(q, k, v, pattern, return_lse=True)
    want, want_lse = reference(q.double(), k.double(), v.double(), pattern, return_lse=True)
    _close(out, want, 1e-4)
    _close(lse, want_lse, 1e-4)


# --- torch.library ops (Note [Segment ops] in attncc.runtime.segments) ----------------------


def test_opcheck():
    """The ops' schemas, fakes and autograd registrations hold."""
    from attncc.ir import format_pattern

    pattern = CASES["text1-image7x9"]
    q, k, v = (t.requires_grad_() for t in _inputs(pattern, torch.float32, batch=1))
    args = (q, k, v, format_pattern(pattern), 0.25)
    torch.library.opcheck(torch.ops.attncc.segments_fwd_opaque.default, args)
    o, lse = torch.ops.attncc.segments_fwd_opaque(*args)
    bwd_args = (q.detach(), k.detach(), v.detach(), o.detach(), lse.detach(), torch.randn_like(o),
                torch.zeros_like(lse), *args[3:])  # fmt: skip
    torch.library.opcheck(torch.ops.attncc.segments_bwd_opaque.default, bwd_args)


def test_torch_compile_traces_one_graph_forward_and_backward():
    pattern = CASES["text5-image7x9"]
    q, k, v = (t.requires_grad_() for t in _inputs(pattern, torch.float32, batch=1))

    def loss(q, k, v):
        out, lse = attncc.attention(q, k, v, pattern, return_lse=True)
        return out.square().sum() + lse.sum()

    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(loss, backend=counter, fullgraph=True)
    got = compiled(q, k, v)
    got_grads = torch.autograd.grad(got, (q, k, v))
    want = loss(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v))
    assert counter.frame_count == 1
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_softcap_forward_and_gradients(dtype):
    """Gemma-2's cap of the scaled scores, c * tanh(s / c), with a small cap so it bites, forward
    and backward (through 1 - tanh^2), against the oracle; given as score_mod or as score."""
    pattern = CASES["cls-reg-video3x5x7"]
    q, k, v = (t.requires_grad_() for t in _inputs(pattern, dtype, batch=1))
    q.data.mul_(4)  # scores of several units: the cap of 2 changes them
    out, lse = attncc.attention(q, k, v, pattern, return_lse=True, score_mod=softcap(2.0))
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    got = torch.autograd.grad(out, (q, k, v), d_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want, want_lse = reference(q64, k64, v64, pattern, return_lse=True, score_mod=softcap(2.0))
    plain = reference(q64, k64, v64, pattern)
    assert (want - plain).abs().max() > 0.1  # the cap is not a no-op here
    _close(out, want, TOLERANCE[dtype])
    _close(lse, want_lse, TOLERANCE[dtype])
    for a, b in zip(got, torch.autograd.grad(want, (q64, k64, v64), d_out.double())):
        _close(a, b, TOLERANCE[dtype])
    as_score = attncc.attention(q, k, v, pattern, score="softcap(2.0)")
    torch.testing.assert_close(as_score, out)
