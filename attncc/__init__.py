"""attncc: a compiler for structured sparse attention.

State which query attends to which key as a pattern on a token grid; attncc
analyses its sparsity symbolically and (in later stages) lowers it to
pattern-specialised kernels. See ``attncc.ir`` for the pattern language and
``attncc.reference`` for the brute-force oracle.
"""

from attncc.errors import AttnccError, ParseError, PatternError, SpecError

__version__ = "0.1.0"

__all__ = ["AttnccError", "ParseError", "PatternError", "SpecError", "__version__"]
