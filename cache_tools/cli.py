"""cache-inspect {list,show,verify,prune,stats,config,coverage,export,import} [--cache-dir DIR] [--json]

Exit status: 0 on success, 1 when `verify` finds a corrupt entry, `coverage` a missing
kernel, or `export`/`import` refuse a bundle, 2 on bad arguments (one line on stderr,
nothing written).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ep_jit import config
from ep_jit.cache import CacheWriteError, CorruptEntry, DiskCache, Entry, stale_lock_paths
from ep_jit.cli import OneLineParser, run, table
from ep_jit.cli.show_config import show as show_config
from ep_jit.errors import ConfigError
from ep_jit.spec import shown_fields
from ep_jit.units import AGE_FORM, SIZE_FORM, format_age, format_size, parse_age, parse_size

from . import bundle, coverage

EPILOG = f"""examples:
  cache-inspect list --wide
  cache-inspect show 3fa2c1 --source
  cache-inspect verify --fix
  cache-inspect prune --max-size 2G --dry-run
  cache-inspect prune --older-than 30d

sizes: {SIZE_FORM}; k, M, G, T are powers of 1000, KiB, MiB, GiB, TiB of 1024.
ages: {AGE_FORM} (s, m, h, d, w); a bare number is refused.
last use: set when a process loads an entry; cache-inspect never changes it.

exit status:
  0  success (verify: every entry verifies, or --fix fixed every problem)
  1  verify found a problem it did not fix; show found a corrupt entry; coverage found a
     kernel in no tier; export/import refused a bundle; the cache could not be written
  2  bad arguments or EP_JIT_* setting: one line on stderr, nothing changed
"""
LIST_COLUMNS = [("key", 10), ("template", 10), ("hidden", -6), ("experts", -7), ("ep_size", -7), ("topk", -4),
                ("dtype", 8), ("arch", 7), ("size", -8), ("used", -6), ("status", 7)]
WIDE_COLUMNS = [("key", 64), ("template", 10), ("hidden", -6), ("experts", -7), ("ep_size", -7), ("topk", -4),
                ("dtype", 8), ("arch", 7), ("group", 64), ("nvrtc", 5), ("size", -8), ("created", 25),
                ("last_used", 25), ("status", 7)]


class UsageError(ValueError):
    pass


@dataclass
class Row:
    """One entry file (or what stands in its place) as cache-inspect sees it."""

    path: Path
    size: int
    last_used: float
    entry: Entry | None
    problem: str = ""

    @property
    def key(self) -> str:
        return self.path.name.split(".")[0]

    def summary(self) -> dict:
        d = {"key": self.key, "size": self.size, "last_used": _iso(self.last_used), "path": str(self.path)}
        if self.entry is None:
            return {**d, "status": "corrupt", "problem": self.problem}
        h = self.entry.header
        return {**d, "status": h.status, **shown_fields(h.spec), "nvrtc": h.nvrtc_version, "created": h.created_at,
                "compile_seconds": h.compile_seconds}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def scan(cache: DiskCache) -> list[Row]:
    """Every entry, verified, and whatever stands where a folder of entries belongs.
    Reading never changes an entry's last use."""
    rows = []
    for path in cache.entry_paths():
        try:
            st = path.lstat()
        except FileNotFoundError:  # pruned or quarantined meanwhile
            continue
        try:
            rows.append(Row(path, st.st_size, st.st_mtime, cache.load(path)))
        except (CorruptEntry, OSError) as exc:
            rows.append(Row(path, st.st_size, st.st_mtime, None, str(exc)))
    for path in cache.foreign_paths():
        st = path.lstat()
        rows.append(Row(path, st.st_size, st.st_mtime, None, "a link or a file where a folder of entries belongs"))
    return rows


def _bad_quarantine(cache: DiskCache) -> str | None:
    bad = cache.not_a_folder(cache.quarantine_dir)
    return None if bad is None else f"{bad} is a symbolic link or not a folder; the cache never writes through it"


def _print(obj, as_json: bool, text: str) -> None:
    print(json.dumps(obj, indent=2) if as_json else text)


def cmd_list(cache: DiskCache, args) -> int:
    rows, now = scan(cache), time.time()
    shown = [{**r.summary(), "size": format_size(r.size), "used": format_age(now - r.last_used)} for r in rows]
    _print([r.summary() for r in rows], args.json, table(shown, WIDE_COLUMNS if args.wide else LIST_COLUMNS))
    return 0


