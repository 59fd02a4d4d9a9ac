"""`attncc compile` of a spec with ``q_grid`` (issue 16: cross-attention through every front
door): the package's ``forward`` takes q on q_grid and k/v on the keys' grid, in either layout,
and matches ``attncc.attention(..., q_grid=...)`` on the same tensors, forward and backward,
score terms included.

The package runs the kernels attncc renders for the same embedded problem (Note
[Cross-attention] in attncc.runtime.cross), so it agrees with ``attncc.attention`` to rounding
(1e-6 on O(1) values, fp32); the kernels' accuracy against the reference is tests/test_cross.py's.
Each test imports its package under its own name."""

import importlib

import pytest
import torch
from click.testing import CliRunner
from conftest import DEVICE, SPECS

import attncc
from attncc.cli import cli
from attncc.ir import dense, key_bias, key_range, softcap

SPEC = "pattern: {pattern}\ngrid: {grid}\nq_grid: {q_grid}\nheads: 2\nhead_dim: 16\ndtype: float32\nscore: {score}\n"


def _package(tmp_path, monkeypatch, name, pattern, grid, q_grid, score="softmax"):
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(SPEC.format(pattern=pattern, grid=grid, q_grid=q_grid, score=score))
    result = CliRunner().invoke(cli, ["compile", str(spec), "-o", str(tmp_path / name), "--device", DEVICE])
    assert result.exit_code == 0, result.output
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(name), result.output


def _runs(calls, *tensors, do):
    runs = []
    for call in calls:
        leaves = [t.detach().clone().to(DEVICE).requires_grad_() for t in tensors]
        out, lse = call(*leaves)
        grads = torch.autograd.grad((out * do.to(DEVICE)).sum() + lse[torch.isfinite(lse)].sum(), leaves)
        runs.append((out.cpu(), lse.cpu(), *(g.cpu() for g in grads)))
    for got, want in zip(*runs, strict=True):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("layout", ["sdpa", "spatial"])
def test_a_package_of_text_over_an_image_matches_attncc(tmp_path, monkeypatch, layout):
    """5 text queries over a 3x4 image (fewer queries than keys: no copy), GQA."""
    pkg, output = _package(tmp_path, monkeypatch, f"pkg_cross_{layout}", "dense()", "[3, 4]", "[5]")
    assert f"pkg_cross_{layout}.forward(q, k, v)" in output
    gen = torch.Generator().manual_seed(0)
    if layout == "sdpa":
        q, do = torch.randn(2, 2, 5, 16, generator=gen), torch.randn(2, 2, 5, 16, generator=gen)
        k, v = (torch.randn(2, 1, 12, 16, generator=gen) for _ in range(2))
        grid = (3, 4)
    else:
        q, do = torch.randn(2, 5, 2, 16, generator=gen), torch.randn(2, 5, 2, 16, generator=gen)
        k, v = (torch.randn(2, 3, 4, 1, 16, generator=gen) for _ in range(2))
        grid = None
    _runs(
        [
            lambda q, k, v: pkg.forward(q, k, v, return_lse=True),
            lambda q, k, v: attncc.attention(q, k, v, dense(), q_grid=5, grid=grid, layout=layout,
                                             return_lse=True),
        ],
        q, k, v, do=do,
    )  # fmt: skip


def test_a_package_of_an_image_over_a_short_text_with_terms_matches_attncc(tmp_path, monkeypatch):
    """A 2x4 image's queries over 6 text keys (more queries than keys: k and v padded), the first
    four keys kept, soft-capped, with a learned key bias."""
    pkg, output = _package(tmp_path, monkeypatch, "pkg_cross_terms", "key_range(axis=0, hi=3)", "[6]", "[2, 4]",
                           "softcap(5.0) + key_bias")  # fmt: skip
    assert "pkg_cross_terms.forward(q, k, v, key_bias=...)" in output
    gen = torch.Generator().manual_seed(1)
    q, do = 2 * torch.randn(1, 2, 4, 2, 16, generator=gen), torch.randn(1, 2, 4, 2, 16, generator=gen)
    k, v = (torch.randn(1, 6, 2, 16, generator=gen) for _ in range(2))
    kb = torch.randn(1, 2, 6, generator=gen)
    _runs(
        [
            lambda q, k, v, kb: pkg.forward(q, k, v, return_lse=True, key_bias=kb),
            lambda q, k, v, kb: attncc.attention(q, k, v, key_range(0, hi=3), q_grid=(2, 4), layout="spatial",
                                                 score_mod=softcap(5.0) + key_bias(kb), return_lse=True),
        ],
        q, k, v, kb, do=do,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"key_bias shape = \(1, 2, 8\); allowed: \[B or 1, H or 1, 6\]"):
        pkg.forward(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), key_bias=torch.zeros(1, 2, 8, device=DEVICE))
    with pytest.raises(
        ValueError, match=r"k/v shape = \(1, 7, 2, 16\); allowed: 6 keys \(\(6,\)\) in q's layout"
    ):
        pkg.forward(q.to(DEVICE), *[torch.zeros(1, 7, 2, 16, device=DEVICE)] * 2, key_bias=kb.to(DEVICE))


def test_the_example_spec_renders_a_package_for_a_gpu(tmp_path):
    """77 text queries over a 32x32 image, bf16 with GPU tiles: a region of the image's own
    sequence (no copy), written as Python that compiles (bf16 does not run on the interpreter)."""
    from attncc.ir import load_spec
    from attncc.lower.emit import write_package

    path = write_package(load_spec(SPECS / "text_to_image_cross.yaml"), tmp_path / "pkg_text_image", "cuda")
    init = (path / "__init__.py").read_text()
    compile(init, "__init__.py", "exec")
    assert "CROSS_Q_GRID = (77,)" in init and "KEY_GRID = (32, 32)" in init and "PADDING = 0" in init
    assert "q: [B, H, 77, 64] (SDPA layout) or [B, 77, H, 64] (spatial layout), bfloat16." in init
