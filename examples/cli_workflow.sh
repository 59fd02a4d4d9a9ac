#!/usr/bin/env bash
# (4) The CLI workflow: write a spec, analyse it, compile it to a standalone package, and import
# that package from a plain script that needs only torch and triton.
#   TRITON_INTERPRET=1 bash examples/cli_workflow.sh      # on a CPU (toy size, --device cpu)
#   bash examples/cli_workflow.sh                         # on a GPU
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
device=$([[ "${TRITON_INTERPRET:-0}" == 1 ]] && echo cpu || echo cuda)
cat > "$work/my_pattern.yaml" <<'SPEC'
# 2-D neighborhood attention, dilated, on a 12x16 token grid
pattern: neighborhood(window=5, dilation=2)
grid: [12, 16]
heads: 2
head_dim: 32
dtype: float32
SPEC
attncc analyze "$work/my_pattern.yaml"
attncc compile "$work/my_pattern.yaml" -o "$work/my_attention" --device "$device"
cd "$work"
python - "$device" <<'PY'
import sys

import torch

import my_attention  # the emitted package: torch and triton only

device = sys.argv[1]
q, k, v = (torch.randn(1, 12, 16, 2, 32, device=device, requires_grad=True) for _ in range(3))
out = my_attention.forward(q, k, v)  # [B, 12, 16, heads, 32], differentiable
out.sum().backward()
print("emitted package ran:", tuple(out.shape), "grad", tuple(q.grad.shape))
PY
