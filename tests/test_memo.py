"""Per-process memos are bounded LRUs sized by ATTNCC_MEMO_SIZE (attncc.memo), and
forget_kernels() clears every one of them."""

import re
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, REPO

import attncc
from attncc import memo, settings
from attncc.errors import AttnccError
from attncc.ir import sliding_window
from attncc.lower import render
from attncc.runtime import cache, library, ops


def test_a_memo_keeps_the_most_recent_entries_and_drops_the_least_recently_used(monkeypatch):
    monkeypatch.setenv("ATTNCC_MEMO_SIZE", "2")
    calls = []

    @memo.memo
    def square(x: int) -> int:
        calls.append(x)
        return x * x

    assert [square(x) for x in (1, 2, 1, 3)] == [1, 4, 1, 9]  # 3 drops 2, the least recently used
    assert square.cache_info().currsize == 2
    square(1)
    square(2)
    assert calls == [1, 2, 3, 2]
    memo.forget_all()
    assert square.cache_info().currsize == 0


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "many", "1048577"])
def test_a_memo_size_out_of_range_is_an_error_naming_the_setting(monkeypatch, value):
    monkeypatch.setenv("ATTNCC_MEMO_SIZE", value)
    allowed = "allowed: an integer from 1 to 1048576"
    with pytest.raises(
        AttnccError, match=rf"^ATTNCC_MEMO_SIZE = '{re.escape(value)}' is out of range; {allowed}"
    ):
        settings.memo_size()


def test_the_memo_size_defaults_to_256_and_takes_the_ends_of_its_range(monkeypatch):
    monkeypatch.delenv("ATTNCC_MEMO_SIZE", raising=False)
    assert settings.memo_size() == 256
    for value in ("1", "1048576"):
        monkeypatch.setenv("ATTNCC_MEMO_SIZE", value)
        assert settings.memo_size() == int(value)


def test_the_kernel_memos_are_bounded_and_forget_kernels_clears_them():
    q, k, v = (torch.randn(1, 1, 16, 16, device=DEVICE) for _ in "qkv")
    attncc.attention(q, k, v, sliding_window(3))
    kernel_memos = (library._launches, library._checked_text, ops.launches, ops.compiled, render.load)
    for cached in kernel_memos:
        assert cached.cache_info().maxsize == settings.memo_size()
        assert cached.cache_info().currsize > 0
    library.forget_kernels()
    assert all(cached.cache_info().currsize == 0 for cached in kernel_memos)


def test_every_unbounded_memo_says_why():
    """A plain functools.cache (or lru_cache(None)) must say why its keys are few and fixed."""
    unexplained = []
    for folder in ("attncc", "ir", "lower", "autotune"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                bare = re.match(
                    r"\s*@(functools\.)?(cache\s*($|#)|lru_cache\(\s*(maxsize\s*=\s*)?None\s*\))", line
                )
                if bare and "unbounded" not in line:
                    unexplained.append(f"{Path(path).relative_to(REPO)}:{number}: {line.strip()}")
    assert not unexplained, "use attncc.memo.memo, or say why the memo is unbounded:\n" + "\n".join(
        unexplained
    )


def test_bounded_dicts_keep_the_entries_used_last(monkeypatch):
    """The cache's entry and record memos (written as well as read) keep ATTNCC_MEMO_SIZE entries."""
    monkeypatch.setenv("ATTNCC_MEMO_SIZE", "2")
    memo_dict = memo.Bounded()
    memo_dict["a"], memo_dict["b"] = 1, 2
    assert memo_dict["a"] == 1  # a is now the most recent
    memo_dict["c"] = 3
    assert list(memo_dict) == ["a", "c"]
    assert isinstance(cache._memo, memo.Bounded) and isinstance(cache._records, memo.Bounded)
