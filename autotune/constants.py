"""Every number the cost model uses, and where it comes from.

Two kinds: facts about a device (vendor datasheets and the CUDA programming
guide's compute-capability tables), kept per device name so the model can rank
candidates on a machine with no GPU; and constants of our kernel (estimates,
each with its reasoning), which ``benchmarks/tune_check.py`` checks against
measurements on an H100.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceSpec:
    """One GPU as the cost model sees it (rates are whole-device, dense)."""

    name: str
    sms: int
    clock_ghz: float  # sustained clock under a tensor-core load, below the boost clock
    tensor_tflops: float  # dense fp16/bf16 tensor-core peak
    fp32_tflops: float  # non-tensor fp32 FMA peak (the fp32 kernel's dots run in IEEE fp32)
    hbm_tbps: float  # DRAM bandwidth
    l2_tbps: float  # L2 -> SM bandwidth, all SMs together
    smem_per_sm: int  # shared memory per SM, bytes
    smem_per_block: int  # the most one program may allocate
    regs_per_sm: int = 65536
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    mufu_per_clock: int = 16  # exp2 per clock per SM (special-function units)
    int_per_clock: int = 64  # int32 ops per clock per SM (the mask arithmetic)
    fp32_per_clock: int = 128  # fp32 ops per clock per SM (softmax bookkeeping)


# H100 SXM5 / H200 / H100 PCIe: NVIDIA H100 datasheet and Hopper tuning guide (228 KB shared
# memory per SM, 227 KB per block, 64K registers); H200 datasheet (same GH100 die, 4.8 TB/s).
# A100: the A100 datasheet and Ampere tuning guide (164 KB per SM, 163 KB per block). Sustained
# clocks: the H100 SXM runs about 1.75 GHz under sustained tensor-core load (boost 1.98 GHz).
# L2 bandwidth: published microbenchmarks of H100 measure 5.5 TB/s and more; A100 about 4 TB/s.
_KB = 1024
DEVICES = {
    "H200": DeviceSpec("H200", 132, 1.75, 989.0, 67.0, 4.8, 5.5, 228 * _KB, 227 * _KB),
    "H100 PCIE": DeviceSpec("H100 PCIe", 114, 1.62, 756.0, 51.0, 2.0, 4.5, 228 * _KB, 227 * _KB),
    "H100": DeviceSpec("H100 SXM", 132, 1.75, 989.0, 67.0, 3.35, 5.5, 228 * _KB, 227 * _KB),
    "A100": DeviceSpec("A100", 108, 1.41, 312.0, 19.5, 2.0, 4.0, 164 * _KB, 163 * _KB),
}
DEFAULT_DEVICE = "H100"  # what the model ranks for when no GPU is present


@dataclass(frozen=True)
class KernelConstants:
    """Constants of attncc's Triton forward kernel (estimates; see each field)."""

    # Fraction of tensor-core peak a Triton attention kernel reaches on its dots: Triton's
    # fused-attention tutorial reaches about half of H100's dense bf16 peak at D=128.
    tensor_efficiency: float = 0.55
    # fp32 ops per score element besides the dots: scale, running max, subtract, sum, rescale,
    # cast of P (online softmax, base 2); the exponential is one MUFU op.
    softmax_ops: int = 6
    # int32 ops per score element of a partial tile: the valid-key test, then per term and
    # axis two range comparisons (first/last forms of a few ops each) and the and/or.
    mask_ops_base: int = 6
    mask_ops_per_term_axis: int = 8
    # Per element of a table plan's partial tile: its rule is arbitrary (lookups, divisions);
    # a union of a band and a few global tokens costs about this much.
    mask_ops_table: int = 40
    # Per KV tile, cycles: the loop and tile-index decode (integer divisions), the full/partial
    # branch and the barriers around the shared-memory K and V tiles (a few hundred cycles).
    tile_overhead_cycles: int = 250
    # Per program: index arithmetic, Q load and O/LSE store latency not hidden by other work,
    # microseconds (a program's prologue and epilogue take a few thousand cycles).
    program_overhead_us: float = 1.5
    empty_program_us: float = 0.15  # a program of a smaller dilation group that exits at once
    # Registers per thread besides the accumulators (pointers, indices, row statistics).
    base_registers: int = 48
    max_registers: int = 255  # per thread; more spills to local memory
    # Launch latency of one kernel as CUDA events measure it (a few microseconds).
    launch_us: float = 4.0


