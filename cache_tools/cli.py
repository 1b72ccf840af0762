"""cache-inspect {list,show,verify,prune,stats,coverage,export,import} [--cache-dir DIR] [--json]

Exit status: 0 on success, 1 when `verify` finds a corrupt entry, `coverage` a missing
kernel, or `export`/`import` refuse a bundle, 2 on bad arguments (one line on stderr,
nothing written).
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ep_jit.cache import CorruptEntry, DiskCache, Entry
from ep_jit.cli import OneLineParser
from ep_jit.errors import ConfigError

from . import bundle, coverage

_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)i?B?$", re.IGNORECASE)
_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class UsageError(ValueError):
    pass


def parse_size(text: str) -> int:
    m = _SIZE.match(text.strip())
    if not m:
        raise UsageError(f"--max-size: expected bytes like 500M or 2G, got {text!r}")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def parse_age(text: str) -> float:
    m = _AGE.match(text.strip())
    if not m:
        raise UsageError(f"--older-than: expected an age like 30d, 12h or 90m, got {text!r}")
    return float(m.group(1)) * _AGE_UNITS[m.group(2)]


@dataclass
class Row:
    """One entry file as cache-inspect sees it."""

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
        spec = dict(h.get("spec", {}))
        return {**d, "status": h.get("status"), "template": spec.pop("template", "?"),
                "group": spec.pop("member_hash", "?"), "arch": spec.pop("arch", "?"), "params": spec,
                "nvrtc": h.get("nvrtc_version"), "created": h.get("created_at"),
                "compile_seconds": h.get("compile_seconds")}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def scan(cache: DiskCache) -> list[Row]:
    rows = []
    for path in cache.entry_paths():
        try:
            st = path.stat()
        except FileNotFoundError:  # pruned or quarantined meanwhile
            continue
        try:
            rows.append(Row(path, st.st_size, st.st_atime, cache.load(path)))
        except (CorruptEntry, OSError) as exc:
            rows.append(Row(path, st.st_size, st.st_atime, None, str(exc)))
    return rows


def _print(obj, as_json: bool, text: str) -> None:
    print(json.dumps(obj, indent=2) if as_json else text)


def cmd_list(cache: DiskCache, args) -> int:
    rows = [r.summary() for r in scan(cache)]
    lines = [f"{'key':12}  {'template':10}  {'params':64}  {'group':12}  {'arch':7}  {'nvrtc':5}  "
             f"{'size':>8}  {'created':25}  last used"]
    for r in rows:
        if r["status"] == "corrupt":
            lines.append(f"{r['key'][:12]}  CORRUPT: {r['problem']}")
            continue
        params = ",".join(f"{k}={v}" for k, v in r["params"].items())
        status = "" if r["status"] == "ok" else f"  [{r['status']}]"
        lines.append(f"{r['key'][:12]}  {r['template']:10}  {params:64}  {r['group'][:12]}  {r['arch']:7}  "
                     f"{r['nvrtc']:5}  {r['size']:>8}  {r['created']:25}  {r['last_used']}{status}")
    _print(rows, args.json, "\n".join(lines))
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
    obj = {**row.summary(), "inputs": h.get("inputs"), "lowered_names": h.get("lowered_names"), "log": h.get("log")}
    if args.source:
        obj["source"] = h.get("source")
        obj["headers"] = h.get("headers")
    text = [f"key            {row.key}", f"status         {h.get('status')}", f"path           {row.path}",
            f"size           {row.size}", f"created        {h.get('created_at')}", f"last used      {_iso(row.last_used)}",
            f"compile        {h.get('compile_seconds', 0):.3f} s", "inputs:"]
    text += [f"  {k:17}{json.dumps(v)}" for k, v in sorted(h.get("inputs", {}).items())]
    text += ["lowered names:"] + [f"  {k} -> {v}" for k, v in h.get("lowered_names", {}).items()]
    text += ["log:", h.get("log") or "  (empty)"]
    if args.source:
        text += ["source:", h.get("source", "")]
        text += [f"--- header {n} ---\n{t}" for n, t in sorted(h.get("headers", {}).items())]
    _print(obj, args.json, "\n".join(text))
    return 0


def cmd_verify(cache: DiskCache, args) -> int:
    rows = scan(cache)
    bad = [r for r in rows if r.entry is None]
    moved = []
    if args.fix:
        for r in bad:
            target = cache.quarantine(r.path, r.problem)
            if target is not None:
                moved.append(str(target))
    obj = {"entries": len(rows), "corrupt": [{"key": r.key, "problem": r.problem} for r in bad],
           "quarantined": moved}
    text = [f"{r.key[:16]}  CORRUPT: {r.problem}" for r in bad]
    text.append(f"{len(rows)} entries, {len(bad)} corrupt" + (f", {len(moved)} quarantined" if args.fix else ""))
    _print(obj, args.json, "\n".join(text))
    return 1 if bad else 0


def cmd_prune(cache: DiskCache, args) -> int:
    if not (args.all or args.max_size is not None or args.older_than is not None):
        raise UsageError("prune: expected --all, --max-size or --older-than")
    max_size = parse_size(args.max_size) if args.max_size is not None else None
    max_age = parse_age(args.older_than) if args.older_than is not None else None
    rows = sorted(scan(cache), key=lambda r: r.last_used)  # least recently used first
    total = sum(r.size for r in rows)
    now = time.time()
    doomed = []
    for r in rows:
        if args.all or (max_age is not None and now - r.last_used > max_age) or (
                max_size is not None and total > max_size):
            doomed.append(r)
            total -= r.size
    if not args.dry_run:
        for r in doomed:
            r.path.unlink(missing_ok=True)
    obj = {"removed": [r.key for r in doomed], "freed_bytes": sum(r.size for r in doomed),
           "kept": len(rows) - len(doomed), "dry_run": args.dry_run}
    verb = "would remove" if args.dry_run else "removed"
    _print(obj, args.json, f"{verb} {len(doomed)} entries ({obj['freed_bytes']} bytes); kept {obj['kept']}")
    return 0


def cmd_stats(cache: DiskCache, args) -> int:
    rows = scan(cache)
    good = [r for r in rows if r.entry is not None]
    quarantined = list(cache.quarantine_dir.iterdir()) if cache.quarantine_dir.is_dir() else []
    obj = {
        "cache_dir": str(cache.root),
        "entries": len(rows),
        "bytes": sum(r.size for r in rows),
        "ok": sum(1 for r in good if not r.entry.failed),
        "failed_compiles": sum(1 for r in good if r.entry.failed),
        "corrupt": len(rows) - len(good),
        "quarantined": len(quarantined),
        "compile_seconds_total": round(sum(r.entry.header.get("compile_seconds", 0) for r in good), 3),
        "by_template": dict(Counter(r.entry.header.get("spec", {}).get("template", "?") for r in good)),
        "by_arch": dict(Counter(r.entry.header.get("spec", {}).get("arch", "?") for r in good)),
        "by_nvrtc": dict(Counter(r.entry.header.get("nvrtc_version", "?") for r in good)),
    }
    _print(obj, args.json, "\n".join(f"{k:22}{v}" for k, v in obj.items()))
    return 0


COMMANDS = {"list": cmd_list, "show": cmd_show, "verify": cmd_verify, "prune": cmd_prune, "stats": cmd_stats,
            "coverage": coverage.cmd_coverage, "export": bundle.cmd_export, "import": bundle.cmd_import}


def build_parser() -> OneLineParser:
    common = OneLineParser(add_help=False)
    common.add_argument("--cache-dir", type=Path, help="cache root (default: $EP_JIT_CACHE_DIR ...)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    p = OneLineParser(prog="cache-inspect", description="Inspect and maintain the ep_jit kernel cache.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    sub.add_parser("list", parents=[common], help="one row per entry")
    show = sub.add_parser("show", parents=[common], help="everything about one entry")
    show.add_argument("key", metavar="KEY_PREFIX")
    show.add_argument("--source", action="store_true", help="also print the rendered source")
    verify = sub.add_parser("verify", parents=[common], help="check every entry; exit 1 if one is corrupt")
    verify.add_argument("--fix", action="store_true", help="move corrupt entries to quarantine/")
    prune = sub.add_parser("prune", parents=[common], help="remove entries, least recently used first")
    prune.add_argument("--max-size", help="keep at most this many bytes (500M, 2G)")
    prune.add_argument("--older-than", help="remove entries not used for this long (30d, 12h)")
    prune.add_argument("--all", action="store_true", help="remove every entry")
    prune.add_argument("--dry-run", action="store_true", help="say what would go; remove nothing")
    sub.add_parser("stats", parents=[common], help="totals by template, arch and NVRTC version")
    coverage.add_parser(sub, common)
    bundle.add_parsers(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cache = DiskCache(args.cache_dir)
        if cache.root.exists() and not cache.root.is_dir():
            raise UsageError(f"--cache-dir: expected a folder, got the file {cache.root}")
        cache.check_root()
        return COMMANDS[args.command](cache, args)
    except (UsageError, ConfigError) as exc:
        parser.error(str(exc))
