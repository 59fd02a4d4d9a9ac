"""Score functions traced and matched into score terms (issue 17 part 3): what each construct
becomes, the same tensor objects (or views autograd reaches them through), and the refusals.

No kernel runs here (the matcher's result is compared with the terms written by hand);
tests/test_score_gym.py runs attention-gym's score_mods through the kernels, and the
torch.compile tests at the end run one kernel each.
"""

import functools

import pytest
import torch
import torch._dynamo.testing
from conftest import DEVICE

import attncc
import attncc.flex
from attncc import AttnccError, TraceError
from attncc.ir import (
    Grid,
    Score,
    alibi,
    bias,
    causal,
    format_pattern,
    key_bias,
    neighborhood,
    query_bias,
    rel_pos_bias,
    softcap,
    temperature,
)
from attncc.score_fn import ScoreFunction, score_terms

H, N = 4, 24
GEN = torch.Generator().manual_seed(0)
TABLE = torch.randn(H, 13, generator=GEN)  # a relative position table for neighborhood(7)
SHARED = torch.randn(13, generator=GEN)  # one table for every head
SLOPES = torch.rand(H, generator=GEN)
TEMP = torch.rand(H, generator=GEN) + 0.5
KB = torch.randn(1, H, N, generator=GEN)
K1 = torch.randn(N, generator=GEN)
HB = torch.randn(H, generator=GEN)
FULL = torch.randn(2, H, N, N, generator=GEN)
ABSOLUTE = torch.randn(N, N, generator=GEN)
DILATED = torch.randn(H, 9, generator=GEN)  # neighborhood(5, dilation=2): offsets -4..4 in units of 2
T2 = torch.randn(H, 5, 7, generator=GEN)  # a 2-D table for neighborhood((3, 4)) on a 6 x 9 grid
T2_PERMUTED = torch.randn(7, H, 5, generator=GEN)
ROW = torch.randn(H, 7, generator=GEN)  # offsets along the width only
S2 = torch.rand(H, 2, generator=GEN)
SCALAR = torch.tensor(1.5)
LOCAL = torch.randn(2 * 3 + 1, generator=GEN)  # attention-gym's local window bias, W = 3
W = 3


def terms(fn, pattern=None, grid=(N,), form="coords", names=None):
    pattern = neighborhood(7) if pattern is None else pattern
    return score_terms(
        ScoreFunction(fn, form, names), format_pattern(pattern), Grid(grid), H, torch.device("cpu")
    )


def assert_same(got: Score, want: Score, same_objects=()):
    """The same terms with equal tensors; ``same_objects`` names terms whose tensor must be the
    captured one itself."""
    assert got.form == want.form, (got, want)
    for name in want.inputs:
        a, b = got.value(name), want.value(name)
        if isinstance(b, tuple):
            assert a == pytest.approx(b, rel=1e-6), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=name)
    for name in same_objects:
        assert got.value(name) is want.value(name), name


# --- what each construct becomes ----------------------------------------------------------------

