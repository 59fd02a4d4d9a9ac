"""attncc: a compiler for structured sparse attention.

State which query attends to which key as a pattern on a token grid; attncc
analyses its sparsity symbolically and lowers it to a pattern-specialised
Triton kernel: ``attncc.attention(q, k, v, pattern)``. See ``attncc.ir`` for
the pattern language and ``attncc.reference`` for the brute-force oracle.
"""

__version__ = "0.1.0"

from attncc import flex, natten, nn
from attncc.errors import AttnccError, ParseError, PatternError, SpecError, TraceError
from attncc.jit import jit
from attncc.runtime.library import attention
from attncc.runtime.progress import configure_logging

configure_logging()  # ATTNCC_LOG (attncc.settings)

__all__ = [
    "AttnccError",
    "ParseError",
    "PatternError",
    "SpecError",
    "TraceError",
    "__version__",
    "attention",
    "flex",
    "jit",
    "natten",
    "nn",
]
