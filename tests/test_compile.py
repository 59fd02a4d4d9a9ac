"""`attncc compile`: a standalone package (forward and backward) that runs with torch and triton only."""

import os
import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from attncc.cli import cli
from attncc.ir import Grid, parse
from attncc.reference import attention as reference

SPEC = """\
pattern: per_head([neighborhood(window=3, dilation=2), axial()])
grid: [7, 9]
heads: 2
head_dim: 16
dtype: float32
"""

RUN = """\
import sys
sys.modules["attncc"] = None  # the package must not need attncc
import pytest
import torch
import na_small
torch.manual_seed(0)
q = torch.randn(2, 7, 9, 2, 16, requires_grad=True)
k, v = torch.randn(2, 7, 9, 1, 16, requires_grad=True), torch.randn(2, 7, 9, 1, 16, requires_grad=True)
out, lse = na_small.forward(q, k, v, return_lse=True)
do = torch.randn_like(out)
out.backward(do)
grads = {"dq": q.grad, "dk": k.grad, "dv": v.grad}
torch.save({"q": q.detach(), "k": k.detach(), "v": v.detach(), "out": out.detach(), "lse": lse, "do": do, **grads},
           sys.argv[1])
try:  # the kernels fold a positive scale into the exponent: anything else is refused
    na_small.forward(q, k, v, scale=0.0)
except ValueError as e:
    assert str(e).startswith("scale = 0.0; allowed: a finite number > 0"), e
else:
    raise AssertionError("scale = 0.0 was accepted")
"""


def test_compiled_package_runs_without_attncc(tmp_path):
    spec = tmp_path / "small.yaml"
    spec.write_text(SPEC)
    result = CliRunner().invoke(
        cli, ["compile", str(spec), "-o", str(tmp_path / "na_small"), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"^wrote .*na_small/ in \d+\.\d s: import na_small", result.output), result.output
    assert "attncc" not in (tmp_path / "na_small" / "__init__.py").read_text().split('"""')[2]
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", RUN, str(tmp_path / "result.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = torch.load(tmp_path / "result.pt")
    pattern = parse("per_head([neighborhood(window=3, dilation=2), axial()])")
    q, k, v = (got[x].requires_grad_() for x in "qkv")
    out, lse = reference(q, k, v, pattern, grid=Grid((7, 9)), return_lse=True)
    torch.testing.assert_close(got["out"], out.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got["lse"], lse.detach(), atol=1e-5, rtol=1e-6)
    out.backward(got["do"])  # the package's backward (two head patterns share a KV head)
    for name, t in zip("qkv", (q, k, v)):
        torch.testing.assert_close(got[f"d{name}"], t.grad, atol=1e-4, rtol=0)


def test_bf16_package_refuses_the_cpu(tmp_path, monkeypatch):
    # Triton's interpreter computes bf16 dots wrongly (shared/TOOLCHAIN.md): a bf16 package
    # run on CPU tensors refuses rather than return garbage.
    spec = tmp_path / "bf16.yaml"
    spec.write_text(SPEC.replace("dtype: float32", "dtype: bfloat16"))
    result = CliRunner().invoke(
        cli, ["compile", str(spec), "-o", str(tmp_path / "na_bf16"), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    monkeypatch.syspath_prepend(str(tmp_path))
    import na_bf16

    q = torch.randn(1, 7, 9, 2, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"torch.bfloat16 on the CPU; allowed: a CUDA device"):
        na_bf16.forward(q, q[..., :1, :], q[..., :1, :])
