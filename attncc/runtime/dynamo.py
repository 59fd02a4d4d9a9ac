"""What torch.compile's tracer (dynamo) is told about attncc's Python objects.

Note [Patterns under torch.compile]: a pattern is plain data that the kernel is specialised to,
so under torch.compile it must be a constant of the trace, whether it was built before the
compiled region or inside it. Dynamo traces Python code by replaying it on stand-ins, and a
frozen dataclass built inside the region is replayed as an empty shell whose fields live in
dynamo's side-effect table; handed to a function that needs the real object (the pattern's text
is computed at trace time, ``attncc.runtime.library._text``) the shell has no fields. So every
node class is registered with torch as an opaque *value* type (Note [Opaque Objects] in
``torch._library.opaque_object``): dynamo then calls the constructor itself on the constant
arguments, holds the real node, guards a pattern that comes from outside by equality, and
evaluates ``|`` and ``&`` on the real nodes (``MemberType.USE_REAL``) instead of recording
them. One registration per node class covers every primitive and combinator, and the builder
functions (``neighborhood(...)``, ``per_head([...])``) are traced through to it.

The front ends that build a pattern by running Python on traced values (``@attncc.jit``,
``attncc.flex``) are, like ``_text``, functions dynamo calls once at trace time and whose result
it keeps (``torch.compiler.assume_constant_result``); their arguments are constants (the grid
as a tuple of ints, specialised by ``attncc.layouts``: Note [Static shapes] there).

A torch whose opaque objects have no value types with members (those before them) leaves the
node classes unregistered: a pattern built before the compiled region still works there, one
built inside it does not (:data:`PATTERNS_IN_COMPILE` says which).
"""

from __future__ import annotations

import inspect

from attncc.ir.nodes import NODES

try:
    from torch._library.opaque_object import MemberType, register_opaque_type
except ImportError:  # a torch from before opaque objects
    register_opaque_type = None

# The operators that build a pattern from patterns run on the real nodes at trace time.
_BUILDERS = ("__or__", "__and__")


def _register() -> bool:
    if register_opaque_type is None or "members" not in inspect.signature(register_opaque_type).parameters:
        return False  # a torch from before value types with members
    members = dict.fromkeys(_BUILDERS, MemberType.USE_REAL)
    for cls in NODES:
        register_opaque_type(cls, typ="value", members=members)
    return True


PATTERNS_IN_COMPILE: bool = _register()
"""Whether a pattern may be built inside a ``torch.compile`` region with this torch."""