def cmd_show(cache: DiskCache, args) -> int:
    matches = [r for r in scan(cache) if r.key.startswith(args.key)]
    if len(matches) != 1:
        raise UsageError(f"KEY_PREFIX: expected exactly one entry starting with {args.key!r}, found {len(matches)}")
    row = matches[0]
    if row.entry is None:
        _print(row.summary(), args.json, f"{row.key}: CORRUPT ({row.problem})")
        return 1
    h = row.entry.header
    obj = {**row.summary(), "inputs": h.inputs, "lowered_names": h.lowered_names, "log": h.log}
    if args.source:
        obj["source"] = h.source
        obj["headers"] = h.headers
    spec = ", ".join(f"{k}={v}" for k, v in shown_fields(h.spec).items())
    text = [f"key            {row.key}", f"status         {h.status}", f"spec           {spec}",
            f"path           {row.path}", f"size           {format_size(row.size)} ({row.size} bytes)",
            f"created        {h.created_at}", f"last used      {_iso(row.last_used)}",
            f"compile        {h.compile_seconds:.3f} s", "key inputs (as hashed):"]
    text += [f"  {k:17}{json.dumps(v)}" for k, v in sorted(h.inputs.items())]
    text += ["lowered names:"] + [f"  {k} -> {v}" for k, v in h.lowered_names.items()]
    text += ["log:", h.log or "  (empty)"]
    if args.source:
        text += ["source:", h.source]
        text += [f"--- header {n} ---\n{t}" for n, t in sorted(h.headers.items())]
    _print(obj, args.json, "\n".join(text))
    return 0


def cmd_verify(cache: DiskCache, args) -> int:
    rows = scan(cache)
    bad = [r for r in rows if r.entry is None]
    moved, left = [], []  # left: the problems still there when verify ends
    for r in bad:
        try:
            target = cache.quarantine(r.path) if args.fix else None
        except CacheWriteError as exc:
            left.append({"path": str(r.path), "problem": str(exc)})
            continue
        if target is not None:
            moved.append(str(target))
        elif not args.fix:
            left.append({"path": str(r.path), "problem": r.problem})
    quarantine = _bad_quarantine(cache)
    if quarantine:
        left.append({"path": str(cache.quarantine_dir), "problem": quarantine})
    obj = {"entries": len(rows), "corrupt": [{"key": r.key, "problem": r.problem} for r in bad],
           "quarantined": moved, "not_fixed": left}
    text = [f"{r.key[:16]}  CORRUPT: {r.problem}" for r in bad]
    text += [f"NOT FIXED {p['path']}: {p['problem']}" for p in left] if args.fix else ([quarantine] if quarantine else [])
    text.append(f"{len(rows)} entries, {len(bad)} corrupt" + (f", {len(moved)} quarantined" if args.fix else ""))
    _print(obj, args.json, "\n".join(text))
    return 1 if left else 0


def _doomed(rows: list[Row], args) -> list[Row]:
    """The entries prune removes: least recently used first."""
    max_size = _parsed(parse_size, args.max_size, "--max-size")
    max_age = _parsed(parse_age, args.older_than, "--older-than")
    rows = sorted(rows, key=lambda r: r.last_used)
    total, now, doomed = sum(r.size for r in rows), time.time(), []
    for r in rows:
        if (args.all or (args.failed and r.entry is not None and r.entry.failed)
                or (max_age is not None and now - r.last_used > max_age)
                or (max_size is not None and total > max_size)):
            doomed.append(r)
            total -= r.size
    return doomed


def _parsed(parse, text: str | None, flag: str):
    if text is None:
        return None
    try:
        return parse(text)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def cmd_prune(cache: DiskCache, args) -> int:
    if not (args.all or args.failed or args.max_size is not None or args.older_than is not None):
        raise UsageError("prune: expected --all, --failed, --max-size or --older-than")
    rows = scan(cache)
    doomed = [r.path for r in _doomed(rows, args)]
    leftovers = cache.stale_temp_paths() + (cache.quarantined_paths() if args.all else [])
    locks = stale_lock_paths()
    freed = sum(_size(p) for p in doomed + leftovers + locks)
    if not args.dry_run:
        for path in doomed + leftovers:
            cache.remove(path)
        for path in locks:
            path.unlink(missing_ok=True)
    obj = {"removed": [p.name.split(".")[0] for p in doomed], "leftovers": [str(p) for p in leftovers + locks],
           "freed_bytes": freed, "kept": len(rows) - len(doomed), "dry_run": args.dry_run}
    verb = "would remove" if args.dry_run else "removed"
    _print(obj, args.json, f"{verb} {len(doomed)} entries and {len(leftovers) + len(locks)} left-over files "
                           f"({format_size(freed)}); kept {obj['kept']}")
    return 0


