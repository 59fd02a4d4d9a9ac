"""Shared by the examples: pick the device and the problem size from the command line."""

from __future__ import annotations

import argparse
import os

import torch


def setup(description: str) -> argparse.Namespace:
    """``--size toy`` (CPU, Triton's interpreter, seconds) or ``real`` (a GPU, model-sized)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--size", choices=("toy", "real"), default="real" if torch.cuda.is_available() else "toy"
    )
    args = parser.parse_args()
    if args.size == "real" and not torch.cuda.is_available():
        parser.error("--size real needs a CUDA GPU")
    args.device = "cuda" if args.size == "real" else "cpu"
    args.dtype = torch.bfloat16 if args.size == "real" else torch.float32
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("on the CPU, run with TRITON_INTERPRET=1 (set before triton is imported)")
    return args
