"""The cost model and the score terms (issue 17, Note [Term costs] in attncc.autotune.constants):
each term's constants are the static profile's figures, and a plan with terms predicts what
they add (operations, special functions, registers, a bias's loads and shared memory)."""

import math

import numpy as np
import pytest
from conftest import REPO

from attncc.autotune.constants import TERM_OPS, TERM_REGISTERS
from attncc.autotune.cost import TileCounts, device_spec, predict, registers, shared_bytes
from attncc.autotune.space import search_space
from attncc.ir import Grid, causal, dense, neighborhood
from attncc.lower.lowering import LaunchConfig, lower

H100 = device_spec("NVIDIA H100 80GB HBM3")
PINNED = "3.6.0"  # the triton of the GPU machines, whose figures the constants are
# Each constant's case and forward loop in benchmarks/STATIC.md's "Score terms" table.
SOURCES = {
    "temperature": ("causal-4096+temperature", "full"),
    "softcap": ("causal-4096+softcap", "full"),
    "alibi": ("causal-4096+alibi", "full"),
    "alibi axes": ("na2d-64x64-w13+alibi-axes", "partial"),
    "rel_pos_bias": ("na2d-64x64-w13+rpb", "partial"),
    "query_bias": ("causal-4096+query-bias", "full"),
    "key_bias": ("causal-4096+key-bias", "full"),
    "bias": ("dense-2048+bias", "full"),
    "dropout": ("causal-4096+dropout", "full"),
}


def _forward_rows() -> dict[tuple[str, str], tuple[int, float | None]]:
    """(case, loop) -> (registers, per score) of the forward kernels in the pinned triton's table."""
    text = (REPO / "benchmarks" / "STATIC.md").read_text()
    section = text.split(f"## triton {PINNED}\n", 1)[1].split("\n## triton ", 1)[0]
    table = section.split("### Score terms", 1)[1]
    rows, case, kernel, regs = {}, "", "", 0
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 12 or not cells[7] or cells[0] == "case" or set(cells[0]) == {"-"}:
            continue
        case, kernel = cells[0] or case, cells[2] or kernel
        regs = int(cells[5]) if cells[5] else regs
        if kernel == "fwd":
            rows[(case, cells[7])] = (regs, None if cells[10] == "-" else float(cells[10]))
    return rows


def test_term_constants_are_the_static_profiles_figures():
    rows = _forward_rows()
    assert set(SOURCES) == set(TERM_OPS) == set(TERM_REGISTERS)
    for name, (case, loop) in SOURCES.items():
        regs, per_score = rows[(case, loop)]
        plain_regs, _ = rows[(case.split("+")[0] + "+softmax", loop)]
        assert TERM_OPS[name] == pytest.approx(per_score, abs=0.006), name
        assert TERM_REGISTERS[name] == max(0, regs - plain_regs), name


CONFIG = LaunchConfig(128, 64, 8, 3)


def _predict(score: str, pattern=None, grid=None):
    """A plan of ``score`` (causal on 4096 tokens unless given) and its prediction, 12 of each
    program's 16 tiles full."""
    pattern, grid = pattern or causal(), grid or Grid((4096,))
    plan = lower(pattern, grid, 128, "bfloat16", score=score, config=CONFIG)
    n = math.prod(plan.q_tiles())
    return plan, predict(plan, TileCounts(np.full(n, 16), np.full(n, 12)), 16, H100)


def test_each_term_adds_its_cost_and_terms_add_up():
    _, plain = _predict("softmax")
    costs = {}
    for score in ("temperature", "softcap(50.0)", "alibi", "query_bias", "key_bias", "bias", "dropout"):
        _, p = _predict(score)
        costs[score] = p.us - plain.us
        assert costs[score] > 0, score
    assert max(costs, key=costs.__getitem__) == "dropout"  # Philox per pair: 30 operations a score
    _, both = _predict("softcap(50.0) + alibi")
    assert both.us - plain.us == pytest.approx(costs["softcap(50.0)"] + costs["alibi"], rel=0.05)


def test_a_dense_bias_adds_its_tile_to_loads_shared_memory_and_dram():
    plain, p_plain = _predict("softmax", dense(), Grid((2048,)))
    biased, p_bias = _predict("bias", dense(), Grid((2048,)))
    assert shared_bytes(biased) - shared_bytes(plain) == 2 * 128 * 64 * 4  # 3 stages: two tiles ahead
    tile = 128 * 64 * 2  # bf16, once per visited tile
    assert p_bias.bytes_moved - p_plain.bytes_moved == p_bias.visited * tile
    assert registers(biased) == registers(plain) + TERM_REGISTERS["bias"]


def test_a_terms_registers_and_tiles_leave_candidates_out_of_the_space():
    p, g = neighborhood(13), Grid((64, 64))
    plain = search_space(p, g, 128, "bfloat16", H100)
    table = search_space(p, g, 128, "bfloat16", H100, score="rel_pos_bias(25, 25)")
    assert 0 < len(table) < len(plain)  # the table's registers and gathered tiles do not fit every one
    assert all(shared_bytes(plan) <= H100.smem_per_block for _, plan in table)
