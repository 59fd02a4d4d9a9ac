"""`attncc compile` with score terms and dropout (issue 17): the package takes each term's tensor
by keyword, refuses a missing or misshapen one by name, and matches ``attncc.attention`` on the
same tensors, forward and backward (q, k, v and every learned term), dropout's mask included.

The package runs the kernels attncc renders for the same plans, so it agrees with
``attncc.attention`` to rounding (1e-6 on O(1) values: the same fp32 arithmetic; the
reference-level accuracy of those kernels is tests/test_score_inputs.py's and
tests/test_dropout.py's). Each test imports its package in this process under a name of its
own (a package registers torch.library ops named after itself); tests/test_compile.py checks
in a fresh process that a package needs no attncc.
"""

import importlib
import re

import pytest
import torch
from click.testing import CliRunner
from conftest import DEVICE

import attncc
from attncc.cli import cli
from attncc.errors import SpecError
from attncc.ir import (
    Grid,
    alibi,
    bias,
    causal,
    key_bias,
    neighborhood,
    rel_pos_bias,
    sigmoid,
    softcap,
    temperature,
)

SPEC = "pattern: {pattern}\ngrid: {grid}\nheads: 2\nhead_dim: 16\ndtype: float32\nscore: {score}\n"


def _package(tmp_path, monkeypatch, name: str, pattern: str, grid: str, score: str):
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(SPEC.format(pattern=pattern, grid=grid, score=score))
    result = CliRunner().invoke(cli, ["compile", str(spec), "-o", str(tmp_path / name), "--device", DEVICE])
    assert result.exit_code == 0, result.output
    for path in (tmp_path / name).iterdir():  # torch and triton only
        assert "import attncc" not in path.read_text() and "from attncc" not in path.read_text(), path
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(name), result.output


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _same(got, want):
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_a_package_with_softcap_a_table_and_a_key_bias_matches_attncc(tmp_path, monkeypatch):
    pkg, output = _package(
        tmp_path, monkeypatch, "pkg_rpb", "neighborhood(window=3)", "[5, 6]",
        "softcap(3.0) + rel_pos_bias(5, 5) + key_bias",
    )  # fmt: skip
    assert "pkg_rpb.forward(q, k, v, rel_pos_bias=..., key_bias=...)" in output
    gen = torch.Generator().manual_seed(0)
    b, n = 2, 30
    q = 2 * torch.randn(b, 2, n, 16, generator=gen)  # scaled: the cap bends the scores
    k, v = (torch.randn(b, 1, n, 16, generator=gen) for _ in range(2))  # GQA: one KV head
    table, kb, do = (
        torch.randn(2, 5, 5, generator=gen),
        torch.randn(1, 1, n, generator=gen),
        torch.randn_like(q),
    )
    runs = []
    for call in (
        lambda q, k, v, t, kb: pkg.forward(q, k, v, return_lse=True, rel_pos_bias=t, key_bias=kb),
        lambda q, k, v, t, kb: attncc.attention(
            q,
            k,
            v,
            neighborhood(3),
            grid=Grid((5, 6)),
            return_lse=True,
            score_mod=softcap(3.0) + rel_pos_bias(t) + key_bias(kb),
        ),
    ):
        leaves = _leaves(q, k, v, table, kb)
        out, lse = call(*(t.to(DEVICE) for t in leaves))
        grads = torch.autograd.grad((out * do.to(DEVICE)).sum() + lse.sum(), leaves)
        runs.append((out.cpu(), lse.cpu(), *grads))
    _same(*runs)
    assert runs[0][4].abs().sum() > 0  # the table's gradient is there, and not zero
    with torch.no_grad():  # inference takes the kernels without term gradients
        torch.testing.assert_close(pkg.forward(q, k, v, rel_pos_bias=table, key_bias=kb), runs[0][0])


