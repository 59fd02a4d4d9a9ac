"""attncc.timing on the CPU: rotation, warm-up and the first call kept apart."""

import pytest

from attncc.timing import measure, peak_memory


def test_measure_rotates_inputs_and_separates_first_call():
    seen = []
    t = measure(seen.append, [0, 1, 2], "cpu", warmup=2, runs=7)
    assert seen == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]  # first, 2 warm-up, 7 timed: all three in turn
    assert t.runs == 7 and t.median >= 0 and t.spread >= 0 and t.first_call >= 0


def test_measure_needs_inputs():
    with pytest.raises(ValueError, match="at least one input"):
        measure(lambda x: x, [], "cpu")


def test_peak_memory_is_none_on_cpu():
    assert peak_memory(lambda: None, "cpu") is None