def _size(path: Path) -> int:
    """Bytes under `path`, not following links."""
    if path.is_dir() and not path.is_symlink():
        return sum(_size(p) for p in path.iterdir())
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0


def cmd_stats(cache: DiskCache, args) -> int:
    rows = scan(cache)
    good = [r for r in rows if r.entry is not None]
    temps = list(cache.temp_paths())
    obj = {
        "cache_dir": str(cache.root),
        "entries": len(rows),
        "bytes": sum(r.size for r in rows),
        "ok": sum(1 for r in good if not r.entry.failed),
        "failed_compiles": sum(1 for r in good if r.entry.failed),
        "corrupt": len(rows) - len(good),
        "quarantined": len(cache.quarantined_paths()),
        "temp_files": len(temps),
        "stale_temp_files": len(cache.stale_temp_paths()),
        "stale_lock_files": len(stale_lock_paths()),
        "compile_seconds_total": round(sum(r.entry.header.compile_seconds for r in good), 3),
        "by_template": dict(Counter(r.entry.header.spec.get("template", "?") for r in good)),
        "by_arch": dict(Counter(r.entry.header.spec.get("arch", "?") for r in good)),
        "by_nvrtc": dict(Counter(r.entry.header.nvrtc_version for r in good)),
    }
    totals = [{"what": k.replace("_", " "), "value": format_size(v) if k == "bytes" else v}
              for k, v in obj.items() if not k.startswith("by_")]
    text = [table(totals, [("what", 22), ("value", 0)])]
    for k in ("by_template", "by_arch", "by_nvrtc"):
        counts = [{k[3:]: name, "entries": n} for name, n in sorted(obj[k].items())]
        text += ["", table(counts, [(k[3:], 22), ("entries", -7)])]
    _print(obj, args.json, "\n".join(text))
    return 0


def cmd_config(cache: DiskCache, args) -> int:
    return show_config(args.json)


COMMANDS = {"list": cmd_list, "show": cmd_show, "verify": cmd_verify, "prune": cmd_prune, "stats": cmd_stats,
            "config": cmd_config, "coverage": coverage.cmd_coverage, "export": bundle.cmd_export,
            "import": bundle.cmd_import}


def build_parser() -> OneLineParser:
    common = OneLineParser(add_help=False)
    common.add_argument("--cache-dir", type=Path, help="cache root (default: $EP_JIT_CACHE_DIR ...)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    p = OneLineParser(prog="cache-inspect", description="Inspect and maintain the ep_jit kernel cache.",
                      epilog=EPILOG)
    p.add_version()
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    listing = sub.add_parser("list", parents=[common], help="one row per entry")
    listing.add_argument("--wide", action="store_true", help="every column, keys in full (wider than 100)")
    show = sub.add_parser("show", parents=[common], help="everything about one entry")
    show.add_argument("key", metavar="KEY_PREFIX")
    show.add_argument("--source", action="store_true", help="also print the rendered source")
    verify = sub.add_parser("verify", parents=[common], help="check every entry; exit 1 if one is corrupt")
    verify.add_argument("--fix", action="store_true", help="move corrupt entries to quarantine/")
    prune = sub.add_parser("prune", parents=[common], help="remove entries, least recently used first")
    prune.add_argument("--max-size", help="keep at most this much (500M, 2G, 2GiB)")
    prune.add_argument("--older-than", help="remove entries not used for this long (30d, 12h)")
    prune.add_argument("--failed", action="store_true", help="remove remembered compile failures")
    prune.add_argument("--all", action="store_true", help="remove every entry and empty quarantine/")
    prune.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    sub.add_parser("stats", parents=[common], help="totals, left-over files, counts by template, arch, NVRTC")
    sub.add_parser("config", parents=[common], help="versions, paths and every EP_JIT_* setting in force")
    coverage.add_parser(sub, common)
    bundle.add_parsers(sub, common)
    return p


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config.check_environment()
        cache = DiskCache(config.check_folder(args.cache_dir, "--cache-dir") if args.cache_dir else None)
        cache.check_root()
        return COMMANDS[args.command](cache, args)
    except (UsageError, ConfigError) as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    return run(lambda: _main(argv))
