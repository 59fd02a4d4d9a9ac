"""The split count of a decode launch (issue 16 part 2): how many programs share one program's
KV tiles (Note [Decode] in attncc.lower.decode).

Note [Split count]: a decode launch has ``B x H_kv x M_TILES`` programs before splitting, often
fewer than the 132 SMs of an H100 (one query of 8 heads over one KV head: 1 program), and each
streams its K/V tiles from DRAM, so a program's time is its tiles over the bandwidth it gets.
Splitting its ``T`` tiles into ``S`` runs of ``ceil(T / S)`` tiles gives ``S`` times the
programs; the model predicts, per ``S`` from 1 to ``min(T, MAX_SPLITS)``::

    P   = B x H_kv x M_TILES x S programs, R resident per SM (shared memory: the Q tile and
          num_stages K/V tiles), so W = ceil(P / (SMs x R)) waves of C = min(P, SMs x R)
    bw  = a program's bandwidth, the least of: the bytes its pipeline keeps in flight
          ((num_stages - 1) tiles) over the DRAM latency (Little's law); its SM's L2 bandwidth
          over the programs on that SM; the DRAM bandwidth over the C programs
    t   = W x (program_us + ceil(T / S) x tile bytes / bw)
          + (S > 1) x (merge_launch_us + the partial rows' bytes / DRAM bandwidth)

and takes the ``S`` of the least ``t`` (the fewest splits among equals). So a launch that fills
the machine without splitting is not split (FlashAttention's flash-decoding heuristic stops at
80% of the SMs, and weighs wave quantisation as ``W`` does here), a single program over 128K
keys is split until every SM streams (about 2 x 132 runs of 8 tiles at D = 128, bf16), and a
short cache is split only while the saved streaming pays for the merge's launch. ``T`` is the
plan's bound on one row's keys (``keys_bound``: a sliding window's, not the cache's) in tiles,
plus one per span its rows may straddle. Constants: attncc.autotune.constants.DECODE.
"""

from __future__ import annotations

import math

from attncc.autotune.constants import DECODE, DTYPE_BYTES, KERNEL, DeviceSpec
from attncc.autotune.cost import device_spec
from attncc.lower.decode import MAX_SPLITS, DecodePlan
from attncc.memo import memo


def shared_bytes(plan: DecodePlan) -> int:
    """Shared memory of one decode program: its Q rows and ``num_stages`` K and V tiles."""
    size = DTYPE_BYTES[plan.dtype]
    return (plan.block_m + 2 * plan.num_stages * plan.block_n) * plan.head_dim_padded * size


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
    concurrent = min(programs, slots)
    per_sm = math.ceil(concurrent / device.sms)
    in_flight = max(1, plan.num_stages - 1) * tile_bytes / DECODE.dram_latency_us  # bytes per us
    sm_share = DECODE.sm_bytes_per_clock * device.clock_ghz * 1e3 / per_sm
    dram_share = device.hbm_tbps * 1e6 / concurrent
    bandwidth = min(in_flight, sm_share, dram_share)
    run = math.ceil(tiles(plan) / splits)
    t = math.ceil(programs / slots) * (DECODE.program_us + run * tile_bytes / bandwidth)
    if splits > 1:
        rows = batch * kv_heads * plan.rows * splits
        t += DECODE.merge_launch_us + 2 * rows * plan.head_dim_padded * 4 / (device.hbm_tbps * 1e6)
    return t + KERNEL.launch_us


@memo
def split_count(plan: DecodePlan, batch: int, kv_heads: int, device: DeviceSpec | None = None) -> int:
    """The split count of the least predicted time (Note [Split count]); ``device`` defaults to
    the cost model's default GPU (an H100)."""
    device = device or device_spec()
    best, best_us = 1, math.inf
    for splits in range(1, min(tiles(plan), MAX_SPLITS) + 1):
        us = predict_us(plan, batch, kv_heads, splits, device)
        if us < best_us:
            best, best_us = splits, us
    return best
