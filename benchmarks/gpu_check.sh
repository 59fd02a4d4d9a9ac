#!/usr/bin/env bash
# Every GPU check (under 30 minutes on an H100): the GPU tests, the benchmark, the cost-model check.
# Results are written into the repository (benchmarks/RESULTS.md) and, on the lent
# machine, copied to $OUT so they come back to be committed. A device command may run
# 10 minutes at most, so each part can run on its own:
#   bash benchmarks/gpu_check.sh [all|tests|tests-bwd|bench|tune]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export ATTNCC_CACHE_DIR="${ATTNCC_CACHE_DIR:-/tmp/attncc-cache}"
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
# The GPU machine has the dependencies but no registry: install attncc itself only. If its
# setuptools cannot build it, build a wheel here (pip wheel --no-deps -w .whl .) and carry .whl.
python3 -m pip install -q --no-deps --no-build-isolation --no-index . 2>&1 | tail -2
python3 -c "import attncc.ir" 2>/dev/null || python3 -m pip install -q --no-deps --no-index .whl/attncc-*.whl
python3 -c "import attncc.ir, attncc.ops" || { echo "attncc is not importable"; exit 1; }
part="${1:-all}"
status=0
[[ $part == all || $part == tests ]] &&
  { timeout 540 python3 -m pytest -m gpu -q -p no:cacheprovider tests --ignore=tests/test_triton_bwd_gpu.py 2>&1 |
    tee "$out/gpu_tests.txt" || status=1; }
[[ $part == all || $part == tests-bwd ]] &&
  { timeout 540 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_triton_bwd_gpu.py 2>&1 |
    tee "$out/gpu_tests_bwd.txt" || status=1; }
[[ $part == all || $part == bench ]] &&
  { timeout 540 python3 benchmarks/bench_fwd.py --markdown benchmarks/RESULTS.md 2>&1 |
    tee "$out/bench_fwd.txt" || status=1; }
[[ $part == all || $part == tune ]] &&
  { timeout 540 python3 benchmarks/tune_check.py --markdown benchmarks/RESULTS.md --json "$out/tune_check.json" \
    --seconds 420 2>&1 | tee "$out/tune_check.txt" || status=1; }
cp benchmarks/RESULTS.md "$out/" 2>/dev/null
exit $status
