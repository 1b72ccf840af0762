"""ep-jit-warm: precompile every kernel a cluster will need, without a GPU.

    ep-jit-warm --preset deepseek-v3
    ep-jit-warm --hidden 7168 --experts 256 --topk 8 --dtype bf16 --dtype fp8 --world-size 64 --ep-size 8
    ep-jit-warm --plan cluster.toml --jobs 16 --json

It is idempotent: entries that verify on disk count as cached and nothing is
compiled again. Bad flags or plans exit 2 with a one-line reason before anything
is written.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from .. import config, coverage
from ..cache import DiskCache
from ..errors import CompileError, ConfigError
from ..jit import lookup, remembered_failure, resolve, spec_key
from ..plan import PRESETS, Job, PlanError, job_from_table, load_plan, unique_specs
from ..spec import KernelSpec
from . import OneLineParser

SHAPE_FLAGS = ("hidden", "experts", "topk", "dtype")


def parse_args(argv: list[str] | None) -> tuple:
    p = OneLineParser(prog="ep-jit-warm", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="a well-known model")
    src.add_argument("--plan", type=Path, help="TOML file with [[job]] tables")
    p.add_argument("--hidden", type=int, action="append")
    p.add_argument("--experts", type=int, action="append")
    p.add_argument("--topk", type=int, action="append")
    p.add_argument("--dtype", action="append", help="bf16 or fp8_e4m3 (alias fp8)")
    p.add_argument("--arch", action="append", help="sm_XX[a]; default $EP_JIT_ARCH or sm_90a")
    p.add_argument("--world-size", type=int)
    p.add_argument("--ep-size", type=int)
    p.add_argument("--jobs", type=int, default=min(8, multiprocessing.cpu_count()), help="compile processes")
    p.add_argument("--cache-dir", type=Path, help="cache root (default: $EP_JIT_CACHE_DIR ...)")
    p.add_argument("--dry-run", action="store_true", help="list specs and keys; compile and write nothing")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    args = p.parse_args(argv)
    try:
        return args, _jobs(args)
    except (PlanError, ConfigError) as exc:
        p.error(str(exc))


def _jobs(args) -> list[Job]:
    if args.jobs < 1:
        raise PlanError(f"--jobs: expected a positive int, got {args.jobs}")
    default_arch = config.default_arch()
    given = {f: getattr(args, f) for f in SHAPE_FLAGS if getattr(args, f) is not None}
    sizes = {k: v for k, v in (("world_size", args.world_size), ("ep_size", args.ep_size)) if v is not None}
    if args.plan is not None:
        if given or sizes or args.arch:
            raise PlanError("--plan: shape, size and arch flags come from the plan file; do not also pass them")
        return load_plan(args.plan, default_arch)
    if args.preset is not None:
        if given:
            raise PlanError(f"--preset: it sets {', '.join(SHAPE_FLAGS)}; do not also pass them")
        table = {**PRESETS[args.preset], **sizes, "name": args.preset}
        if "world_size" in sizes and "ep_size" not in sizes:
            table["ep_size"] = min(table["ep_size"], sizes["world_size"])
    else:
        if not given:
            raise PlanError("expected --preset, --plan, or --hidden/--experts/--topk with --world-size")
        table = {**given, **sizes, "name": "flags"}
    if args.arch:
        table["arch"] = args.arch
    return [job_from_table(table, table["name"], default_arch)]


def _build(spec: KernelSpec, root: str) -> tuple[str, float, str]:
    """Worker: build one spec into the cache. Returns (outcome, seconds, error)."""
    start = time.perf_counter()
    try:
        _, tier = resolve(spec, DiskCache(Path(root)), require_warm=False)  # compiling is this tool's job
    except CompileError as exc:
        return "failed", time.perf_counter() - start, str(exc).splitlines()[0]
    return ("compiled" if tier == "compiled" else "cached"), time.perf_counter() - start, ""


def warm(specs: list[KernelSpec], cache: DiskCache, jobs: int, progress: bool) -> dict:
    start = time.perf_counter()
    summary = {"specs": len(specs), "compiled": 0, "cached": 0, "failed": 0, "failures": []}
    missing = []
    for spec in specs:  # verified disk hits are answered here, without a process pool
        key, entry = lookup(spec, cache)
        if entry is None:
            missing.append(spec)
        elif entry.failed:
            summary["failed"] += 1
            summary["failures"].append({"spec": spec.describe(), "error": str(remembered_failure(spec, entry))
                                        .splitlines()[0]})
        else:
            summary["cached"] += 1
    bar = tqdm(total=len(missing), desc="ep-jit-warm", unit="kernel", disable=not progress)
    results = []
    if len(missing) > 1 and jobs > 1:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(jobs, len(missing)), mp_context=ctx) as pool:
            futures = {pool.submit(_build, s, str(cache.root)): s for s in missing}
            for fut in as_completed(futures):
                results.append((futures[fut], *fut.result()))
                bar.update()
    else:
        for s in missing:
            results.append((s, *_build(s, str(cache.root))))
            bar.update()
    bar.close()
    for spec, outcome, _, error in results:
        summary[outcome] += 1
        if error:
            summary["failures"].append({"spec": spec.describe(), "error": error})
    summary["seconds"] = round(time.perf_counter() - start, 3)
    summary["cache_dir"] = str(cache.root)
    return summary


def dry_run(specs: list[KernelSpec], cache: DiskCache, as_json: bool) -> None:
    rows = [{"key": spec_key(s), "spec": s.describe()} for s in specs]
    if as_json:
        print(json.dumps({"specs": len(rows), "cache_dir": str(cache.root), "kernels": rows}, indent=2))
    else:
        for r in rows:
            print(f"{r['key'][:16]}  {r['spec']}")
        print(f"{len(rows)} kernels would be built into {cache.root}")


def main(argv: list[str] | None = None) -> int:
    args, jobs = parse_args(argv)
    try:
        cache = DiskCache(args.cache_dir)
        cache.check_root()
        specs = unique_specs(jobs)
    except (PlanError, ConfigError) as exc:
        sys.stderr.write(f"ep-jit-warm: error: {exc}\n")
        return 2
    if args.dry_run:
        dry_run(specs, cache, args.json)
        return 0
    summary = warm(specs, cache, args.jobs, progress=sys.stderr.isatty() and not args.json)
    summary["coverage_record"] = str(coverage.record(cache, specs))  # what cache-inspect coverage explains from
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['specs']} kernels: {summary['compiled']} compiled, {summary['cached']} cached, "
              f"{summary['failed']} failed in {summary['seconds']:.2f} s ({summary['cache_dir']})")
        for f in summary["failures"]:
            print(f"FAILED {f['spec']}: {f['error']}", file=sys.stderr)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
