"""The runtime: what runs a pattern once a front door has it.

``library`` routes a call to a backend and memoises its kernels, ``ops`` registers the
torch.library ops and launches the Triton kernels, ``cutlass_kernel`` and ``nvcc`` build and
load the CUTLASS forward, ``cache`` stores every built artefact (``cache_bundle`` carries it
between machines). The front doors (``attncc.attention``, ``attncc.jit``, ``attncc.nn``, the
NATTEN and FlexAttention shims, the command line) sit above it in ``attncc/``.
"""
