"""Lowering: (pattern, grid, shapes, dtype) -> KernelPlan. Lands with the Triton backend."""