MATCHES = [
    ("rpb", lambda score, b, h, q, k: score + TABLE[h, k.index - q.index + 6], rel_pos_bias(TABLE), ["rel_pos_bias"]),
    ("rpb-query-minus-key", lambda score, b, h, q, k: score + TABLE[h, q.n - k.n + 6], rel_pos_bias(TABLE.flip(1)), []),
    ("rpb-shared", lambda score, b, h, q, k: score + SHARED[k.index - q.index + 6], rel_pos_bias(SHARED[None]), []),
    ("rpb-scaled", lambda score, b, h, q, k: score + 0.5 * TABLE[h][k.index - q.index + 6], rel_pos_bias(0.5 * TABLE), []),
    ("alibi-flat", lambda score, b, h, q, k: score - SLOPES[h] * abs(q.index - k.index), alibi(SLOPES), ["alibi"]),
    ("alibi-flat-int-first", lambda score, b, h, q, k: score - abs(k.index - q.index) * SLOPES[h], alibi(SLOPES), ["alibi"]),
    ("alibi-signed", lambda score, b, h, q, k: score + SLOPES[h] * (k.index - q.index), alibi(SLOPES, distance="signed"), ["alibi"]),
    ("alibi-signed-split", lambda score, b, h, q, k: score + SLOPES[h] * k.index - q.index * SLOPES[h], alibi(SLOPES, distance="signed"), []),
    ("alibi-query-minus-key", lambda score, b, h, q, k: score + SLOPES[h] * (q.index - k.index), alibi(-SLOPES, distance="signed"), []),
    ("alibi-constant-slope", lambda score, b, h, q, k: score - abs(q.index - k.index) / 8, alibi((0.125,) * H), []),
    ("alibi-slopes-of-h", lambda score, b, h, q, k: score - 2.0 ** (-(h + 1)) * abs(q.index - k.index), alibi(tuple(2.0 ** -(i + 1) for i in range(H))), []),
    ("softcap", lambda score, b, h, q, k: 30 * torch.tanh(score / 30), softcap(30.0), []),
    ("softcap-of-49", lambda score, b, h, q, k: 49 * torch.tanh(score / 49), softcap(49.0), []),  # (1 / 49) * 49 < 1
    ("softcap-method", lambda score, b, h, q, k: (score / 20).tanh() * 20, softcap(20.0), []),
    ("softcap-tempered", lambda score, b, h, q, k: 20 * torch.tanh(score * TEMP[h] / 20), softcap(20.0) + temperature(TEMP), ["temperature"]),
    ("temperature", lambda score, b, h, q, k: TEMP[h] * score, temperature(TEMP), ["temperature"]),
    ("temperature-numbers", lambda score, b, h, q, k: score * 2, temperature(torch.full((H,), 2.0)), []),
    ("temperature-0d", lambda score, b, h, q, k: score * SCALAR, temperature(SCALAR.reshape(1).expand(H)), []),
    ("key-bias", lambda score, b, h, q, k: score + KB[b, h, k.index], key_bias(KB), ["key_bias"]),
    ("key-bias-1d", lambda score, b, h, q, k: score + K1[k.index], key_bias(K1.reshape(1, 1, N)), []),
    ("query-bias", lambda score, b, h, q, k: score + KB[0, h, q.index], query_bias(KB[0][None]), []),
    ("head-bias", lambda score, b, h, q, k: score + HB[h], query_bias(HB.reshape(1, H, 1).expand(1, H, N)), []),
    ("bias", lambda score, b, h, q, k: score + FULL[b, h, q.index, k.index], bias(FULL), ["bias"]),
    ("bias-2d", lambda score, b, h, q, k: score + ABSOLUTE[q.index, k.index], bias(ABSOLUTE.reshape(1, 1, N, N)), []),
    ("bias-transposed", lambda score, b, h, q, k: score + FULL[b, h, k.index, q.index], bias(FULL.transpose(2, 3)), []),
    (
        "composed-in-any-order",
        lambda score, b, h, q, k: K1[k.index] - SLOPES[h] * abs(q.index - k.index) + TABLE[h, k.index - q.index + 6] + 30 * torch.tanh(TEMP[h] * score / 30),
        softcap(30.0) + temperature(TEMP) + alibi(SLOPES) + rel_pos_bias(TABLE) + key_bias(K1.reshape(1, 1, N)),
        ["temperature", "alibi", "rel_pos_bias"],
    ),
]  # fmt: skip


@pytest.mark.parametrize("fn,want,same", [m[1:] for m in MATCHES], ids=[m[0] for m in MATCHES])
def test_constructs_match_their_terms(fn, want, same):
    assert_same(terms(fn), want, same)