def test_a_package_with_dropout_matches_attncc_with_the_same_seed(tmp_path, monkeypatch):
    pkg, _ = _package(
        tmp_path, monkeypatch, "pkg_drop", "causal()", "[24]", "softcap(2.0) + alibi(0.5, 0.25) + dropout"
    )
    gen = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(1, 2, 24, 16, generator=gen).to(DEVICE) for _ in range(4))
    score = softcap(2.0) + alibi((0.5, 0.25))  # the spec's slopes are constants of the package
    runs = []
    for call in (
        lambda q, k, v: pkg.forward(q, k, v, dropout_p=0.3, dropout_seed=5),
        lambda q, k, v: attncc.attention(q, k, v, causal(), score_mod=score, dropout_p=0.3, dropout_seed=5),
    ):
        leaves = _leaves(q, k, v)
        out = call(*leaves)
        runs.append((out, *torch.autograd.grad((out * do).sum(), leaves)))
    _same(*runs)
    plain = attncc.attention(q, k, v, causal(), score_mod=score)
    assert not torch.allclose(runs[0][0], plain)  # probabilities were dropped
    torch.testing.assert_close(pkg.forward(q, k, v), plain, atol=1e-6, rtol=1e-6)  # p = 0: no dropout
    torch.manual_seed(3)
    drawn = pkg.forward(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    assert torch.equal(drawn, pkg.forward(q, k, v, dropout_p=0.3))
    with pytest.raises(ValueError, match=r"dropout_p = 1.0; allowed: a number in \[0, 1\)"):
        pkg.forward(q, k, v, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"heads = 1; allowed: 2 \(one per alibi slope of the spec\)"):
        pkg.forward(q[:, :1], k[:, :1], v[:, :1])


def test_a_sigmoid_package_with_temperature_and_a_dense_bias_matches_attncc(tmp_path, monkeypatch):
    pkg, _ = _package(
        tmp_path, monkeypatch, "pkg_sig", "neighborhood(window=5)", "[20]", "sigmoid + temperature + bias"
    )
    gen = torch.Generator().manual_seed(2)
    q, k, v, do = (torch.randn(1, 2, 20, 16, generator=gen).to(DEVICE) for _ in range(4))
    t, b = (
        (torch.rand(2, generator=gen) + 0.5).to(DEVICE),
        torch.randn(1, 2, 20, 20, generator=gen).to(DEVICE),
    )
    runs = []
    for call in (
        lambda q, k, v, t, b: pkg.forward(q, k, v, temperature=t, bias=b, sigmoid_bias=-1.0),
        lambda q, k, v, t, b: attncc.attention(
            q, k, v, neighborhood(5), score_mod=sigmoid() + temperature(t) + bias(b), sigmoid_bias=-1.0
        ),
    ):
        leaves = _leaves(q, k, v, t, b)
        out = call(*leaves)
        runs.append((out, *torch.autograd.grad((out * do).sum(), leaves)))
    _same(*runs)
    with pytest.raises(ValueError, match=r"return_lse = True; allowed: False \(sigmoid"):
        pkg.forward(q, k, v, temperature=t, bias=b, return_lse=True)


def test_missing_misshapen_and_unmarked_term_tensors_are_refused_by_name(tmp_path, monkeypatch):
    pkg, _ = _package(
        tmp_path, monkeypatch, "pkg_marked", "neighborhood(window=3)", "[12]",
        "rel_pos_bias(5, grad=True) + key_bias",
    )  # fmt: skip
    q = torch.randn(1, 2, 12, 16, device=DEVICE)
    table, kb = torch.randn(2, 5, device=DEVICE), torch.randn(1, 2, 12, device=DEVICE)
    refusals = [
        ({"key_bias": kb}, r"rel_pos_bias = None; allowed: a float tensor \[H or 1, 5\] \(the score declares"),
        ({"rel_pos_bias": table[:, :3], "key_bias": kb}, r"rel_pos_bias shape = \(2, 3\); allowed: \(2 or 1, 5\)"),
        ({"rel_pos_bias": table, "key_bias": kb[..., :11]}, r"key_bias shape = \(1, 2, 11\); allowed: \(1 or 1"),
        ({"rel_pos_bias": table, "key_bias": kb.int()}, r"key_bias = torch.int32; allowed: a float16"),
        # The spec marks only the table learned: the package has no kernels for the key bias's gradient.
        ({"rel_pos_bias": table, "key_bias": kb.clone().requires_grad_()}, r"key_bias requires grad; allowed: .*\('rel_pos_bias',\)"),
    ]  # fmt: skip
    for kwargs, match in refusals:
        with pytest.raises(ValueError, match=match):
            pkg.forward(q, q, q, **kwargs)
    with pytest.raises(TypeError, match="unexpected keyword argument 'query_bias'"):
        pkg.forward(q, q, q, rel_pos_bias=table, key_bias=kb, query_bias=kb)


@pytest.mark.parametrize(
    "score,grid,match",
    [
        ("alibi(0.5, 0.25, grad=True)", "[12]", r"score = 'alibi\(0.5, 0.25, grad=True\)' .*constants of the package"),
        ("bias", "[216, 216]", r"grid \(for the score.s bias\) = 46656 is out of range .*allowed: 1..46340 tokens"),
        ("rel_pos_bias(3)", "[12]", r"rel_pos_bias sizes = \(3,\) .*at least \(9,\)"),
    ],
    ids=["constant-slopes-learned", "dense-bias-too-big", "table-too-small"],
)  # fmt: skip
def test_specs_a_package_cannot_serve_are_refused(score, grid, match, tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(SPEC.format(pattern="neighborhood(window=5)", grid=grid, score=score))
    result = CliRunner().invoke(
        cli, ["compile", str(spec), "-o", str(tmp_path / "pkg_bad"), "--device", "cpu"]
    )
    assert isinstance(result.exception, (SpecError, attncc.AttnccError)), result.output
    assert re.search(match, str(result.exception)), str(result.exception)
    assert not (tmp_path / "pkg_bad").exists()


def test_a_cuda_package_with_the_gpus_tanh_refuses_the_cpu(tmp_path, monkeypatch):
    # fp16 kernels compiled for CUDA take the soft-cap's tanh as tanh.approx, GPU code the
    # interpreter cannot run: the package says so instead of failing inside Triton.
    spec = tmp_path / "capped.yaml"
    spec.write_text(
        SPEC.format(pattern="causal()", grid="[24]", score="softcap(2.0)").replace("float32", "float16")
    )
    result = CliRunner().invoke(
        cli, ["compile", str(spec), "-o", str(tmp_path / "pkg_gpu_tanh"), "--device", "cuda"]
    )
    assert result.exit_code == 0, result.output
    monkeypatch.syspath_prepend(str(tmp_path))
    import pkg_gpu_tanh

    assert pkg_gpu_tanh.FAST_TANH
    q = torch.randn(1, 2, 24, 16, dtype=torch.float16)
    with pytest.raises(
        ValueError, match=r"device = cpu; allowed: a CUDA device \(for the CPU, compile with --device cpu\)"
    ):
        pkg_gpu_tanh.forward(q, q, q)
