"""The files the commands write (``--png``, ``--json``, ``--plot``, ``--markdown``): checked
when the command starts, so a mistyped folder fails at once rather than after the work."""

from __future__ import annotations

from pathlib import Path

import click

from attncc.errors import AttnccError, form_error


def output_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A click callback: ``value`` must name a file in a folder that exists (or be unset)."""
    if value is not None and not Path(value).resolve().parent.is_dir():
        raise form_error(AttnccError, param.opts[0], value, "a file in an existing directory")
    return value