def test_dilated_table_counts_offsets_in_units_of_the_dilation():
    def dilated(score, b, h, q, k):
        return score + DILATED[h, (k.index - q.index) // 2 + 4]

    def undilated(score, b, h, q, k):
        return score + DILATED[h, k.index - q.index + 4]

    pattern = neighborhood(5, dilation=2)
    assert_same(terms(dilated, pattern), rel_pos_bias(DILATED), ["rel_pos_bias"])
    with pytest.raises(TraceError, match=r"units of 1, the pattern's in units of 2 .*\(k.x - q.x\) // 2"):
        terms(undilated, pattern)


GRID_MATCHES = [  # neighborhood((3, 4)) on a 6 x 9 grid
    ("table", lambda score, b, h, q, k: score + T2[h, k.h - q.h + 2, k.w - q.w + 3], rel_pos_bias(T2), ["rel_pos_bias"]),
    ("table-permuted", lambda score, b, h, q, k: score + T2_PERMUTED[k.w - q.w + 3, h, k.h - q.h + 2], rel_pos_bias(T2_PERMUTED.permute(1, 2, 0)), []),
    ("table-of-one-axis", lambda score, b, h, q, k: score + ROW[h, k.w - q.w + 3], rel_pos_bias(ROW[:, None]), []),
    ("slopes-per-axis", lambda score, b, h, q, k: score - S2[h, 0] * abs(q.h - k.h) - S2[h, 1] * abs(q.w - k.w), alibi(S2, distance="axes"), []),
    ("one-slope", lambda score, b, h, q, k: score - SLOPES[h] * (abs(q.h - k.h) + abs(q.w - k.w)), alibi(SLOPES, distance="axes"), ["alibi"]),
    ("axis-by-number", lambda score, b, h, q, k: score - SLOPES[h] * abs(q[0] - k[0]), alibi(torch.stack([SLOPES, torch.zeros(H)], 1), distance="axes"), []),
]  # fmt: skip


@pytest.mark.parametrize("fn,want,same", [m[1:] for m in GRID_MATCHES], ids=[m[0] for m in GRID_MATCHES])
def test_grid_axes_tables_and_slopes(fn, want, same):
    assert_same(terms(fn, neighborhood((3, 4)), (6, 9)), want, same)


def test_axes_take_the_names_given():
    def named(score, b, h, q, k):
        return score + T2[h, k.y - q.y + 2, k.x - q.x + 3]

    assert_same(terms(named, neighborhood((3, 4)), (6, 9), names=("y", "x")), rel_pos_bias(T2))


def test_flex_form_and_attention_gym_spellings():
    def generated_alibi(score, b, h, q_idx, kv_idx):  # attention-gym's slopes, computed from h
        scale = torch.exp2(-((h + 1) * 8.0 / H))
        return score + (kv_idx - q_idx) * scale

    slopes = tuple(2 ** (-(i + 1) * 8.0 / H) for i in range(H))
    assert_same(terms(generated_alibi, causal(), form="flex"), alibi(slopes, distance="signed"))

    def local(score, b, h, q_idx, kv_idx):  # attention-gym's learned local window bias
        return score + LOCAL[torch.clamp(q_idx - kv_idx + W, 0, 2 * W)]

    assert_same(terms(local, neighborhood(7), form="flex"), rel_pos_bias(LOCAL.flip(0)[None]))


class Biased(torch.nn.Module):
    """Attention with a learned relative position table, read by a method."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(TABLE.clone())

    def score_mod(self, score, b, h, q, k):
        return score + self.table[h, k.index - q.index + 6]

    def forward(self, x):
        return attncc.attention(x, x, x, neighborhood(7), score_mod=self.score_mod)


def test_tensors_found_through_self_and_closures():
    module = Biased()
    assert terms(module.score_mod).value("rel_pos_bias") is module.table

    def make(t):
        return lambda score, b, h, q, k: score + t[h, k.index - q.index + 6]

    first, second = TABLE.clone(), TABLE.clone()
    assert terms(make(first)).value("rel_pos_bias") is first
    assert terms(make(second)).value("rel_pos_bias") is second  # the memo keeps paths, not tensors


CAP = 30.0  # a captured number: the cap of capped() below


def capped(score, b, h, q, k):
    return CAP * torch.tanh(score / CAP)


def test_a_changed_captured_number_traces_again():
    global CAP
    for cap in (30.0, 20.0):
        CAP = cap
        assert terms(capped).softcap == cap


# --- what has no term -------------------------------------------------------------------------

REFUSALS = [
    ("bias-inside-the-cap", lambda score, b, h, q, k: 30 * torch.tanh((score + K1[k.index]) / 30), r"torch.tanh\(\(score \+ K1\[k.index\]\) / 30\): K1\[k.index\] / 30 is inside the cap; terms are added after"),
    ("temperature-after-the-cap", lambda score, b, h, q, k: TEMP[h] * (30 * torch.tanh(score / 30)), r"TEMP\[h\] \* \(30 \* torch.tanh\(score / 30\)\): TEMP\[h\] multiplies the cap; a temperature applies before"),
    ("bias-tempered", lambda score, b, h, q, k: (score + K1[k.index]) * TEMP[h], r"K1\[k.index\] \* TEMP\[h\]: a term times a factor per head .* multiplies the score alone"),
    ("checkerboard", lambda score, b, h, q, k: torch.where((q.index + k.index) % 2 == 0, score * 0.5, score), r"torch.where\(\(q.index \+ k.index\) % 2 == 0, score \* 0.5, score\): not in the score grammar"),
    ("sign-flip", lambda score, b, h, q, k: torch.where(score > 0, score, -score), r"score > 0: a score is not compared, branched on"),
    ("abs-of-score", lambda score, b, h, q, k: abs(score), r"abs\(score\): abs applies to numbers and expressions of h only"),
    ("centre", lambda score, b, h, q, k: score + TABLE[h, k.index - q.index + 5], r"TABLE\[h, k.index - q.index \+ 5\]: the offset centre 5 and the size 13 .*\+ 6"),
    ("query-times-score", lambda score, b, h, q, k: score * K1[q.index], r"score \* K1\[q.index\]: K1\[q.index\] is not a factor per head"),
    ("symmetric-table", lambda score, b, h, q, k: score + SHARED[abs(q.index - k.index)], r"SHARED\[abs\(q.index - k.index\)\]: the index .* is not q.index, k.index or a relative offset"),
    ("integer-lookup", lambda score, b, h, q, k: score + K1[torch.arange(N)[q.index]], r"tensor\[q.index\]: .* int64>; a score reads float tensors \(an integer lookup has no score term\)"),
    ("a-number", lambda score, b, h, q, k: score + 1.0, r"1.0: adds a number, which has no term"),
    ("divided-by-a-tensor", lambda score, b, h, q, k: score / TEMP[h], r"score / TEMP\[h\]: a score divides by numbers or expressions of h only"),
    ("score-twice", lambda score, b, h, q, k: score + 30 * torch.tanh(score / 30), r"score \+ 30 \* torch.tanh\(score / 30\): the score enters twice"),
    ("no-score", lambda score, b, h, q, k: K1[k.index], r"K1\[k.index\]: the result does not use score"),
    ("batch-as-a-number", lambda score, b, h, q, k: score + b, r"b: b enters a score only as an index"),
    ("clipped-distance", lambda score, b, h, q, k: score - SLOPES[h] * torch.clamp(abs(q.index - k.index), max=8), r"-\(SLOPES\[h\] \* min\(abs\(q.index - k.index\), 8\)\): min\(.*\) is not a distance alibi takes"),
    ("two-key-biases", lambda score, b, h, q, k: score + K1[k.index] + KB[b, h, k.index], r".*: it adds two key_bias terms"),
    ("made-inside", lambda score, b, h, q, k: score + torch.ones(N)[k.index], r"tensor: a tensor the score function neither captured nor found"),
    ("half-indexed", lambda score, b, h, q, k: score + TABLE[h], r"TABLE\[h\]: TABLE has 2 dimensions, indexed 1 times"),
]  # fmt: skip


@pytest.mark.parametrize("fn,message", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refusals_quote_the_sub_expression(fn, message):
    with pytest.raises(TraceError, match=r"score_mod <lambda> on grid 24: " + message):
        terms(fn)


def test_a_flat_offset_on_a_grid_is_refused():
    def flat(score, b, h, q, k):
        return score + TABLE[h, k.index - q.index + 6]

    with pytest.raises(TraceError, match=r"an offset of flat indices on a 2-D grid; .* per grid axis"):
        terms(flat, neighborhood(3), (6, 4))


def test_bad_score_functions():
    with pytest.raises(TraceError, match=r"must take five arguments \(score, b, h, q, k\)"):
        terms(lambda score, b, h, q: score)
    with pytest.raises(TraceError, match="is not a Python function"):
        terms(functools.partial(lambda x, score, b, h, q, k: score, 1))
    q = torch.randn(1, H, N, 16, device=DEVICE)
    with pytest.raises(AttnccError, match=r"score_mod = 3 is not score terms .* or a function"):
        attncc.attention(q, q, q, causal(), score_mod=3)
    with pytest.raises(TraceError, match=r"attncc.flex score_mod .* on 24 tokens: .*inside the cap"):
        attncc.flex.flex_attention(q, q, q, score_mod=lambda s, b, h, qi, ki: 30 * torch.tanh((s + qi) / 30))


# --- torch.compile ---------------------------------------------------------------------------


def test_compiled_calls_reuse_the_graph_when_captured_values_change():
    """Note [Score functions under torch.compile]: the trace runs once, outside the graph; the
    graph fetches the captured tensors (learned: gradients reach them), so new values never
    recompile, and a captured number that changes retraces."""
    global CAP
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    table = torch.randn(H, 13, device=DEVICE, requires_grad=True)
    slopes = torch.rand(H, device=DEVICE)

    def score_mod(score, b, h, q, k):
        return (
            CAP * torch.tanh(score / CAP)
            + table[h, k.index - q.index + 6]
            - slopes[h] * abs(q.index - k.index)
        )

    @torch.compile(fullgraph=True, backend=counter)
    def step(q, fn):
        return attncc.attention(q, q, q, neighborhood(7), score_mod=fn).sum()

    def eager(q):
        terms_ = softcap(CAP) + rel_pos_bias(table) + alibi(slopes)
        return attncc.attention(q, q, q, neighborhood(7), score_mod=terms_).sum()

    CAP = 5.0
    q = torch.randn(1, H, N, 16, device=DEVICE)
    for _ in range(2):
        step(q, score_mod).backward()
        with torch.no_grad():
            table -= 0.1 * table.grad
            slopes.add_(0.1)
        table.grad = None
    assert counter.frame_count == 1
    torch.testing.assert_close(step(q, score_mod), eager(q), atol=1e-4, rtol=1e-5)
    CAP = 3.0
    torch.testing.assert_close(step(q, score_mod), eager(q), atol=1e-4, rtol=1e-5)
    assert counter.frame_count == 2


def test_compiled_flex_score_mod_and_a_function_made_in_the_graph():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    bias_ = torch.randn(N, device=DEVICE)

    def key_bias_mod(score, b, h, q_idx, kv_idx):
        return score + bias_[kv_idx]

    @torch.compile(fullgraph=True, backend=counter)
    def flex(q):
        return attncc.flex.flex_attention(q, q, q, score_mod=key_bias_mod)

    q = torch.randn(1, H, N, 16, device=DEVICE)
    for i in range(2):
        bias_.add_(i)
        want = attncc.attention(q, q, q, attncc.ir.dense(), score_mod=key_bias(bias_.reshape(1, 1, N)))
        torch.testing.assert_close(flex(q), want, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1

    @torch.compile(fullgraph=True, backend=counter)
    def inside(q, t):
        return attncc.attention(
            q, q, q, neighborhood(7), score_mod=lambda s, b, h, q_, k: s + t[h, k.index - q_.index + 6]
        )

    with pytest.raises(Exception, match="defined inside the compiled region"):
        inside(q, TABLE.to(DEVICE))


def test_a_module_method_learns_its_parameter_under_compile():
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    module = Biased().to(DEVICE)
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    x = torch.randn(1, H, N, 16, device=DEVICE)
    for _ in range(2):
        compiled(x).pow(2).sum().backward()
        assert module.table.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
    assert counter.frame_count == 1
    want = attncc.attention(x, x, x, neighborhood(7), score_mod=rel_pos_bias(module.table))
    torch.testing.assert_close(compiled(x), want, atol=1e-5, rtol=1e-5)


def test_jit_names_the_coordinates_of_its_score_function():
    @attncc.jit(grid=("Y", "X"))
    def local(q, k):
        return (abs(q.y - k.y) <= 1) & (abs(q.x - k.x) <= 2)

    table = T2[:, 1:4, 1:6].to(DEVICE)  # [H, 3, 5]: offsets -1..1 and -2..2

    def score_mod(score, b, h, q, k):
        return score + table[h, k.y - q.y + 1, k.x - q.x + 2]

    x = torch.randn(1, 4, 5, H, 16, device=DEVICE)  # [B, Y, X, heads, D]
    out = local(x, x, x, score_mod=score_mod)
    want = attncc.attention(x, x, x, local.pattern((4, 5)), score_mod=rel_pos_bias(table))
    torch.testing.assert_close(out, want, atol=0, rtol=0)
