"""``attncc inspect``: the sm_90 machine code of a spec's kernels, read with no GPU."""

from __future__ import annotations

import sys

import click
from rich.console import Console

from attncc import settings
from attncc.autotune.command import parse_shape
from attncc.errors import AttnccError, field_error
from attncc.ir.spec import DTYPES, Spec, load_spec, on_grid, one_grid
from attncc.ir.validate import validate
from attncc.outputs import output_file


@click.command("inspect")
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))
@click.option(
    "--shape", help="B,H,N... : batch, heads and grid sizes [default: 1, the spec's heads and grid]"
)
@click.option("--dtype", type=click.Choice(DTYPES), help="[default: the spec's]")
@click.option("--head-dim", type=click.IntRange(1, 256), help="[default: the spec's]")
@click.option("--kv-heads", type=click.IntRange(1), help="KV heads (GQA/MQA) [default: the query heads]")
@click.option("--forward-only", is_flag=True, help="Leave out the backward kernels.")
@click.option(
    "--cutlass", is_flag=True, help="Also build the CUTLASS forward (nvcc, a minute or more) and read it."
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    callback=output_file,
    help="Also write the profile as JSON.",
)
def inspect_cmd(
    spec_path: str,
    shape: str | None,
    dtype: str | None,
    head_dim: int | None,
    kv_heads: int | None,
    forward_only: bool,
    cutlass: bool,
    json_path: str | None,
) -> None:
    """Compile SPEC's kernels for sm_90 (H100/H200) as a launch would, with no GPU, and print per
    kernel and per tile loop: registers, spills, shared memory, SASS instructions per tile,
    HGMMA, how tiles are loaded, and the static efficiency estimate (Note [Issue model] in
    attncc.machine.model: tensor-core cycles over modelled cycles, 1 = tensor-bound on every
    tile the plan visits). The spec's score terms are fused in (the backward computes the
    gradients of those it marks grad=True; dropout's kernels draw their mask)."""
    spec = one_grid(load_spec(spec_path), "inspect")
    if settings.interpreter():
        raise AttnccError(
            "TRITON_INTERPRET = 1 is set; allowed: unset (the interpreter's kernels cannot be compiled)"
        )
    from attncc.machine import profile
    from attncc.machine.report import problems, table, write_json

    if spec.space is not None:
        options = {"--shape": shape, "--forward-only": forward_only or None, "--cutlass": cutlass or None}
        for name, value in options.items():
            if value is not None:
                allowed = "unset with a spec of segments (its space fixes N; every kernel is Triton's)"
                raise field_error(AttnccError, name, value, allowed)
        _inspect_segments(spec, dtype, head_dim, kv_heads, json_path)
        return
    spec = on_grid(spec, "inspect")
    batch, heads, grid = parse_shape(shape) if shape else (1, spec.heads, spec.grid)
    validate(spec.pattern, grid, heads)
    console = Console(width=None if sys.stdout.isatty() else 160)
    with console.status("compiling for sm_90 ..."):
        result = profile(
            spec.pattern, grid, batch, heads, head_dim or spec.head_dim, dtype or spec.dtype,
            kv_heads=kv_heads, backward=not forward_only, score=spec.score.form.text, name=spec.name,
            region=spec.queries,
        )  # fmt: skip
    console.print(table(result))
    for k in result.kernels:
        for problem in problems(k):
            console.print(f"[yellow]{k.kernel}: {problem}[/yellow]")
        if k.unmatched:
            console.print(f"[yellow]{k.kernel}: no estimate: {k.unmatched}[/yellow]")
    if cutlass and spec.queries:
        console.print(f"CUTLASS: none (queries over a box {spec.queries}: Triton's kernels)", highlight=False)
    elif cutlass:
        from attncc.machine.cutlass import profile_cutlass

        with console.status("building the CUTLASS forward for sm_90a ..."):
            functions = profile_cutlass(spec.pattern, grid, head_dim or spec.head_dim, dtype or spec.dtype)
        if isinstance(functions, str):
            console.print(f"CUTLASS: none ({functions})", highlight=False)
        for f in functions if not isinstance(functions, str) else ():
            console.print(
                f"CUTLASS forward: {f.registers} registers, {f.local_bytes} B local (spills), "
                f"{f.stack_bytes} B stack, {f.instructions} instructions, {f.hgmma} HGMMA, "
                f"{f.tma} TMA copies",
                highlight=False,
            )
    if json_path:
        write_json([result], json_path)
        console.print(f"wrote {json_path}")


def _inspect_segments(
    spec: Spec, dtype: str | None, head_dim: int | None, kv_heads: int | None, json_path: str | None
) -> None:
    """``attncc inspect`` of a spec of segments: its three kernels (attncc.machine.segments)."""
    import dataclasses
    import json

    from attncc.machine.segments import markdown_rows, problems, segments_profile

    console = Console(width=None if sys.stdout.isatty() else 160)
    with console.status("compiling for sm_90 ..."):
        result = segments_profile(
            spec.pattern, 1, spec.heads, kv_heads, head_dim or spec.head_dim, dtype or spec.dtype, spec.name
        )  # type: ignore[arg-type]
    console.print("\n".join(markdown_rows([result])), highlight=False, soft_wrap=True)
    for problem in problems(result):
        console.print(f"[yellow]{problem}[/yellow]")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dataclasses.asdict(result), f, indent=1)
