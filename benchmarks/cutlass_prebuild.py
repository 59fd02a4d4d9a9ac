"""Build a suite's CUTLASS kernels in parallel before it is timed (one nvcc run takes a core for
about a minute; a suite built one case at a time would not fit a 10-minute device command).

    python benchmarks/cutlass_prebuild.py issue3

Builds, into the kernel cache (ATTNCC_CACHE_DIR), what ``attncc bench SUITE --peers
attncc-cutlass,cutlass-example`` will load: each case's plan under ATTNCC_BACKEND=cutlass where
the templates take it, and the example's dense and causal kernels.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

from attncc.bench.suite import load_cases
from attncc.ir import Causal, Dense, canonicalize, resolve_heads
from attncc.lower.lowering import lower
from attncc.runtime import cutlass_kernel
from attncc.runtime.ops import cutlass_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite")
    args = parser.parse_args()
    start = time.perf_counter()
    plans, examples = [], set()
    for case in load_cases(args.suite):
        heads = {canonicalize(p, case.grid) for p in resolve_heads(case.pattern, case.heads)}
        if len(heads) != 1:
            continue
        pattern = heads.pop()
        plan = lower(pattern, case.grid, case.head_dim, case.dtype, config=cutlass_config(case.head_dim))
        cplan = cutlass_kernel.plan_for(pattern, case.grid, plan)
        if not isinstance(cplan, str):
            plans.append(cplan)
        if isinstance(pattern, Dense) or (isinstance(pattern, Causal) and case.grid.rank == 1):
            examples.add((case.dtype, case.head_dim, isinstance(pattern, Causal)))
    with ThreadPoolExecutor() as pool:
        jobs = [pool.submit(cutlass_kernel.example, *e) for e in examples]
        cutlass_kernel.prebuild(plans)
        for job in jobs:
            job.result()
    seconds = time.perf_counter() - start
    print(f"built {len(plans)} plans and {len(examples)} example kernels in {seconds:.0f} s")


if __name__ == "__main__":
    main()
