"""ep-jit-warm: precompile every kernel a cluster will need, without a GPU.

It is idempotent: entries that verify on disk count as cached and nothing is
compiled again. Bad flags, plans or settings exit 2 with a one-line reason before
anything is written.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from .. import config, coverage
from ..cache import CacheWriteError, DiskCache, private_lock_folder
from ..errors import ConfigError, EPJitError
from ..jit import lookup, remembered_failure, resolve, spec_key
from ..plan import PRESETS, Job, Origin, PlanError, job_from_table, load_plan, unique_specs
from ..spec import KernelSpec
from . import OneLineParser, run, table

EPILOG = """examples:
  ep-jit-warm --preset deepseek-v3
  ep-jit-warm --hidden 7168 --experts 256 --topk 8 --dtype bf16 --dtype fp8 --world-size 64 --ep-size 8
  ep-jit-warm --plan cluster.toml --jobs 16 --json

exit status:
  0  every kernel is in the cache
  1  a kernel failed to compile or could not be written to the cache (see the summary)
  2  bad flags, plan or EP_JIT_* setting: one line on stderr, nothing written
"""
# The plan keys the flags set, as the user types them.
FLAGS = {"hidden": "--hidden", "experts": "--experts", "topk": "--topk", "dtype": "--dtype", "arch": "--arch",
         "world_size": "--world-size", "ep_size": "--ep-size"}
SHAPE_KEYS = ("hidden", "experts", "topk", "dtype")
SPEC_COLUMNS = [("key", 12), ("template", 10), ("hidden", -6), ("experts", -7), ("ep_size", -7), ("topk", -4),
                ("dtype", 8), ("arch", 7), ("group", 12)]


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="ep-jit-warm", description=__doc__.split("\n\n")[0], epilog=EPILOG)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), help="a well-known model")
    src.add_argument("--plan", type=Path, help="TOML file with [[job]] tables")
    p.add_argument("--hidden", type=int, action="append", help="hidden size (may repeat)")
    p.add_argument("--experts", type=int, action="append", help="number of experts (may repeat)")
    p.add_argument("--topk", type=int, action="append", help="experts per token (may repeat)")
    p.add_argument("--dtype", action="append", help="bf16 or fp8_e4m3 (alias fp8) (may repeat)")
    p.add_argument("--arch", action="append", help="sm_XX[a|f] (may repeat); default $EP_JIT_ARCH or sm_90a")
    p.add_argument("--world-size", type=int, help="ranks in the job")
    p.add_argument("--ep-size", type=int, help="ranks per EP group (consecutive blocks); default world size")
    p.add_argument("--jobs", type=int, default=min(8, multiprocessing.cpu_count()), help="compile processes")
    p.add_argument("--cache-dir", type=Path, help="cache root (default: $EP_JIT_CACHE_DIR ...)")
    p.add_argument("--dry-run", action="store_true", help="list specs and keys; compile and write nothing")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--wide", action="store_true", help="--dry-run table wider than 100 columns, keys in full")
    p.add_version()
    return p


def plan_jobs(args) -> list[Job]:
    """The jobs the flags ask for; PlanError names the flag or the plan key."""
    if args.jobs < 1:
        raise PlanError(f"--jobs: expected a positive int, got {args.jobs}")
    default_arch = config.default_arch()
    given = {k: getattr(args, k) for k in FLAGS if getattr(args, k) is not None}
    shapes = [k for k in SHAPE_KEYS if k in given]
    if args.plan is not None:
        if given:
            raise PlanError(f"--plan: the plan file sets shapes, sizes and arch; do not also pass "
                            f"{FLAGS[next(iter(given))]}")
        return load_plan(args.plan, default_arch)
    if args.preset is not None:
        if shapes:
            raise PlanError(f"--preset: it sets {', '.join(FLAGS[k] for k in SHAPE_KEYS)}; do not also pass "
                            f"{FLAGS[shapes[0]]}")
        preset = {**PRESETS[args.preset], **given, "name": args.preset}
        if "world_size" in given and "ep_size" not in given:
            preset["ep_size"] = min(preset["ep_size"], given["world_size"])
        labels = {k: FLAGS[k] if k in given else f"--preset {args.preset} ({k})" for k in preset}
        return [job_from_table(preset, Origin(labels=labels), default_arch)]
    if not shapes:
        raise PlanError("expected --preset, --plan, or --hidden/--experts/--topk with --world-size")
    return [job_from_table({**given, "name": "flags"}, Origin(labels=FLAGS), default_arch)]


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: a worker whose main process has died ends too."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _build(spec: KernelSpec, root: str) -> tuple[str, float, str]:
    """Worker: build one spec into the cache. Returns (outcome, seconds, error)."""
    start = time.perf_counter()
    try:
        _, tier = resolve(spec, DiskCache(Path(root)), must_publish=True, require_warm=False)  # compiling is its job
    except EPJitError as exc:
        return "failed", time.perf_counter() - start, str(exc).splitlines()[0]
    return ("compiled" if tier == "compiled" else "cached"), time.perf_counter() - start, ""


def _build_all(missing: list[KernelSpec], root: str, jobs: int) -> Iterator[tuple[KernelSpec, str, float, str]]:
    """(spec, outcome, seconds, error) of each spec as it is built; a spec whose process
    died has failed, and the results of the others are kept."""
    if len(missing) <= 1 or jobs <= 1:
        for spec in missing:
            yield spec, *_build(spec, root)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(jobs, len(missing)), mp_context=ctx, initializer=_exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_build, s, root): s for s in missing}
        for fut in as_completed(futures):
            try:
                yield futures[fut], *fut.result()
            except BrokenProcessPool:
                yield futures[fut], "failed", 0.0, "its compile process died before it finished"


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
    with tqdm(total=len(missing), desc="ep-jit-warm", unit="kernel", disable=not progress) as bar:
        for spec, outcome, _, error in _build_all(missing, str(cache.root), jobs):
            bar.update()
            summary[outcome] += 1
            if error:
                summary["failures"].append({"spec": spec.describe(), "error": error})
    summary["seconds"] = round(time.perf_counter() - start, 3)
    summary["cache_dir"] = str(cache.root)
    return summary


def dry_run(specs: list[KernelSpec], cache: DiskCache, as_json: bool, wide: bool) -> None:
    rows = [{"key": spec_key(s), **s.fields()} for s in specs]
    if as_json:
        print(json.dumps({"specs": len(rows), "cache_dir": str(cache.root), "kernels": rows}, indent=2))
        return
    columns = [(h, 64 if wide and h in ("key", "group") else w) for h, w in SPEC_COLUMNS]
    print(table(rows, columns))
    print(f"{len(rows)} kernels would be built into {cache.root}")


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config.check_environment()
        if config.always_compile():
            raise ConfigError("EP_JIT_ALWAYS_COMPILE: expected 0 or unset for ep-jit-warm, which fills the disk "
                              "cache that it bypasses; got '1'")
        cache = DiskCache(config.check_folder(args.cache_dir, "--cache-dir") if args.cache_dir else None)
        cache.check_root()
        specs = unique_specs(plan_jobs(args))
        if not args.dry_run:
            private_lock_folder()  # refused here rather than by every compile
    except (PlanError, ConfigError) as exc:
        parser.error(str(exc))
    if args.dry_run:
        dry_run(specs, cache, args.json, args.wide)
        return 0
    summary = warm(specs, cache, args.jobs, progress=sys.stderr.isatty() and not args.json)
    try:  # what cache-inspect coverage explains misses from
        summary["coverage_record"] = str(coverage.record(cache, specs))
    except CacheWriteError as exc:
        summary["coverage_record"] = None
        summary["failed"] += 1
        summary["failures"].append({"spec": "coverage record", "error": str(exc)})
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['specs']} kernels: {summary['compiled']} compiled, {summary['cached']} cached, "
              f"{summary['failed']} failed in {summary['seconds']:.2f} s ({summary['cache_dir']})")
        for f in summary["failures"]:
            print(f"FAILED {f['spec']}: {f['error']}", file=sys.stderr)
    return 1 if summary["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    return run(lambda: _main(argv))


if __name__ == "__main__":
    sys.exit(main())
