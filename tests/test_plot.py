"""The picture of `attncc analyze --png`: what each panel shows, read back from the figure."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from attncc.ir import Grid, analyze, axial, neighborhood, per_head
from attncc.ir.analysis import head_groups
from attncc.ir.spec import Spec
from attncc.lower.lowering import LaunchConfig, lower
from attncc.plot import figure


def _figure(spec: Spec, tile=128):
    """The figure `attncc analyze --png` draws: the first tiling, every head group's GPU plan."""
    tiled = analyze(spec.pattern, spec.grid, tile, tile, heads=spec.heads)
    config = LaunchConfig.default("cuda", spec.head_dim, spec.dtype)
    groups = head_groups(spec.pattern, spec.grid, spec.heads)
    plans = [(g, lower(g.pattern, spec.grid, spec.head_dim, spec.dtype, config=config)) for g in groups]
    return figure(spec, tiled, plans), plans


def _rows(fig):
    """Per row of panels (one per head group): its label and its panels (colorbars apart)."""
    rows = []
    for sub in fig.subfigs:
        panels = [ax for ax in sub.axes if ax.get_label() != "<colorbar>"]
        rows.append((sub.get_suptitle(), panels, [ax for ax in sub.axes if ax not in panels]))
    return rows


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_the_kernel_box_tiling_is_drawn_beside_the_flat_one_in_the_users_rank():
    spec = Spec(neighborhood(7), Grid((20, 24)), heads=2, head_dim=64, name="na2d")
    fig, plans = _figure(spec)
    [(label, panels, colorbars)] = _rows(fig)
    assert label == ""  # one head group: no row label
    _, flat, kernel, keys = panels
    assert flat.get_title().startswith("tiles q 128 flat / kv 128 flat")
    plan = plans[0][1]
    box = "x".join(map(str, plan.q_tile[1:])), "x".join(map(str, plan.kv_tile[1:]))
    assert kernel.get_title().startswith(f"kernel tiles q {box[0]} / kv {box[1]} (range)")
    [image] = kernel.get_images()
    shown = image.get_array()
    assert shown.shape == (np.prod(plan.q_tiles()), np.prod(plan.kv_tiles()))  # the plan's boxes
    assert "tile bound" in kernel.get_title()
    assert [c.get_ylabel() for c in colorbars] == ["kept"]  # 480 tokens: the exact mask
    assert keys.get_title().startswith("keys of query (10, 12)")


def test_the_kept_fraction_has_a_colorbar():
    spec = Spec(neighborhood(31), Grid((40, 40)), heads=1, name="na2d")  # 1,600 tokens: 4x4 blocks
    fig, _ = _figure(spec)
    [(_, panels, colorbars)] = _rows(fig)
    assert panels[0].get_title() == "kept fraction per 4x4 block of tokens"
    assert [c.get_ylabel() for c in colorbars] == ["kept fraction"]
    assert fig.get_suptitle() == "na2d: grid 40x40, 1 head"


def test_per_head_patterns_get_one_labelled_row_per_head_group():
    pattern = per_head([neighborhood(3), neighborhood(3, dilation=2), axial(), neighborhood(3)])
    spec = Spec(pattern, Grid((12, 12)), heads=4, head_dim=32, name="mix")
    fig, _ = _figure(spec)
    rows = _rows(fig)
    assert [label for label, _, _ in rows] == [
        "heads 0, 3: neighborhood(window=3)",
        "head 1: neighborhood(window=3, dilation=2)",
        "head 2: axial()",
    ]
    masks = [panels[0].get_images()[0].get_array() for _, panels, _ in rows]
    assert not np.array_equal(masks[0], masks[2])  # each row its own head's mask, not head 0's
    dilated = rows[1][1][2]
    assert "dilation groups" in dilated.get_title() and "dilation groups" in dilated.get_xlabel()


def test_a_3d_causal_pattern_shows_its_frames():
    causal_time = neighborhood((3, 5, 5), causal=(True, False, False))
    spec = Spec(causal_time, Grid((6, 8, 8)), heads=1, head_dim=32, name="video")
    fig, _ = _figure(spec)
    [(_, panels, _)] = _rows(fig)
    mask, flat, _, keys = panels
    for panel in (mask, flat):
        assert "red lines: frames" in panel.get_xlabel()
        assert len(panel.get_lines()) == 2 * (6 - 1)  # between the 6 frames, down and across
    assert "frame by frame" in keys.get_title()
    labels = [t.get_text() for t in keys.texts]
    # The query is in frame 3; causal in time with a window of 3: frames 1-3 hold keys, and
    # the frames on either side are shown empty (0 and 4: the window stops; 4 is the future).
    assert labels == ["t=0", "t=1", "t=2", "t=3 (query)", "t=4"]