KERNEL = KernelConstants()


@dataclass(frozen=True)
class DecodeConstants:
    """Constants of the decode kernels (Note [Split count] in attncc.autotune.decode; estimates,
    each with its reasoning, until a GPU measures them)."""

    # Per program, microseconds: the Q rows' load, the spans' reductions (or the list's count),
    # the pipeline's prologue (the first tiles' loads wait one DRAM latency before any dot) and
    # the partial rows' store: about one DRAM round trip and a few hundred cycles.
    program_us: float = 1.0
    # The latency a program's K/V loads wait on, microseconds: HBM3's 0.6-0.8 when idle, more
    # when every SM streams (the decode kernels' case); with 2 of 3 stages' 32 KiB tiles in
    # flight a program then streams about 65 GB/s, so some 50 programs fill an H100's 3.35 TB/s.
    dram_latency_us: float = 1.0
    # What one SM moves from L2 per clock (sm_90: 64 bytes), shared by its resident programs.
    sm_bytes_per_clock: int = 64
    # The merge of split rows: one more launch (KernelConstants.launch_us), and every partial
    # row (float32, the head dim padded) read once from DRAM.
    merge_launch_us: float = 4.0


DECODE = DecodeConstants()
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}

# Note [Term costs]: what each score term (attncc.ir.score) adds to a forward tile, per score
# element. ``TERM_OPS``: lane operations, the unit of KernelConstants.softmax_ops (SASS
# instructions issued per warp x 32 lanes / the tile's scores), measured from the sm_90 static
# profile, benchmarks/STATIC.md "Score terms" (``benchmarks/static_profile.py --terms-only``):
# the *per score* column of the forward's loop, the term's case over the same case without
# terms, bf16, head dim 128, 128x64 tiles on 8 warps (the 2-D neighborhood's 8x16 / 8x8 boxes),
# triton 3.6.0, the GPU machines' (tests/test_autotune.py holds them to that table):
#   temperature   causal-4096+temperature, full loop: the multiply, its load
#   softcap       causal-4096+softcap, full: c * tanh.approx(s / c) and the units' scaling
#   alibi         causal-4096+alibi, full: the flat distance in float32, times the slope
#   alibi axes    na2d-64x64-w13+alibi-axes, partial (the plan has no full loop): per axis
#   rel_pos_bias  na2d-64x64-w13+rpb, partial: the table index per axis, the gather
#   query_bias    causal-4096+query-bias, full: one add (the row's value is loaded per tile)
#   key_bias      causal-4096+key-bias, full: the column's load and add
#   bias          dense-2048+bias, full: the [M, N] tile's load and add
#   dropout       causal-4096+dropout, full: Philox (7 rounds) per pair, the threshold, the scaling
# triton 3.9.0's figures are within 0.3 of these. Terms add up, if not exactly: softcap + alibi
# add 6.97 where the two alone add 8.25 (they share the scaled score's conversions). ``TERM_MUFU``: the
# special-function operations (16 per clock per SM) per score: the soft-cap's tanh.approx on
# a GPU (the profile's MUFU count per tile doubles), or 2 sigmoid(2 x) - 1 (an exp2 and a
# reciprocal) on fp32's exact path. ``TERM_REGISTERS``: registers per thread the term adds to
# the same forward in the same profile, 0 where it took fewer (:func:`attncc.autotune.cost.registers`).
TERM_OPS = {
    "temperature": 0.97,
    "softcap": 4.28,
    "alibi": 3.97,
    "alibi axes": 2.84,
    "rel_pos_bias": 7.75,
    "query_bias": 0.94,
    "key_bias": 2.81,
    "bias": 3.81,
    "dropout": 29.94,
}
TERM_MUFU = {"softcap": 1, "softcap exact": 2}
TERM_REGISTERS = {
    "temperature": 0,
    "softcap": 0,
    "alibi": 38,
    "alibi axes": 8,
    "rel_pos_bias": 53,
    "query_bias": 2,
    "key_bias": 0,
    "bias": 30,
    "dropout": 52,
}
