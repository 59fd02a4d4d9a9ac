"""attncc.settings: every environment setting, read on each call and checked."""

import pytest

from attncc import PatternError, settings


def test_settings_are_read_on_each_call(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNCC_CACHE_DIR", str(tmp_path))
    assert settings.cache_dir() == tmp_path
    monkeypatch.setenv("ATTNCC_CACHE_DIR", "")
    assert settings.cache_dir() is None
    monkeypatch.setenv("ATTNCC_BACKEND", "auto")
    assert settings.backend() == "auto"
    monkeypatch.delenv("ATTNCC_BACKEND")
    assert settings.backend() == "triton"
    monkeypatch.setenv("ATTNCC_POISON", "1")
    assert settings.poison()
    monkeypatch.setenv("ATTNCC_POISON", "0")
    assert not settings.poison()


@pytest.mark.parametrize(
    "value,on", [("1", True), ("TRUE", True), ("on", True), ("0", False), ("off", False), ("", False)]
)
def test_interpreter_follows_triton_interpret(monkeypatch, value, on):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert settings.interpreter() is on


def test_an_unknown_backend_is_an_error_naming_the_setting(monkeypatch):
    monkeypatch.setenv("ATTNCC_BACKEND", "cudnn")
    with pytest.raises(
        PatternError, match=r"ATTNCC_BACKEND = 'cudnn' is out of range; allowed: triton, auto, cutlass"
    ):
        settings.backend()
