"""A text-beside-video attention block (issue 16 part 4's benchmark), as HunyuanVideo and MM-DiT
video transformers run it: 256 text tokens beside a 30 x 48 x 80 video; text queries see every
token, video queries a 3-D neighborhood of the video and every text token.

    python benchmarks/text_video_block.py [--device cuda] [--markdown benchmarks/RESULTS.md]

attncc runs it two ways: as one kernel per direction over a token space of segments (``by_segments``:
Note [Segment kernels] in attncc.lower.segments; the text a run of tokens, the video tiled in
boxes), and as two calls: the video queries through ``attncc.natten.na3d`` with the text as
NATTEN's ``additional_keys`` (the neighborhood kernels and a log-sum-exp merge), the text queries
as cross-attention over every token (``q_grid=``, ``dense()``). Peers on the same tensors:
FlexAttention with one ``mask_mod`` over the sequence of text then video (compiled, with its
block mask, built once and not timed), and NATTEN's ``na3d`` with ``additional_keys`` plus SDPA for
the text rows where NATTEN is installed. Every output must agree with attncc's (bf16: 3e-2 of the
largest magnitude) before it is timed (``attncc.timing.measure``: medians, first call apart).
On the CPU (``--device cpu``, under ``TRITON_INTERPRET=1``) the block is tiny (5 text tokens, a
3 x 4 x 6 video, fp32) and attncc's output is checked against a float64 masked softmax of the
block's rule: that tests the script, not the kernels' speed.
"""

from __future__ import annotations

import argparse
import datetime
import math

import torch

import attncc
import attncc.natten
from attncc.bench.report import prepend
from attncc.ir import by_segments, dense, neighborhood, segments
from attncc.timing import measure

GPU = dict(text=256, video=(30, 48, 80), window=(7, 15, 15), heads=24, head_dim=128, dtype=torch.bfloat16)
CPU = dict(text=5, video=(3, 4, 6), window=(3, 3, 5), heads=2, head_dim=16, dtype=torch.float32)


