"""Jinja2 templates that spell a KernelPlan as Triton or CUTLASS source (package data)."""
