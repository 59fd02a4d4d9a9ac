"""``attncc.flex``: FlexAttention mask_mods traced into the IR, against the mask_mod itself.

The independent check is the mask_mod evaluated by torch, as FlexAttention would, on 0-d
integer tensors for every (q_idx, kv_idx) pair of a short sequence (and every head when it
uses ``h``); the traced pattern's brute-force mask must equal it bit for bit.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from torch.nn.attention.flex_attention import and_masks, create_block_mask, noop_mask, or_masks

import attncc
import attncc.flex
from attncc import AttnccError, TraceError
from attncc.ir import (
    Grid,
    block_diagonal,
    canonicalize,
    causal,
    document,
    key_range,
    per_head,
    sliding_window,
)
from attncc.ir.mask import mask

N = 48
DOC = torch.tensor([0] * 10 + [1] * 17 + [2] * 21)  # three packed documents
SCATTERED = torch.tensor([5, 5, -1, -1, 5, 7] * 8)  # ids that repeat, are negative, and interleave
WINDOWS = torch.tensor([3, 9])  # a window per head


def brute_force(mask_mod, n: int, heads: int = 1) -> torch.Tensor:
    """``[heads, n, n]``: ``mask_mod`` run on 0-d int64 tensors, one (head, q, kv) at a time."""
    b = torch.tensor(0)
    out = torch.zeros(heads, n, n, dtype=torch.bool)
    for h in range(heads):
        for q in range(n):
            for kv in range(n):
                out[h, q, kv] = bool(mask_mod(b, torch.tensor(h), torch.tensor(q), torch.tensor(kv)))
    return out


def causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def document_mod(b, h, q_idx, kv_idx):
    return DOC[q_idx] == DOC[kv_idx]


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx < 16) | (q_idx >= kv_idx)


def window_per_head(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx <= WINDOWS[h]) & (q_idx >= kv_idx)


MASKS = [
    ("causal", causal_mod, causal()),
    ("sliding-window", lambda b, h, q_idx, kv_idx: (q_idx - kv_idx <= 5) & (q_idx >= kv_idx), sliding_window(5)),
    ("window-torch-abs", lambda b, h, q_idx, kv_idx: torch.abs(q_idx - kv_idx) <= 3, sliding_window(3, 3)),
    ("window-method-abs", lambda b, h, q_idx, kv_idx: (kv_idx - q_idx).abs().le(2), sliding_window(2, 2)),
    ("prefix-lm", prefix_lm, causal() | key_range(0, hi=15)),
    ("document", document_mod, document([0] * 10 + [1] * 17 + [2] * 21)),
    ("document-causal", and_masks(causal_mod, document_mod), causal() & document([0] * 10 + [1] * 17 + [2] * 21)),
    ("scattered-documents", lambda b, h, q_idx, kv_idx: SCATTERED[kv_idx] == SCATTERED[q_idx], None),
    ("prefix-or-document", or_masks(prefix_lm, document_mod), None),
    ("block-causal", lambda b, h, q_idx, kv_idx: q_idx // 8 >= kv_idx // 8, causal() | block_diagonal(0, 8)),
    ("keys-in-a-range", lambda b, h, q_idx, kv_idx: (kv_idx >= 4) & (kv_idx <= 20), key_range(0, 4, 20)),
    ("negation", lambda b, h, q_idx, kv_idx: ~(kv_idx > q_idx), causal()),
    (
        "torch-logical",
        lambda b, h, q_idx, kv_idx: torch.logical_and(q_idx >= kv_idx, torch.logical_not(q_idx - kv_idx > 6)),
        sliding_window(6),
    ),
    ("dilated-causal", lambda b, h, q_idx, kv_idx: ((q_idx - kv_idx) % 4 == 0) & (q_idx >= kv_idx), None),
    ("noop", noop_mask, None),
]  # fmt: skip


@pytest.mark.parametrize("name,mask_mod,expected", MASKS, ids=[m[0] for m in MASKS])
def test_traced_mask_equals_the_mask_mod_on_every_pair(name, mask_mod, expected):
    pattern = attncc.flex.pattern(mask_mod, N)
    assert torch.equal(mask(pattern, Grid((N,)))[0], brute_force(mask_mod, N)[0])
    if expected is not None:
        assert pattern == canonicalize(expected, Grid((N,)))


def test_a_mask_that_uses_the_head_is_one_pattern_per_head():
    pattern = attncc.flex.pattern(window_per_head, N, heads=2)
    assert pattern == per_head([sliding_window(3), sliding_window(9)])
    assert torch.equal(mask(pattern, Grid((N,))), brute_force(window_per_head, N, heads=2))
    # A head that is ignored, or used the same way by every head, gives one pattern.
    assert (
        attncc.flex.pattern(lambda b, h, q_idx, kv_idx: (h >= 0) & (q_idx >= kv_idx), N, heads=3) == causal()
    )
    with pytest.raises(TraceError, match=r"on 48 tokens, head h = 0: b == 0: uses b \(the batch index"):
        attncc.flex.pattern(lambda b, h, q_idx, kv_idx: (h >= 0) & (b == 0), N, heads=2)
    with pytest.raises(TraceError, match=r"b.new_ones\(\(2,\)\): only a 0-d bool constant"):
        attncc.flex.pattern(lambda b, h, q_idx, kv_idx: b.new_ones((2,)) & (q_idx >= kv_idx), N)


def test_block_mask_of_flex_attention_gives_its_mask_mod():
    block_mask = create_block_mask(document_mod, None, None, N, N, device="cpu", BLOCK_SIZE=16)
    assert attncc.flex.pattern(block_mask.mask_mod, N) == attncc.flex.pattern(document_mod, N)


SHORT = torch.tensor([0, 0, 1])
FLOATS = torch.arange(N, dtype=torch.float32)
TABLE = torch.zeros(N, N, dtype=torch.long)


def _branches(b, h, q_idx, kv_idx):
    if q_idx >= kv_idx:
        return True
    return False


REFUSALS = [
    ("batch", lambda b, h, q_idx, kv_idx: (b == 0) & (q_idx >= kv_idx), r"b == 0: uses b \(the batch index; attncc reads it only as valid\[b, kv_idx\] \(key_mask\) and kv_idx < lengths\[b\]"),
    ("head-without-heads", window_per_head, r"WINDOWS\[h\]: uses h \(the head index; give heads="),
    ("unknown-torch-function", lambda b, h, q_idx, kv_idx: torch.sin(q_idx) > kv_idx, r"torch.sin\(q_idx\): not traced; allowed torch functions"),
    ("where", lambda b, h, q_idx, kv_idx: torch.where(q_idx >= kv_idx, True, False), r"torch.where\(q_idx >= kv_idx, True, False\): not traced"),
    ("unknown-method", lambda b, h, q_idx, kv_idx: q_idx.item() >= kv_idx, r"q_idx.item: not a traced method"),
    ("different-documents", lambda b, h, q_idx, kv_idx: DOC[q_idx] != DOC[kv_idx], r"cannot express DOC\[q_idx\] != DOC\[kv_idx\] .*only equal values"),
    ("float-lookup", lambda b, h, q_idx, kv_idx: FLOATS[q_idx] >= kv_idx, r"FLOATS\[q_idx\]: FLOATS is <tensor of shape \[48\], float32>; a lookup reads a 1-D integer tensor"),
    ("two-index-lookup", lambda b, h, q_idx, kv_idx: TABLE[q_idx, kv_idx] == 1, r"TABLE\[q_idx, kv_idx\]: the index is not one traced integer"),
    ("shifted-lookup", lambda b, h, q_idx, kv_idx: DOC[q_idx + 1] == DOC[kv_idx], r"DOC\[q_idx \+ 1\]: a lookup is indexed by one coordinate"),
    ("short-table", lambda b, h, q_idx, kv_idx: SHORT[q_idx] == SHORT[kv_idx], r"SHORT has 3 entries, but it is read at coordinates up to 47"),
    ("query-alone", lambda b, h, q_idx, kv_idx: q_idx < 5, r"cannot express q_idx < 5 .*condition on the query alone \(q_idx\)"),
    ("keeps-nothing", lambda b, h, q_idx, kv_idx: kv_idx < 0, r"keeps no \(query, key\) pair: its mask is empty"),
    ("python-if", _branches, r"q_idx >= kv_idx was used as a Python bool"),
    ("returns-int", lambda b, h, q_idx, kv_idx: q_idx - kv_idx, r"returned q_idx - kv_idx; allowed: a condition on q_idx and kv_idx"),
    ("raises", lambda b, h, q_idx, kv_idx: {}[q_idx], r"raised KeyError while tracing"),
]  # fmt: skip


@pytest.mark.parametrize("name,mask_mod,match", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_sub_expression(name, mask_mod, match):
    with pytest.raises(
        TraceError, match=rf"attncc.flex mask_mod {mask_mod.__name__} on 48 tokens: .*" + match
    ):
        attncc.flex.pattern(mask_mod, N)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: attncc.flex.pattern(lambda score, b, h, q_idx, kv_idx: score, N), r"must take four arguments \(b, h, q_idx, kv_idx\); a score_mod"),
        (lambda: attncc.flex.pattern(causal_mod, 0), r"seq_len = 0 is out of range; allowed: an integer >= 1"),
        (lambda: attncc.flex.pattern(causal_mod, N, heads=0), r"heads = 0 is out of range"),
        (lambda: attncc.flex.pattern("causal", N), r"mask_mod = 'causal' is not a function mask_mod\(b, h, q_idx, kv_idx\)"),
    ],
    ids=["score-mod", "seq-len", "heads", "not-callable"],
)  # fmt: skip
def test_bad_pattern_arguments(call, match):
    with pytest.raises(TraceError, match=match):
        call()


def _inputs(b, h, h_kv, n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, heads, n, d, generator=g).to(DEVICE) for heads in (h, h_kv, h_kv)]


def test_flex_attention_argument_checks():
    q, k, v = _inputs(1, 2, 1, N, 16)
    with pytest.raises(AttnccError, match=r"key heads = 1 .*2 \(the query heads\), or enable_gqa=True"):
        attncc.flex.flex_attention(q, k, v, causal_mod)
    with pytest.raises(AttnccError, match=r"key length = 40 .*48, the query length"):
        attncc.flex.flex_attention(q, k[:, :, :40], v[:, :, :40], causal_mod, enable_gqa=True)
    with pytest.raises(AttnccError, match=r"query shape = \(2, 48, 16\) is not \[B, H, N, D\]"):
        attncc.flex.flex_attention(q[0], k[0], v[0], causal_mod)
    block_mask = create_block_mask(causal_mod, None, None, 32, 32, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(AttnccError, match=r"block_mask seq_lengths = \(32, 32\) is not \(48, 48\)"):
        attncc.flex.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    with pytest.raises(AttnccError, match=r"both mask_mod and block_mask; give one"):
        attncc.flex.flex_attention(q, k, v, causal_mod, block_mask=block_mask, enable_gqa=True)


# Both sides compute in float32 from the same inputs, with different summation orders (online
# softmax over 16-key tiles against one pass): differences are a few ulps of O(1) values
# (~1e-6); 1e-4 leaves room for that and is far below what one wrong key costs (~1e-2).
ATOL = 1e-4


def test_flex_attention_matches_sdpa_with_the_dense_mask():
    mask_mod = or_masks(prefix_lm, and_masks(causal_mod, document_mod))
    q, k, v = _inputs(2, 2, 2, N, 16)
    dense_mask = brute_force(mask_mod, N)[0].to(DEVICE)
    out, lse = attncc.flex.flex_attention(q, k, v, mask_mod, scale=0.3, return_lse=True)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask, scale=0.3)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
    scores = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~dense_mask, -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=ATOL, rtol=0)


def test_flex_attention_with_a_block_mask_and_grouped_heads():
    q, k, v = _inputs(1, 4, 2, N, 16, seed=1)
    mask_mod = and_masks(causal_mod, lambda b, h, q_idx, kv_idx: q_idx - kv_idx <= 2 + 4 * (h % 2))
    block_mask = create_block_mask(mask_mod, None, 4, N, N, device="cpu", BLOCK_SIZE=16)
    out = attncc.flex.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    dense_mask = brute_force(mask_mod, N, heads=4).to(DEVICE)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask, enable_gqa=True)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=0)
