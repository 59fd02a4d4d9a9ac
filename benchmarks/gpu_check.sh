#!/usr/bin/env bash
# Every GPU check: the GPU tests, the benchmark suite (`attncc bench`, one part per suite
# part), the op-overhead and drop-in figures, and the cost-model check. Results are written
# into the repository (benchmarks/RESULTS.md, plots in benchmarks/plots/) and, on the lent
# machine, copied to $OUT so they come back to be committed. A device command may run 10
# minutes at most, so each part runs on its own; in order of priority:
#   bash benchmarks/gpu_check.sh smoke | tests | tests-front | tests-bwd | tests-terms | tests-runtime |
#        tests-regions | tests-segments | bench-issue3 |
#        bench-bwd | bench-terms | bench-tables | bench-decode | bench-text-video | cutlass | bench-cutlass | bench-grids | bench-flat |
#        bench-models | extras | examples | tune | cp
#   (all = every part but smoke, bench = every bench-*)
# A session that gets a GPU runs `smoke` first: one call under 8 minutes, every kernel family
# forward and backward at bf16/fp16/fp32, the issue3 forward against SDPA and FlexAttention,
# and the measured efficiency beside the static estimate (benchmarks/smoke.py).
# The CUTLASS parts need the nvidia-cutlass wheel (headers), which the GPU machine lacks and cannot
# download: carry it in .whl/ (pip download nvidia-cutlass==4.2.0.0 --no-deps -d .whl).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export ATTNCC_CACHE_DIR="${ATTNCC_CACHE_DIR:-/tmp/attncc-cache}"
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
repo="$(pwd)"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
# The GPU machine has the dependencies but no registry: install attncc itself only. If its
# setuptools cannot build it, build a wheel here (pip wheel --no-deps -w .whl .) and carry .whl.
python3 -m pip install -q --no-deps --no-build-isolation --no-index . 2>&1 | tail -2
python3 -c "import attncc.ir" 2>/dev/null || python3 -m pip install -q --no-deps --no-index .whl/attncc-*.whl
python3 -c "import attncc.ir, attncc.runtime.ops" || { echo "attncc is not importable"; exit 1; }
python3 -c "import cutlass_library" 2>/dev/null ||
  python3 -m pip install -q --no-deps --no-index .whl/nvidia_cutlass-*.whl 2>&1 | tail -2
part="${1:-all}"
# python3 -P: the repository root is not put on sys.path, so its ./attncc does not shadow the install.
status=0
[[ $part == smoke ]] &&
  { (cd "$out" && timeout 460 python3 -P "$repo/benchmarks/smoke.py" --out "$out" \
    --markdown "$repo/benchmarks/RESULTS.md" --budget 420) 2>&1 | tee "$out/smoke.txt" || status=1; }
[[ $part == all || $part == tests ]] &&
  { timeout 540 python3 -P -m pytest -m gpu -q -p no:cacheprovider tests --ignore=tests/test_triton_bwd_gpu.py \
    --ignore=tests/test_cutlass_gpu.py 2>&1 |
    tee "$out/gpu_tests.txt" || status=1
    # The timm drop-in check (unmarked: it runs on the CPU too, where timm is installed).
    timeout 300 python3 -P -m pytest -q -p no:cacheprovider tests/test_dropin_timm.py 2>&1 |
      tee -a "$out/gpu_tests.txt" || status=1
    # The heavy checks the default (CI) run leaves out: CUTLASS builds, a compiled training step.
    timeout 400 python3 -P -m pytest -m slow -q -p no:cacheprovider tests 2>&1 |
      tee -a "$out/gpu_tests.txt" || status=1; }
# The front doors on CUDA (unmarked tests that take the GPU when there is one): the NATTEN and
# FlexAttention drop-ins, and export / AOTInductor through the triton_op path.
[[ $part == all || $part == tests-front ]] &&
  { timeout 540 python3 -P -m pytest -q -p no:cacheprovider tests/test_natten_shim.py tests/test_flex.py \
    tests/test_deploy.py tests/test_progress.py 2>&1 | tee "$out/gpu_tests_front.txt" || status=1; }
# Score terms and dropout (issue 17) on CUDA, bf16 included: unmarked tests that take the GPU when
# there is one, and the standalone package's terms through its triton_ops.
[[ $part == all || $part == tests-terms ]] &&
  { timeout 540 python3 -P -m pytest -q -p no:cacheprovider tests/test_score_terms.py tests/test_score_inputs.py \
    tests/test_dropout.py tests/test_compile_terms.py 2>&1 | tee "$out/gpu_tests_terms.txt" || status=1; }
