"""The split count of a decode launch (issue 16 part 2): how many programs share one program's
KV tiles (Note [Decode] in attncc.lower.decode).

Note [Split count]: a decode launch has ``B x H_kv x M_TILES`` programs before splitting, often
fewer than the 132 SMs of an H100 (one query of 8 heads over one KV head: 1 program), and each
streams its K/V tiles from DRAM. Splitting a program's ``T`` tiles into ``S`` runs of
``ceil(T / S)`` tiles gives ``S`` times the programs; the model predicts, per ``S`` from 1 to
``min(T, MAX_SPLITS)``, the larger of two bounds::

    P      = B x H_kv x M_TILES x S programs, R resident per SM (shared memory: the Q tile and
             the pipeline's K/V buffers), so W = ceil(P / (SMs x R)) waves
    dram   = P x ceil(T / S) x tile bytes / the DRAM bandwidth
    stream = W x (program_us + ceil(T / S) x tile bytes / bw), bw the least of: the bytes a
             program's pipeline keeps in flight ((num_stages - 1) tiles) over the DRAM latency
             (Little's law), and its SM's L2 bandwidth over the programs resident on it
    t      = max(dram, stream) + (S > 1) x (merge_launch_us + the partial rows' bytes / DRAM)

and takes, among the ``S`` within 2% of the least ``t`` (where the model cannot tell them
apart: past the DRAM bound more programs only share it), the fewest that run a program on
every SM, else the one that runs the most SMs. So a launch that fills the machine without
splitting is not split (FlashAttention's flash-decoding heuristic stops at 80% of the SMs and
weighs wave quantisation as ``W`` does here), a single program over 128K keys is split over
every SM (137 runs of 15 tiles at D = 128, bf16), and a short cache is split only while the
saved streaming pays for the merge. ``T`` is the plan's bound on one row's keys (``keys_bound``:
a sliding window's, not the cache's) in tiles, plus one per span its rows may straddle.
Constants: attncc.autotune.constants.DECODE, estimates until a GPU measures them
(``bench-decode`` in benchmarks/gpu_check.sh times the model's count beside others).
"""

from __future__ import annotations

import math

from attncc.autotune.constants import DECODE, DTYPE_BYTES, KERNEL, DeviceSpec
from attncc.autotune.cost import device_spec
from attncc.lower.decode import MAX_SPLITS, DecodePlan
from attncc.memo import memo


def shared_bytes(plan: DecodePlan) -> int:
    """Shared memory of one decode program: its Q rows and ``num_stages - 1`` K and V tiles (the
    buffers of Triton's cp.async pipeline; sm_90, bf16, D = 128, 64-key tiles in 3 stages: 70
    KiB, benchmarks/STATIC.md "Decode")."""
    size = DTYPE_BYTES[plan.dtype]
    return (plan.block_m + 2 * max(1, plan.num_stages - 1) * plan.block_n) * plan.head_dim_padded * size


def tiles(plan: DecodePlan) -> int:
    """The KV tiles one program's rows may see: its keys bound (widened by the queries' spread)
    in tiles, and a tile more per span for a start inside a tile."""
    keys = min(plan.keys, plan.keys_bound + plan.queries - 1)
    return min(plan.kv_tiles, math.ceil(keys / plan.block_n) + max(1, len(plan.spans)))


def predict_us(plan: DecodePlan, batch: int, kv_heads: int, splits: int, device: DeviceSpec) -> float:
    """The model's time of a launch of ``splits`` splits (Note [Split count]), microseconds."""
    size = DTYPE_BYTES[plan.dtype]
    tile_bytes = 2 * plan.block_n * plan.head_dim_padded * size
    resident = max(1, min(device.smem_per_sm // (shared_bytes(plan) + 1024), device.blocks_per_sm))
    programs = batch * kv_heads * plan.m_tiles * splits
    slots = device.sms * resident
    per_sm = math.ceil(min(programs, slots) / device.sms)
    in_flight = max(1, plan.num_stages - 1) * tile_bytes / DECODE.dram_latency_us  # bytes per us
    bandwidth = min(in_flight, DECODE.sm_bytes_per_clock * device.clock_ghz * 1e3 / per_sm)
    run = math.ceil(tiles(plan) / splits)
    dram = programs * run * tile_bytes / (device.hbm_tbps * 1e6)
    stream = math.ceil(programs / slots) * (DECODE.program_us + run * tile_bytes / bandwidth)
    t = max(dram, stream)
    if splits > 1:
        rows = batch * kv_heads * plan.rows * splits
        t += DECODE.merge_launch_us + 2 * rows * plan.head_dim_padded * 4 / (device.hbm_tbps * 1e6)
    return t + KERNEL.launch_us


TIE = 1.02  # predicted times this close are the model's tie (Note [Split count])


@memo
def split_count(plan: DecodePlan, batch: int, kv_heads: int, device: DeviceSpec | None = None) -> int:
    """The split count the model picks (Note [Split count]); ``device`` defaults to the cost
    model's default GPU (an H100)."""
    device = device or device_spec()
    counts = range(1, min(tiles(plan), MAX_SPLITS) + 1)
    times = {s: predict_us(plan, batch, kv_heads, s, device) for s in counts}
    best = min(times.values())
    programs = batch * kv_heads * plan.m_tiles
    return min(
        (s for s in counts if times[s] <= best * TIE), key=lambda s: (-min(programs * s, device.sms), s)
    )
