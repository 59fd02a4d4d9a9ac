"""The first GPU session's one call: every kernel family's correctness, the issue3 forward
against SDPA and FlexAttention, and the measured efficiency beside the static estimate.

    python3 -P benchmarks/smoke.py --out DIR --markdown benchmarks/RESULTS.md [--budget 450]

Run by ``bash benchmarks/gpu_check.sh smoke``. It keeps to a time budget (seconds, all of
it): the tests get a share, then the benchmark runs case by case (attncc, SDPA, then
FlexAttention while the budget allows: its first block mask in a process is slow) and
stops early rather than overrun; what was measured is written either way. Exit status 1
when a test fails, a peer's output disagrees with ours, or our forward has no figure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def tests(out: Path, seconds: float) -> bool:
    cmd = [
        sys.executable,
        "-P",
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_smoke_gpu.py",
    ]
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=seconds)
        text, ok = done.stdout + done.stderr, done.returncode == 0
    except subprocess.TimeoutExpired as e:
        text, ok = f"{e.stdout or ''}\nsmoke tests stopped after {seconds:.0f} s", False
    (out / "smoke_tests.txt").write_text(text)
    print(text[-3000:])
    return ok


def bench(out: Path, markdown: Path | None, deadline: float) -> bool:
    import torch

    from attncc.bench import report
    from attncc.bench.peers import Flex, Sdpa
    from attncc.bench.runner import run_case
    from attncc.bench.suite import load_cases

    device = torch.device("cuda")
    results, ok = [], True
    for case in load_cases("issue3"):
        left = deadline - time.monotonic()
        if left < 30:
            print(f"{case.name}: skipped, {left:.0f} s of the budget left")
            continue
        peers = [Sdpa(), Flex()] if left > 90 else [Sdpa()]
        result = run_case(case, peers, device, "fwd", warmup=3, runs=10)
        results.append(result)
        ours = result.entry("attncc")
        ok &= ours.status == "ok" and all(e.status != "wrong" for e in result.entries)
        print(f"{case.name}: attncc {ours.status} {ours.median_ms} ms", flush=True)
    if not results:
        return False
    env = report.environment(device)
    report.write_json(out / "bench-smoke.json", results, env)
    if markdown:
        report.prepend(markdown, report.markdown(results, env, "attncc bench issue3 --fwd (smoke)", None))
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="where raw outputs go")
    ap.add_argument("--markdown", type=Path, help="prepend the tables to this file")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for all of it")
    args = ap.parse_args()
    start = time.monotonic()
    deadline = start + args.budget
    ok = tests(args.out, 0.4 * args.budget)
    ok &= bench(args.out, args.markdown, deadline - 40)  # 40 s for the static profiles
    bench_json = args.out / "bench-smoke.json"
    if bench_json.exists():
        sys.path.insert(0, str(REPO / "benchmarks"))
        import static_vs_measured

        text = static_vs_measured.markdown(json.loads(bench_json.read_text()))
        print(text)
        if args.markdown:
            from attncc.bench.report import prepend

            prepend(args.markdown, text)
    print(f"smoke: {time.monotonic() - start:.0f} s, {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