# Pattern data given per call (issue 18) on CUDA: the runtime kernels against the reference, the
# device-built tile lists (under CUDA's sync debug mode: no host sync), patterns under torch.compile.
[[ $part == all || $part == tests-runtime ]] &&
  { timeout 540 python3 -P -m pytest -q -p no:cacheprovider tests/test_runtime_kernels.py tests/test_runtime_tables.py \
    tests/test_runtime_patterns.py tests/test_compile_patterns.py 2>&1 | tee "$out/gpu_tests_runtime.txt" || status=1; }
# Queries and keys that differ (issue 16) on CUDA: query regions (KV caches, chunked prefill, boxes)
# and cross-attention (also through @attncc.jit, packages and the Flex shim) against the float64
# oracle, forward and backward, under torch.compile; the
# module's KV cache and its compiled steps; packages of a spec's queries; key masks (part 5).
[[ $part == all || $part == tests-regions ]] &&
  { timeout 540 python3 -P -m pytest -q -p no:cacheprovider tests/test_regions.py tests/test_nn_cache.py \
    tests/test_compile_regions.py tests/test_cross.py tests/test_key_mask.py tests/test_paged.py \
    tests/test_jit_cross.py tests/test_compile_cross.py tests/test_flex_batch.py 2>&1 | tee "$out/gpu_tests_regions.txt" || status=1; }
# Token spaces of segments (issue 16 part 4) on CUDA: the kernels against the float64 oracle at odd
# sizes (unmarked tests that take the GPU when there is one), then bf16/fp16/fp32 forward and
# backward at realistic sizes (text beside a video, registers beside an odd image; -m gpu).
[[ $part == all || $part == tests-segments ]] &&
  { timeout 540 python3 -P -m pytest -q -p no:cacheprovider tests/test_segments_kernels.py 2>&1 |
      tee "$out/gpu_tests_segments.txt" || status=1
    timeout 300 python3 -P -m pytest -m gpu -q -p no:cacheprovider tests/test_segments_gpu.py 2>&1 |
      tee -a "$out/gpu_tests_segments.txt" || status=1; }
[[ $part == all || $part == tests-bwd ]] &&
  { timeout 540 python3 -P -m pytest -m gpu -q -p no:cacheprovider tests/test_triton_bwd_gpu.py 2>&1 |
    tee "$out/gpu_tests_bwd.txt" || status=1; }
[[ $part == all || $part == cutlass ]] &&
  { timeout 560 python3 -P -m pytest -m gpu -q -p no:cacheprovider tests/test_cutlass_gpu.py 2>&1 |
    tee "$out/gpu_tests_cutlass.txt" || status=1; }
bench_part() {  # [limit=SECONDS] [file=NAME] bench_part PART SUITE [attncc bench options...]
  local name=$1 suite=$2 file=${file:-$1} limit=${limit:-570}
  shift 2
  [[ $part == all || $part == bench || $part == "bench-$name" ]] || return 0
  local plot="plots/$(date +%F)-$file.png"
  mkdir -p benchmarks/plots
  # From $out, not the repository root, whose ./attncc would shadow the installed package.
  (cd "$out" && timeout "$limit" python3 -m attncc bench "$suite" "$@" --json "$out/bench-$file.json" \
    --plot "$repo/benchmarks/$plot" --markdown "$repo/benchmarks/RESULTS.md" --plot-link "$plot") 2>&1 |
    tee "$out/bench-$file.txt" || status=1
  cp "$repo/benchmarks/$plot" "$out/" 2>/dev/null
}
bench_part issue3 issue3 --fwd
bench_part grids grids --fwd
bench_part flat flat --fwd
bench_part models models --fwd
bench_part bwd issue3 --fwd-bwd --runs 10
# Score terms (issue 17), one command: every term's cost over the same case without it and
# FlexAttention with the same score_mod (SDPA with the additive ones as its attn_mask), forward;
# then forward + backward of the 2-D neighborhood, its relative position table learned.
limit=350 bench_part terms terms --fwd --peers sdpa,flex --runs 10 --warmup 3
limit=200 file=terms-bwd bench_part terms terms -k na2d --fwd-bwd --peers sdpa,flex --runs 10 --warmup 3
# Both backends and the CUTLASS example's own kernel in one run; kernels prebuilt in parallel.
[[ $part == all || $part == bench || $part == bench-cutlass ]] &&
  { timeout 300 python3 -P benchmarks/cutlass_prebuild.py issue3 2>&1 | tee "$out/cutlass_prebuild.txt" || status=1; }
