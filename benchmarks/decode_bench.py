"""Decode steps against a KV cache (issue 16 part 2): attncc's decode kernels beside SDPA,
FlexAttention's decoding kernel and FlashAttention where they are installed.

    python benchmarks/decode_bench.py [--device cuda] [--markdown benchmarks/RESULTS.md]

Cases: one query per batch element (the cache's last position: bottom-right) of 8 query heads
over one KV head (GQA 8:1), head dim 128, bf16, a cache of 32K and of 128K keys, batch 1 and 8;
causal, and a 4096-token sliding window with 4 sinks (``sliding_window(4095) | key_range(0,
hi=3)``). Every peer's output must match attncc's (bf16: 3e-2 of the largest magnitude) before it
is timed (``attncc.timing.measure``: medians over rotated inputs, first call apart). SDPA runs
the causal case unmasked (one query at the end sees every key) and the window with a boolean
mask; FlexAttention gets ``create_block_mask`` of the same rule at the cache's offset
(compiled; its decoding kernel serves queries this short); FlashAttention
(``flash_attn_with_kvcache``) takes the causal case only (it has no sinks). attncc also runs
the same cache as a paged one (16-token pages in a shuffled order, ``block_table=``). Then attncc's own split
counts: the cost model's beside fixed ones (``ATTNCC_DECODE_SPLITS``), which checks the model
(Note [Split count] in attncc.autotune.decode). The CPU figure (``--device cpu``, under
``TRITON_INTERPRET=1``, at 1/256 of the keys, ``--runs 1``) tests the script, not the kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import time
from collections.abc import Callable, Iterator

import torch

import attncc
from attncc.bench.report import prepend
from attncc.ir import causal, key_range, sliding_window
from attncc.runtime import decode
from attncc.timing import measure

HEADS, KV_HEADS, HEAD_DIM, WINDOW, SINKS, PAGE = 8, 1, 128, 4096, 4, 16
SPLITS = (1, 16, 32, 64, 132, 256)


def _cases(scale: int) -> list[tuple[str, int, int]]:
    """In order of priority (a run out of time stops between cases)."""
    return [(pattern, keys // scale, batch) for batch in (1, 8) for keys in (131072, 32768)
            for pattern in ("causal", "sinks")]  # fmt: skip


def _pattern(name: str):
    return causal() if name == "causal" else sliding_window(WINDOW - 1) | key_range(0, hi=SINKS - 1)


def _inputs(batch: int, keys: int, device: str, sets: int = 3) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator(device=device).manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)

    kv = (batch, KV_HEADS, keys, HEAD_DIM)
    return [(t(batch, HEADS, 1, HEAD_DIM), t(*kv), t(*kv)) for _ in range(sets)]


def _paged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The same cache as pools of PAGE-token pages in a shuffled order, and the block table."""
    b, _, n, _ = k.shape
    order = torch.randperm(b * n // PAGE, generator=torch.Generator().manual_seed(0)).to(k.device)
    pools = []
    for t in (k, v):
        pool = torch.empty(b * n // PAGE, PAGE, KV_HEADS, HEAD_DIM, dtype=t.dtype, device=t.device)
        pool[order] = t.transpose(1, 2).reshape(b * n // PAGE, PAGE, KV_HEADS, HEAD_DIM)
        pools.append(pool)
    return q, *pools, order.reshape(b, n // PAGE).to(torch.int32)


def _keeps(name: str, keys: int, device: str) -> torch.Tensor:
    """The last query's keys, a boolean [keys]."""
    k = torch.arange(keys, device=device)
    if name == "causal":
        return torch.ones(keys, dtype=torch.bool, device=device)
    return (keys - 1 - k < WINDOW) | (k < SINKS)


def _peers(name: str, keys: int, device: str) -> dict[str, Callable | str]:
    """Each peer's call on (q, k, v), or why it declines."""
    peers: dict[str, Callable | str] = {}
    keep = _keeps(name, keys, device)
    mask = None if name == "causal" else keep[None, None, None, :]

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    peers["sdpa"] = sdpa
    if device != "cuda":
        peers["flex"] = "needs CUDA (inductor's CPU build cannot compile it here)"
    else:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        offset = keys - 1  # the query's position

        def mask_mod(b, h, q_idx, kv_idx):
            seen = kv_idx <= q_idx + offset
            if name == "causal":
                return seen
            return seen & ((q_idx + offset - kv_idx < WINDOW) | (kv_idx < SINKS))

        block_mask = create_block_mask(mask_mod, None, None, 1, keys, device=device)
        flex = torch.compile(flex_attention, dynamic=False)
        peers["flex"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=True)
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        peers["flash"] = "flash_attn is not installed"
    else:
        if name == "causal":
            peers["flash"] = lambda q, k, v: flash_attn_with_kvcache(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True
            ).transpose(1, 2)
        else:
            peers["flash"] = "no attention sinks"
    return peers


@contextlib.contextmanager
def _splits(value: int | None) -> Iterator[None]:
    old = os.environ.get("ATTNCC_DECODE_SPLITS")
    if value is None:
        os.environ.pop("ATTNCC_DECODE_SPLITS", None)
    else:
        os.environ["ATTNCC_DECODE_SPLITS"] = str(value)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("ATTNCC_DECODE_SPLITS", None)
        else:
            os.environ["ATTNCC_DECODE_SPLITS"] = old


def run(device: str, runs: int, budget: float) -> list[dict]:
    scale = 1 if device == "cuda" else 256
    rows = []
    start = time.monotonic()
    for name, keys, batch in _cases(scale):
        if time.monotonic() - start > budget:
            print(f"out of time ({budget:.0f} s): {name}-{keys}-B{batch} and the cases after it not run")
            break
        inputs = _inputs(batch, keys, device)
        pattern = _pattern(name)

        def ours(x, pattern=pattern):
            return attncc.attention(*x, pattern)

        with torch.no_grad(), _splits(None):
            want = ours(inputs[0])
            timing = measure(ours, inputs, device, warmup=min(5, runs), runs=runs)
        kern = decode.kernel(
            str(pattern), keys, 1, HEADS, KV_HEADS, HEAD_DIM, torch.bfloat16, device, "softmax"
        )
        model = decode.splits(kern.plan, batch, KV_HEADS, torch.device(device))
        row = {"case": f"{name}-{keys}-B{batch}", "attncc": timing.median, "splits": model,
               "first": timing.first_call, "peers": {}, "sweep": {}}  # fmt: skip
        paged = [_paged(*x) for x in inputs]

        def ours_paged(x, pattern=pattern):
            return attncc.attention(x[0], x[1], x[2], pattern, block_table=x[3])

        with torch.no_grad():
            err = (ours_paged(paged[0]).float() - want.float()).abs().max().item()
            assert err <= 1e-2 * want.float().abs().max().item(), f"paged differs by {err}"
            row["paged"] = measure(ours_paged, paged, device, warmup=min(5, runs), runs=runs).median
        tol = 3e-2 * want.float().abs().max().item()
        for peer, call in _peers(name, keys, device).items():
            if isinstance(call, str):
                row["peers"][peer] = call
                continue
            try:
                with torch.no_grad():
                    got = call(*inputs[0])
                    err = (got.float() - want.float()).abs().max().item()
                    if err > tol:
                        row["peers"][peer] = f"differs from attncc by {err:.3g} (> {tol:.3g})"
                        continue
                    timed = measure(
                        lambda x, call=call: call(*x), inputs, device, warmup=min(5, runs), runs=runs
                    )
                    row["peers"][peer] = timed.median
            except Exception as e:  # a peer that fails is listed with its reason; the run goes on
                row["peers"][peer] = f"failed: {type(e).__name__}: {str(e)[:120]}"
        for splits in SPLITS:
            with torch.no_grad(), _splits(splits):
                row["sweep"][splits] = measure(ours, inputs, device, warmup=min(5, runs), runs=runs).median
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _ms(value: float | str) -> str:
    return f"{value * 1e3:.1f} us" if isinstance(value, float) else value


def _line(row: dict) -> str:
    peers = ", ".join(f"{p} {_ms(v)}" for p, v in row["peers"].items())
    sweep = ", ".join(f"{s}: {_ms(v)}" for s, v in row["sweep"].items())
    head = f"{row['case']}: attncc {_ms(row['attncc'])} ({row['splits']} splits), paged {_ms(row['paged'])}"
    return f"{head}; {peers}; splits {sweep}"


def markdown(rows: list[dict], device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter: tests the script)"
    peers = sorted({p for r in rows for p in r["peers"]})
    head = ["case", "attncc", "splits", f"attncc paged ({PAGE})", *peers, *(f"{s} splits" for s in SPLITS)]
    lines = [
        f"## Decode (issue 16 part 2), {datetime.date.today()}, {name}",
        "",
        f"`benchmarks/decode_bench.py`: one query of {HEADS} heads over {KV_HEADS} KV head, D = {HEAD_DIM},",
        "bf16; medians. `splits`: the cost model's count; the last columns fix it (ATTNCC_DECODE_SPLITS).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [r["case"], _ms(r["attncc"]), str(r["splits"]), _ms(r["paged"])]
        cells += [_ms(r["peers"].get(p, "-")) for p in peers]
        cells += [_ms(r["sweep"][s]) for s in SPLITS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--budget", type=float, default=360.0, help="seconds after which no case starts")
    parser.add_argument("--markdown", help="prepend the table to this results file")
    args = parser.parse_args()
    rows = run(args.device, args.runs, args.budget)
    if args.markdown:
        prepend(args.markdown, markdown(rows, args.device))


if __name__ == "__main__":
    main()
