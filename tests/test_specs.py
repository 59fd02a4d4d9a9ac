"""Every shipped spec loads, covers every primitive, and small ones match brute force."""

import json

import pytest
import yaml
from conftest import SPECS

from attncc.ir import analyze, load_spec, to_graph
from attncc.ir.analysis import head_groups
from attncc.ir.mask import mask
from attncc.ir.nodes import PRIMITIVES, RuntimePrimitive
from attncc.lower.lowering import LaunchConfig, lower
from attncc.lower.visits import tile_map, visited_tiles

SPEC_FILES = sorted(p for p in SPECS.iterdir() if p.suffix in (".yaml", ".yml", ".json"))


def test_specs_cover_every_static_primitive():
    # Those with data given at call time have no mask to analyse here: tests/test_runtime_patterns.py.
    static = {name for name, cls in PRIMITIVES.items() if not issubclass(cls, RuntimePrimitive)}
    used = {node.NAME for path in SPEC_FILES for node in to_graph(load_spec(path).pattern)}
    assert static <= used, f"no spec uses {static - used}"


@pytest.mark.parametrize("path", SPEC_FILES, ids=[p.name for p in SPEC_FILES])
def test_spec_loads_and_analyses(path):
    spec = load_spec(path)
    raw = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    assert list(spec.grid.shape) == raw["grid"]
    a = analyze(spec.pattern, spec.grid, 64, 64, heads=spec.heads, head_dim=spec.head_dim)
    assert 0 < a.density <= 1
    if spec.grid.size <= 4096:  # brute force is O(N^2) memory
        m = mask(spec.pattern, spec.grid, spec.heads)
        assert a.kept_pairs == int(m.sum()) * (spec.heads // m.shape[0])


def _plans(spec, device):
    config = LaunchConfig.default(device, spec.head_dim, spec.dtype)
    for group in head_groups(spec.pattern, spec.grid, spec.heads):
        yield group.pattern, lower(group.pattern, spec.grid, spec.head_dim, spec.dtype, config=config)


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("path", SPEC_FILES, ids=[p.name for p in SPEC_FILES])
def test_the_plans_tile_bound_is_at_least_one(path, device):
    """Note [Kernel tile bound]: a range plan's visited and dense tile pairs are both counted
    in its boxes, so it visits no more than the dense pattern would (GPU and interpreter
    tiles). A table plan's entries are the non-empty tiles of those boxes by construction."""
    spec = load_spec(path)
    for pattern, plan in _plans(spec, device):
        if plan.iteration == "range":
            visited, dense = visited_tiles(plan)
            assert 0 < visited <= dense == tile_map(plan).size, (pattern, plan.q_tile, plan.kv_tile)