bench_part cutlass issue3 --fwd --peers sdpa,flex,attncc-cutlass,cutlass-example
# Building the tile lists of call-time data at issue 18's size (target: under 50 us), against
# FlexAttention's BlockMask.from_kv_blocks and create_block_mask on the same layout.
[[ $part == all || $part == bench || $part == bench-tables ]] &&
  { (cd "$out" && timeout 300 python3 "$repo/benchmarks/table_build.py" --device cuda \
    --markdown "$repo/benchmarks/RESULTS.md") 2>&1 | tee "$out/bench-tables.txt" || status=1; }
# Decode steps (issue 16 part 2): the decode tests on CUDA (bf16 included), then one query of 8 heads over
# one KV head against a 32K and a 128K cache (causal; a 4096-token window with 4 sinks) beside SDPA,
# FlexAttention's decoding kernel and FlashAttention where installed, and the split counts the cost
# model did not pick (Note [Split count] in attncc.autotune.decode).
[[ $part == all || $part == bench || $part == bench-decode ]] &&
  { timeout 150 python3 -P -m pytest -q -p no:cacheprovider tests/test_decode.py 2>&1 | tee "$out/bench-decode.txt" ||
      status=1
    (cd "$out" && timeout 420 python3 "$repo/benchmarks/decode_bench.py" --device cuda \
      --markdown "$repo/benchmarks/RESULTS.md") 2>&1 | tee -a "$out/bench-decode.txt" || status=1; }
# Text beside video (issue 16 part 4's case): 256 text tokens + a 30x48x80 video, attncc's one kernel
# over the space of segments (by_segments) and its two calls beside FlexAttention (one mask_mod) and
# NATTEN's na3d with additional_keys where installed.
[[ $part == all || $part == bench || $part == bench-text-video ]] &&
  { (cd "$out" && timeout 420 python3 "$repo/benchmarks/text_video_block.py" --device cuda \
    --markdown "$repo/benchmarks/RESULTS.md") 2>&1 | tee "$out/bench-text-video.txt" || status=1; }
[[ $part == all || $part == extras ]] &&
  { (cd "$out" && timeout 270 python3 "$repo/benchmarks/op_overhead.py" --markdown "$repo/benchmarks/RESULTS.md" &&
    timeout 270 python3 "$repo/benchmarks/dropin_timm.py" --markdown "$repo/benchmarks/RESULTS.md") 2>&1 |
    tee "$out/extras.txt" || status=1; }
# Every example at its real (model) size, as a user runs it; from $out, so ./attncc does not shadow.
[[ $part == all || $part == examples ]] &&
  { (failed=0
    for script in "$repo"/examples/[!_]*.py "$repo"/examples/*.sh; do
      echo "== ${script#"$repo"/} (real size)"
      if [[ $script == *.sh ]]; then (cd "$out" && timeout 110 bash "$script") || failed=1
      else (cd "$out" && timeout 110 python3 "$script" --size real) || failed=1; fi
    done
    exit $failed) 2>&1 | tee "$out/examples.txt" || status=1; }
# Context parallelism (issue 19) over NCCL on every GPU of the machine: each case's forward and
# backward against one GPU's, and both times (benchmarks/cp_gpu_check.py); needs 2 GPUs or more.
[[ $part == all || $part == cp ]] &&
  { gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
    if ((gpus < 2)); then
      echo "cp: skipped: this machine has $gpus GPU(s); context parallelism needs 2 or more" \
        "(torchrun --nproc-per-node)" | tee "$out/cp.txt"
    else
      (cd "$out" && timeout 540 torchrun --nproc-per-node="$gpus" "$repo/benchmarks/cp_gpu_check.py" \
        --markdown "$repo/benchmarks/RESULTS.md") 2>&1 | tee "$out/cp.txt" || status=1
    fi; }
[[ $part == all || $part == tune ]] &&
  { timeout 540 python3 benchmarks/tune_check.py --markdown benchmarks/RESULTS.md --json "$out/tune_check.json" \
    --seconds 420 2>&1 | tee "$out/tune_check.txt" || status=1; }
cp benchmarks/RESULTS.md "$out/" 2>/dev/null
exit $status
