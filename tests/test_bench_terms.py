"""Score terms in the benchmarks (issue 17): the peers' score_mod and attn_mask compute the same
terms as attncc, the tiny-terms suite runs with its learned table's gradient checked, peers
that cannot run a term decline saying why, and the report shows a term's cost over the plain
case. Timings under the interpreter mean nothing and are not asserted.
"""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from attncc.bench.flexmask import mask_mod
from attncc.bench.peers import Flex, Naive, Natten, Sdpa
from attncc.bench.report import markdown, term_cost
from attncc.bench.runner import CaseResult, Entry
from attncc.bench.suite import Case, load_cases
from attncc.bench.terms import dense_bias, random_score, score_mod
from attncc.cli import cli
from attncc.ir import (
    Grid,
    causal,
    key_bias,
    neighborhood,
    parse_score,
    query_bias,
    sliding_window,
    softcap,
)
from attncc.reference import attention as reference

CPU = torch.device("cpu")
H = 4

SCORES = [
    ("causal+softcap+alibi", causal(), (40,), "softcap(3.0) + alibi"),
    ("window+signed-alibi+temperature", sliding_window(5, 3), (37,), "alibi(distance='signed') + temperature"),
    ("na2d-dilated+rpb+axes-alibi", neighborhood((3, 5), dilation=(2, 1)), (7, 11), "rel_pos_bias(5, 9) + alibi(distance='axes')"),
    ("na1d+biases", neighborhood(7), (37,), "query_bias + key_bias + bias + softcap(2.0)"),
]  # fmt: skip


def _with_mod(q, k, v, pattern, grid: Grid, score):
    """Attention whose scores are FlexAttention's score_mod evaluated over every (b, h, q, k)."""
    b, h, n = q.shape[0], q.shape[1], grid.size
    index = [
        torch.arange(s).reshape([-1 if d == i else 1 for d in range(4)]) for i, s in enumerate((b, h, n, n))
    ]
    scores = score_mod(score, pattern, grid, h, CPU)(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, *index)
    keep, _ = mask_mod(pattern, grid, h)
    scores = scores.masked_fill(~keep(0, index[1], index[2], index[3]), -torch.inf)
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("pattern,shape,text", [s[1:] for s in SCORES], ids=[s[0] for s in SCORES])
def test_the_flex_score_mod_computes_the_terms_of_the_reference(pattern, shape, text):
    grid, gen = Grid(shape), torch.Generator().manual_seed(0)
    score = random_score(parse_score(text), 2, H, grid, torch.float32, CPU, gen)
    q, k, v = (torch.randn(2, H, grid.size, 16, generator=gen) for _ in range(3))
    want = reference(q, k, v, pattern, grid=grid, score_mod=score)
    torch.testing.assert_close(_with_mod(q, k, v, pattern, grid, score), want, atol=1e-5, rtol=0)


def test_broadcast_biases_are_read_at_zero_and_the_dense_bias_is_their_sum():
    grid, gen = Grid((12,)), torch.Generator().manual_seed(1)
    qb, kb = torch.randn(1, H, 12, generator=gen), torch.randn(2, 1, 12, generator=gen)
    score = query_bias(qb) + key_bias(kb)
    mod = score_mod(score, causal(), grid, H, CPU)
    torch.testing.assert_close(
        dense_bias(mod, 2, H, 12, torch.float32, CPU), qb[..., None] + kb[..., None, :]
    )
    q, k, v = (torch.randn(2, H, 12, 16, generator=gen) for _ in range(3))
    want = reference(q, k, v, causal(), score_mod=score)
    torch.testing.assert_close(_with_mod(q, k, v, causal(), grid, score), want, atol=1e-5, rtol=0)


def test_a_learned_table_is_checked_and_timed_with_its_gradient(tmp_path):
    out = tmp_path / "r.json"
    args = ["bench", "tiny-terms", "-k", "rpb", "--fwd-bwd", "--peers", "sdpa,naive", "--runs", "1"]
    result = CliRunner().invoke(cli, [*args, "--warmup", "0", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    (data,) = json.loads(out.read_text())["results"]
    assert data["case"]["score"] == "rel_pos_bias(5, 5, grad=True)"
    entries = {e["peer"]: e for e in data["entries"]}
    assert entries["attncc"]["status"] == "ok" and entries["attncc"]["median_ms"] > 0
    for peer in ("sdpa", "naive"):  # outputs and the gradients of q, k, v and the table, checked
        assert entries[peer]["status"] == "ok" and entries[peer]["error"] <= entries[peer]["tolerance"]


@pytest.mark.parametrize(
    "peer,case,reason",
    [
        (Sdpa(), "tiny-causal-40+softcap+alibi", "softcap is not an additive bias: an attn_mask cannot carry it"),
        (Sdpa(), "tiny-causal-40+dropout", "its dropout draws another mask than ours: the outputs cannot be checked"),
        (Sdpa(), "tiny-na2d-6x9-w3+rpb", None),
        (Flex(), "tiny-causal-40+dropout", "has no dropout"),
        (Flex(), "tiny-causal-40+softcap+alibi", None),
        (Naive(), "tiny-causal-40+dropout", "draws no dropout mask of its own (it applies a given one)"),
        (Natten(), "tiny-na2d-6x9-w3+rpb", "runs no score terms (rel_pos_bias(5, 5, grad=True))"),
    ],
)  # fmt: skip
def test_peers_decline_the_terms_they_cannot_run_saying_why(peer, case, reason):
    cases = {c.name: c for c in load_cases("tiny-terms")}
    assert peer.decline(cases[case], CPU) == reason


def test_the_report_shows_a_terms_cost_over_the_same_case_without_it():
    plain, capped = load_cases("tiny")[0], dataclasses.replace(load_cases("tiny")[0], name="capped")
    capped = dataclasses.replace(capped, score=softcap(5.0))
    other = Case("other", causal(), Grid((48,)), 2, 16, "float32", score=softcap(5.0))  # no plain twin
    results = [
        CaseResult(c, "fwd", 0.5, 1.0, "range", (Entry("attncc", "ok", median_ms=ms),))
        for c, ms in ((plain, 2.0), (capped, 2.5), (other, 1.0))
    ]
    assert [term_cost(r, results) for r in results] == [None, 1.25, None]
    text = markdown(results, {"date": "2026-12-01", "device": "cpu", "torch": "", "triton": "", "attncc": "",
                              "python": ""}, "t", None)  # fmt: skip
    assert "| attncc ms | vs plain |" in text and "| 2.500 | 1.25x |" in text
