#!/usr/bin/env python3
"""JIT cache timings: NVRTC compile, disk hit, memory hit, and ep-jit-warm cold/warm.

    python scripts/bench_jit.py [--out benchmarks/results/jit-<machine>.json]

For the routing layout kernel (small) and the dispatch template (mid-size, two kernels)
at the DeepSeek-V3 shape. Each figure is a median; runs in a private temporary cache.
No GPU is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def median_s(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ep_jit-bench-"))
    os.environ.update(EP_JIT_CACHE_DIR=str(tmp / "cache"), EP_JIT_LOCK_DIR=str(tmp / "locks"))
    sys.path.insert(0, str(REPO))
    from ep_jit import KernelSpec, get_kernel, member_hash
    from ep_jit.cache import DiskCache
    from ep_jit.compiler import compile_source, nvrtc_version, render
    from ep_jit.jit import clear_memory_cache, resolve

    results: dict = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()}, "
                                f"{os.cpu_count()} CPUs)", "python": platform.python_version(),
                     "nvrtc": nvrtc_version(), "date": time.strftime("%Y-%m-%d"), "kernels": {}}
    for template in ("layout", "dispatch"):
        spec = KernelSpec(template, 7168, 256, 8, 8, "bf16", member_hash(range(8)), "sm_90a")
        source = render(spec)
        compile_s = median_s(lambda: compile_source(source, "bench"), args.repeats)
        resolve(spec)  # publish once

        def disk_hit():
            clear_memory_cache()
            assert resolve(spec, DiskCache())[1] == "disk"
        disk_s = median_s(disk_hit, args.repeats * 3)
        get_kernel(spec)
        n = 200_000
        mem_s = median_s(lambda: [get_kernel(spec) for _ in range(n)], 5) / n
        results["kernels"][template] = {"compile_ms": compile_s * 1e3, "disk_hit_ms": disk_s * 1e3,
                                        "memory_hit_us": mem_s * 1e6, "cubin_bytes": len(get_kernel(spec).cubin)}

    def warm_run() -> dict:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "ep_jit.cli.warm", "--preset", "deepseek-v3", "--json",
                              "--cache-dir", str(tmp / "warm-cache")], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
        return {**json.loads(out.stdout), "wall_seconds": time.perf_counter() - t}
    cold, warm = warm_run(), warm_run()
    results["warm_preset"] = {"preset": "deepseek-v3", "cold": cold, "warm": warm}

    print(f"NVRTC {results['nvrtc']} on {results['machine']}")
    print(f"{'template':10} {'compile ms':>11} {'disk hit ms':>12} {'memory hit us':>14} {'cubin KB':>9}")
    for name, r in results["kernels"].items():
        print(f"{name:10} {r['compile_ms']:11.1f} {r['disk_hit_ms']:12.3f} {r['memory_hit_us']:14.3f} "
              f"{r['cubin_bytes'] / 1024:9.1f}")
    for label, r in (("cold", cold), ("warm", warm)):
        print(f"ep-jit-warm --preset deepseek-v3 ({label}): {r['specs']} kernels, {r['compiled']} compiled, "
              f"{r['cached']} cached, {r['seconds']:.3f} s inside, {r['wall_seconds']:.3f} s wall")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