def _inputs(shape: dict, device: str, batch: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    heads, d, dtype = shape["heads"], shape["head_dim"], shape["dtype"]

    def t(*dims: int) -> torch.Tensor:
        return torch.randn(batch, *dims, heads, d, generator=gen, device=device, dtype=dtype)

    return {name: t(shape["text"]) for name in ("qt", "kt", "vt")} | {
        name: t(*shape["video"]) for name in ("qv", "kv", "vv")
    }


def _all(x: dict[str, torch.Tensor], side: str) -> torch.Tensor:
    """Text then video tokens of q, k or v: ``[B, text + video, heads, D]``."""
    return torch.cat([x[f"{side}t"], x[f"{side}v"].flatten(1, 3)], 1)


def attncc_block(x: dict[str, torch.Tensor], window: tuple[int, ...]) -> torch.Tensor:
    """The block's output for every token, text then video, ``[B, text + video, heads, D]``."""
    video = attncc.natten.na3d(
        x["qv"], x["kv"], x["vv"], kernel_size=window, additional_keys=x["kt"], additional_values=x["vt"]
    )
    n_text = x["qt"].shape[1]
    text = attncc.attention(x["qt"], _all(x, "k"), _all(x, "v"), dense(), q_grid=n_text, layout="spatial")
    return torch.cat([text, video.flatten(1, 3)], 1)


def segments_block(x: dict[str, torch.Tensor], window: tuple[int, ...]) -> torch.Tensor:
    """The block as one kernel over the space of its two segments, ``[B, text + video, heads, D]``."""
    space = segments(text=x["qt"].shape[1], video=tuple(x["qv"].shape[1:4]))
    pattern = by_segments(
        space, {("text", "*"): dense(), ("video", "video"): neighborhood(window), ("video", "text"): dense()}
    )
    q, k, v = (_all(x, s).transpose(1, 2) for s in "qkv")
    return attncc.attention(q, k, v, pattern).transpose(1, 2)


def _keep(q_idx, kv_idx, n_text: int, video: tuple[int, ...], window: tuple[int, ...]):
    """The block's rule on flat indices of the text-then-video sequence (NATTEN's neighborhood:
    a window clamped into the video)."""
    text_q, text_k = q_idx < n_text, kv_idx < n_text
    qv, kv = (q_idx - n_text).clamp(min=0), (kv_idx - n_text).clamp(min=0)
    near = torch.ones_like(text_q)
    for axis in range(3):
        stride = math.prod(video[axis + 1 :])
        qc, kc = (qv // stride) % video[axis], (kv // stride) % video[axis]
        start = (qc - window[axis] // 2).clamp(min=0, max=video[axis] - window[axis])
        near = near & (kc >= start) & (kc < start + window[axis])
    return text_q | text_k | near


def reference_block(x: dict[str, torch.Tensor], window: tuple[int, ...]) -> torch.Tensor:
    """A float64 masked softmax of the block's rule (small blocks only: it materialises every pair)."""
    q, k, v = (_all(x, s).double().transpose(1, 2) for s in "qkv")
    n = q.shape[2]
    idx = torch.arange(n, device=q.device)
    keep = _keep(idx[:, None], idx[None, :], x["qt"].shape[1], tuple(x["qv"].shape[1:4]), window)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return (scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v).transpose(1, 2)


def _flex(x: dict[str, torch.Tensor], window: tuple[int, ...]):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n_text, video = x["qt"].shape[1], tuple(x["qv"].shape[1:4])
    n = n_text + math.prod(video)

    def mask_mod(b, h, q_idx, kv_idx):
        return _keep(q_idx, kv_idx, n_text, video, window)

    block_mask = create_block_mask(mask_mod, None, None, n, n, device="cuda", _compile=True)
    compiled = torch.compile(flex_attention, dynamic=False)

    def call(y):
        q, k, v = (_all(y, s).transpose(1, 2) for s in "qkv")
        return compiled(q, k, v, block_mask=block_mask).transpose(1, 2)

    return call


def _natten(window: tuple[int, ...]):
    from natten.functional import na3d

    def call(y):
        video = na3d(y["qv"], y["kv"], y["vv"], kernel_size=window, additional_keys=y["kt"],
                     additional_values=y["vt"])  # fmt: skip
        q, k, v = y["qt"].transpose(1, 2), _all(y, "k").transpose(1, 2), _all(y, "v").transpose(1, 2)
        text = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return torch.cat([text, video.flatten(1, 3)], 1)

    return call


def run(device: str, runs: int) -> dict:
    shape = GPU if device == "cuda" else CPU
    window = shape["window"]
    inputs = [_inputs(shape, device) for _ in range(2)]
    with torch.no_grad():
        want = attncc_block(inputs[0], window)
        row: dict = {"shape": shape, "peers": {}}
        if device != "cuda":
            err = (want.double() - reference_block(inputs[0], window)).abs().max().item()
            assert err <= 1e-5 * want.abs().max().item(), f"attncc differs from the reference by {err}"
            row["reference error"] = err
        ours = measure(lambda y: attncc_block(y, window), inputs, device, warmup=min(3, runs), runs=runs)
        row["attncc"] = ours.median
        one = segments_block(inputs[0], window)
        err = (one.float() - want.float()).abs().max().item()
        tol = (1e-5 if shape["dtype"] == torch.float32 else 3e-2) * want.float().abs().max().item()
        assert err <= tol, f"attncc's one kernel differs from its two calls by {err:.3g} (> {tol:.3g})"
        one_kernel = measure(
            lambda y: segments_block(y, window), inputs, device, warmup=min(3, runs), runs=runs
        )
        row["attncc one kernel"] = one_kernel.median
        peers = {"flex": _flex, "natten": _natten} if device == "cuda" else {}
        for name, make in peers.items():
            try:
                call = make(inputs[0], window) if name == "flex" else make(window)
                err = (call(inputs[0]).float() - want.float()).abs().max().item()
                tol = 3e-2 * want.float().abs().max().item()
                if err > tol:
                    row["peers"][name] = f"differs from attncc by {err:.3g} (> {tol:.3g})"
                    continue
                row["peers"][name] = measure(call, inputs, device, warmup=min(3, runs), runs=runs).median
            except Exception as e:  # a peer that cannot run is listed with its reason
                row["peers"][name] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    return row


def _ms(value: float | str) -> str:
    return f"{value:.2f} ms" if isinstance(value, float) else value  # attncc.timing: milliseconds


def markdown(row: dict, device: str) -> str:
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter: tests the script)"
    s = row["shape"]
    video = "x".join(map(str, s["video"]))
    head = ["attncc (one kernel)", "attncc (two calls)", *row["peers"]]
    cells = [_ms(row["attncc one kernel"]), _ms(row["attncc"]), *(_ms(v) for v in row["peers"].values())]
    return "\n".join([
        f"## Text beside video (issue 16 part 4), {datetime.date.today()}, {name}",
        "",
        f"`benchmarks/text_video_block.py`: {s['text']} text tokens + a {video} video, window "
        f"{'x'.join(map(str, s['window']))}, {s['heads']} heads, D = {s['head_dim']}, {s['dtype']};",
        "attncc as one kernel per direction over the space of segments (by_segments), and as two calls",
        "(na3d with the text as additional keys; the text rows as cross-attention).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        "| " + " | ".join(cells) + " |",
        "",
        "",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--markdown", help="prepend the table to this results file")
    args = parser.parse_args()
    row = run(args.device, args.runs)
    print(markdown(row, args.device))
    if args.markdown:
        prepend(args.markdown, markdown(row, args.device))


if __name__ == "__main__":
    main()
