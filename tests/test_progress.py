"""attncc.runtime.progress: what is built is logged with its time, and shown on a terminal."""

import io
import logging
import sys

import pytest
import torch

import attncc
from attncc.ir import sliding_window
from attncc.runtime import cache, progress
from attncc.runtime.library import forget_kernels


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_first_call_logs_its_backend_and_build_time(caplog):
    q = torch.randn(1, 1, 20, 16)
    with caplog.at_level(logging.DEBUG, logger="attncc"):
        attncc.attention(q, q, q, sliding_window(3))  # a pattern no other test of this file runs
    messages = [r.getMessage() for r in caplog.records if r.name == "attncc"]
    assert any(
        m.endswith("Triton (ATTNCC_BACKEND=triton)") and "on grid 20, D=16 float32" in m for m in messages
    )
    assert any(m.startswith("kernels for sliding_window(") and m.endswith(" s") for m in messages), messages


def test_steps_show_on_a_terminal_once_and_not_elsewhere(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    with progress.step("outer [x]"), progress.step("inner"):  # Note [Nested steps]
        pass
    shown = terminal.getvalue()
    assert "attncc: outer [x] (0.0 s)" in shown and "inner" not in shown
    monkeypatch.setenv("ATTNCC_PROGRESS", "0")
    terminal.seek(0), terminal.truncate()
    with progress.step("hidden"):
        pass
    assert terminal.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: nothing, whatever the setting
    monkeypatch.setenv("ATTNCC_PROGRESS", "1")
    with progress.step("quiet"):
        pass
    assert sys.stderr.getvalue() == ""


def test_attncc_log_attaches_one_handler_at_its_level(monkeypatch):
    monkeypatch.setenv("ATTNCC_LOG", "debug")
    before = list(progress.log.handlers)
    monkeypatch.setattr(progress, "_handler", None)
    try:
        progress.configure_logging()
        progress.configure_logging()
        added = [h for h in progress.log.handlers if h not in before]
        assert len(added) == 1 and progress.log.level == logging.DEBUG
    finally:
        for h in progress.log.handlers:
            if h not in before:
                progress.log.removeHandler(h)
        progress.log.setLevel(logging.NOTSET)
    monkeypatch.setenv("ATTNCC_LOG", "loud")
    with pytest.raises(
        attncc.AttnccError, match=r"ATTNCC_LOG = 'loud' is out of range; allowed: debug, info"
    ):
        progress.configure_logging()


def test_cache_builds_and_hits_are_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "_memo", {})
    q = torch.randn(1, 1, 18, 16)
    try:
        forget_kernels()
        with caplog.at_level(logging.DEBUG, logger="attncc"):
            attncc.attention(q, q, q, sliding_window(2))
            built = [r.getMessage() for r in caplog.records]
            caplog.clear()
            forget_kernels()  # as a new process would: from the cache on disk
            cache.forget()
            attncc.attention(q, q, q, sliding_window(2))
            hits = [r.getMessage() for r in caplog.records]
    finally:
        forget_kernels()
    assert any(m.startswith("cache: built kernels ") and "grid 18 q " in m for m in built), built
    assert any(m.startswith("cache hit: kernels ") for m in hits) and not any("built" in m for m in hits)
