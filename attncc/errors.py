"""The exceptions attncc raises.

Every public entry point validates its input and raises a subclass of
:class:`AttnccError` whose message names the offending field, the value it got
and the range it allows, so a user can fix the call without reading our code.
"""

from __future__ import annotations


class AttnccError(ValueError):
    """Base class of every error attncc raises on bad input."""


class PatternError(AttnccError):
    """A pattern parameter is out of range or does not fit the grid."""


class ParseError(AttnccError):
    """The text form of a pattern is malformed."""


class TraceError(PatternError):
    """An ``@attncc.jit`` predicate uses a construct that cannot be traced or has no pattern."""


class SpecError(AttnccError):
    """A YAML/JSON spec file is unreadable or has an unknown or bad field."""


class TuneError(AttnccError):
    """An autotuning request is out of range (shape, candidate count, device)."""


class CacheError(AttnccError):
    """A cache key, entry or bundle is malformed, unknown, or fails its checks."""


class BuildError(AttnccError):
    """A kernel could not be built: a compiler or its headers are missing, or it rejected the source."""


def field_error(
    cls: type[AttnccError], field: str, value: object, allowed: str, why: str = ""
) -> AttnccError:
    """Build an error that names the field, the value and the allowed range."""
    reason = f" ({why})" if why else ""
    return cls(f"{field} = {value!r} is out of range{reason}; allowed: {allowed}")


def form_error(
    cls: type[AttnccError], field: str, value: object, expected: str, why: str = ""
) -> AttnccError:
    """Build an error for a value of the wrong kind, where no range applies (a tensor where lists
    are taken, a name that is not a key): names the field, the value and what it must be."""
    reason = f" ({why})" if why else ""
    return cls(f"{field} = {value!r} is not {expected}{reason}")
