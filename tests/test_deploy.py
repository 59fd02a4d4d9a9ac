"""Deployment: a torch.export'ed program and an AOTInductor package that call attncc load and run
in a fresh process where attncc (or only a package from `attncc compile -o`) is imported.

Note [Exported programs and their ops]: an exported program names its ops (``attncc::fwd_opaque``,
or a compiled package's ``NAME::fwd_opaque``); torch resolves them when it loads the program, so
the module that registers them must be imported first. On CUDA the ops are triton_ops whose
kernels AOTInductor compiles into the package, which then needs neither (the gpu test).
"""

import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import DEVICE

from attncc.cli import cli
from attncc.ir import Grid, parse
from attncc.reference import attention as reference

PATTERN = "neighborhood(window=3, dilation=2)"
SPEC = f"pattern: {PATTERN}\ngrid: [6, 7]\nhead_dim: 16\ndtype: float32\n"

EXPORT = """\
import sys, torch
{imports}
class Model(torch.nn.Module):
    def forward(self, q, k, v):
        return {call}
torch.manual_seed(0)
q, k, v = (torch.randn(2, 6, 7, 2, 16, device="{device}") for _ in range(3))
program = torch.export.export(Model(), (q, k, v))
torch.export.save(program, sys.argv[1] + "/program.pt2")
torch._inductor.aoti_compile_and_package(program, package_path=sys.argv[1] + "/aoti.pt2")
torch.save((q, k, v), sys.argv[1] + "/inputs.pt")
"""

LOAD = """\
import sys, torch
{imports}
q, k, v = torch.load(sys.argv[1] + "/inputs.pt")
exported = torch.export.load(sys.argv[1] + "/program.pt2").module()(q, k, v)
aoti = torch._inductor.aoti_load_package(sys.argv[1] + "/aoti.pt2")(q, k, v)
aoti = aoti[0] if isinstance(aoti, (list, tuple)) else aoti
torch.save((exported, aoti), sys.argv[1] + "/outputs.pt")
"""

ATTNCC = "import attncc\nfrom attncc.ir import parse\npattern = parse({pattern!r})"
NO_ATTNCC = 'sys.modules["attncc"] = None  # the package must not need attncc\nimport na_deploy'


def _run(script: str, folder, **env) -> None:
    run = subprocess.run(
        [sys.executable, "-c", script, str(folder)], cwd=folder, env={**os.environ, **env},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]


def _check(folder) -> None:
    q, k, v = torch.load(folder / "inputs.pt")
    want = reference(q, k, v, parse(PATTERN), grid=Grid((6, 7)))
    for got in torch.load(folder / "outputs.pt"):  # fp32 kernels against the fp32 oracle
        torch.testing.assert_close(got.cpu(), want.cpu(), atol=1e-5, rtol=0)


def test_exported_attncc_call_loads_where_attncc_is_imported(tmp_path):
    imports = ATTNCC.format(pattern=PATTERN)
    call = 'attncc.attention(q, k, v, pattern, layout="spatial")'
    _run(EXPORT.format(imports=imports, call=call, device=DEVICE), tmp_path)
    _run(LOAD.format(imports=imports), tmp_path)
    _check(tmp_path)


def _package(tmp_path, device: str) -> None:
    spec = tmp_path / "deploy.yaml"
    spec.write_text(SPEC)
    result = CliRunner().invoke(
        cli, ["compile", str(spec), "-o", str(tmp_path / "na_deploy"), "--device", device]
    )
    assert result.exit_code == 0, result.output


def test_exported_package_call_loads_with_only_the_package(tmp_path):
    _package(tmp_path, DEVICE)
    env = {"PYTHONPATH": str(tmp_path)}
    _run(EXPORT.format(imports=NO_ATTNCC, call="na_deploy.forward(q, k, v)", device=DEVICE), tmp_path, **env)
    _run(LOAD.format(imports=NO_ATTNCC), tmp_path, **env)
    _check(tmp_path)


@pytest.mark.gpu
def test_aoti_package_of_a_cuda_call_needs_no_attncc(tmp_path):
    # The triton_op path: AOTInductor compiles attncc's Triton kernels into the package.
    imports = ATTNCC.format(pattern=PATTERN)
    call = 'attncc.attention(q, k, v, pattern, layout="spatial")'
    _run(EXPORT.format(imports=imports, call=call, device="cuda"), tmp_path)
    _run(
        LOAD.format(imports='sys.modules["attncc"] = None')
        .replace(
            'exported = torch.export.load(sys.argv[1] + "/program.pt2").module()(q, k, v)', "exported = None"
        )
        .replace("(exported, aoti)", "(aoti,)"),
        tmp_path,
    )
    _check(tmp_path)
