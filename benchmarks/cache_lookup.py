"""What a cache lookup costs: from disk (manifest read, every file hashed) vs from the in-process memo.

    python benchmarks/cache_lookup.py

Runs on any machine (no GPU needed) in a temporary cache root: one rendered
kernel entry (dense on 4096 tokens, bf16, d=128, GPU tiles) and one tuning
record. Each lookup includes making its key (canonical JSON + sha256 of the
parts); each "disk" run forgets the memo first, as a new process would.

Measured on a shared 2-core CPU box (attncc 0.1.0, torch 2.15, triton 3.9),
medians of 500 runs: kernel entry 76 us from disk, 24 us from the memo (of
which ~21 us is making the key from the plan; 3.3 us with the key made once),
tuning record 50 us from disk, 13 us from the memo. ``attncc.attention`` pays
none of this after its first call: ``load`` and the op memoise per plan.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from pathlib import Path

from attncc.ir import Grid, dense
from attncc.lower.lowering import LaunchConfig, lower
from attncc.lower.render import MODULE, render
from attncc.runtime import cache
from attncc.timing import measure


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ATTNCC_CACHE_DIR"] = tmp
        plan = lower(dense(), Grid((4096,)), 128, "bfloat16", config=LaunchConfig.default("cuda", 128))
        data = render(plan).encode()
        kernel = {"plan": dataclasses.asdict(plan), "sha256": {MODULE: hashlib.sha256(data).hexdigest()}}
        write = lambda folder: (folder / MODULE).write_bytes(data)  # noqa: E731
        cache.build_entry(cache.make_key("kernels", kernel), write)
        record = {"pattern": "dense()", "grid": [4096]}
        cache.put_record("tuning", record, {"block_m": 128, "block_n": 64, "num_warps": 8, "us": 812.5})
        root = Path(tmp)

        def from_disk(fn):
            def run(_):
                cache.forget(root)
                fn(None)

            return run

        def kernel_lookup(_):
            cache.lookup(cache.make_key("kernels", kernel))

        key = cache.make_key("kernels", kernel)

        def record_lookup(_):
            cache.get_record("tuning", record)

        rows = [
            (f"kernel entry ({len(data):,} B), disk", from_disk(kernel_lookup)),
            ("kernel entry, memo", kernel_lookup),
            ("kernel entry, memo, key made once", lambda _: cache.lookup(key)),
            ("tuning record, disk", from_disk(record_lookup)),
            ("tuning record, memo", record_lookup),
        ]
        for name, fn in rows:
            fn(None)
            t = measure(fn, [None], "cpu", warmup=20, runs=500)
            print(f"{name:<34} median {t.median * 1e3:8.1f} us  (spread {t.spread * 1e3:.1f} us)")


if __name__ == "__main__":
    main()
