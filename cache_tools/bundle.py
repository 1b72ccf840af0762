"""Bundles: verified cache entries in one tar file, to bake into a container image or ship
beside a wheel.

    cache-inspect export OUT.tar [--plan PLAN.toml | --preset NAME]
    cache-inspect import IN.tar [--cache-dir DIR]

A bundle holds `manifest.json` (what it is, and the sha256 and size of every entry) and
`entries/<key>.entry`, nothing else. Import reads and verifies everything (the manifest,
each entry's hash, each entry against its key) before it publishes anything; a bundle
that fails any check is refused whole, exit 1 with a one-line reason. Members are never
extracted by path, so none can land outside the cache; a link, a path that climbs out
(`..`, absolute) or any unexpected name refuses the bundle.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import tarfile
import tempfile
import zlib
from datetime import datetime, timezone
from pathlib import Path

from ep_jit.cache import CacheWriteError, CorruptEntry, DiskCache, decode_entry, encode_entry
from ep_jit.jit import spec_key
from ep_jit.version import __version__

from .coverage import add_plan_arguments, selected_specs

KIND = "ep_jit-bundle"
FORMAT = 1
MANIFEST = "manifest.json"
_ENTRY_NAME = re.compile(r"^entries/([0-9a-f]{64})\.entry$")
MAX_MEMBER_BYTES = 256 * 2**20  # far above any cubin; bounds what a hostile bundle makes us read


class BundleRefused(Exception):
    """A bundle that is not imported; the message is the one-line reason."""


def add_parsers(sub, common) -> None:
    export = sub.add_parser("export", parents=[common], help="write verified entries and a manifest to a tar")
    export.add_argument("out", type=Path, metavar="OUT.tar")
    add_plan_arguments(export, positional=False, required=False)  # default: every verified entry
    imp = sub.add_parser("import", parents=[common], help="verify a bundle, then publish its entries")
    imp.add_argument("bundle", type=Path, metavar="IN.tar")


# ---- export -------------------------------------------------------------------------

def _selected(cache: DiskCache, args) -> dict[str, bytes]:
    """key -> entry file bytes of the verified, successfully compiled entries to export."""
    specs = selected_specs(args)
    wanted = None if specs is None else {spec_key(s) for s in specs}
    out = {}
    for path in cache.entry_paths():
        try:
            entry = cache.load(path)
        except (CorruptEntry, OSError):
            continue  # cache-inspect verify reports these; a bundle carries only good entries
        if not entry.failed and (wanted is None or entry.key in wanted):
            out[entry.key] = encode_entry(entry.header, entry.payload)  # the bytes that verified
    if wanted is not None and wanted - set(out):
        raise BundleRefused(f"{len(wanted - set(out))} of the plan's {len(wanted)} kernels are not in {cache.root}; "
                            f"run ep-jit-warm with the same plan first")
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o600, int(mtime)
    tar.addfile(info, io.BytesIO(data))


def export(cache: DiskCache, out: Path, args) -> dict:
    entries = _selected(cache, args)
    now = datetime.now(timezone.utc)
    manifest = {"kind": KIND, "format": FORMAT, "ep_jit": __version__, "created_at": now.isoformat(timespec="seconds"),
                "entries": {k: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for k, d in entries.items()}}
    out = out.absolute()
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    except OSError as exc:
        raise BundleRefused(f"cannot write {out}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
            _add(tar, MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode(), now.timestamp())
            for key, data in sorted(entries.items()):
                _add(tar, f"entries/{key}.entry", data, now.timestamp())
        os.replace(tmp, out)  # a reader never sees half a bundle
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"bundle": str(out), "entries": len(entries), "bytes": out.stat().st_size}


# ---- import -------------------------------------------------------------------------

def _check_member(member: tarfile.TarInfo) -> None:
    name = member.name
    if name.startswith("/") or ".." in Path(name).parts:
        raise BundleRefused(f"member {name!r} has a path that escapes the cache")
    if not member.isreg():
        raise BundleRefused(f"member {name!r} is a link or a special file, not a regular file")
    if name != MANIFEST and not _ENTRY_NAME.match(name):
        raise BundleRefused(f"member {name!r} is not {MANIFEST} or entries/<key>.entry")
    if member.size > MAX_MEMBER_BYTES:
        raise BundleRefused(f"member {name!r} is {member.size} bytes, more than an entry can be")


def _read_members(path: Path) -> dict[str, bytes]:
    """Every member's bytes, after its header passed _check_member."""
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for member in tar:
                _check_member(member)
                if member.name in members:
                    raise BundleRefused(f"member {member.name!r} appears twice")
                members[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise BundleRefused(f"not a readable tar file (truncated, or not a bundle): {exc}") from None
    return members


def _manifest(members: dict[str, bytes]) -> dict:
    try:
        manifest = json.loads(members.pop(MANIFEST))
    except KeyError:
        raise BundleRefused(f"no {MANIFEST}: not an ep_jit bundle") from None
    except ValueError as exc:
        raise BundleRefused(f"{MANIFEST} is not JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise BundleRefused(f"{MANIFEST} does not describe an ep_jit bundle")
    if manifest.get("format") != FORMAT:
        raise BundleRefused(f"bundle format {manifest.get('format')!r}, this ep_jit reads format {FORMAT}")
    if not isinstance(manifest.get("entries"), dict):
        raise BundleRefused(f"{MANIFEST} has no entry list")
    return manifest


def verified_entries(path: Path) -> dict[str, tuple[dict, bytes]]:
    """key -> (header, payload) of every entry of the bundle, all verified; raises BundleRefused."""
    members = _read_members(path)
    listed = _manifest(members)["entries"]
    present = {_ENTRY_NAME.match(name).group(1): data for name, data in members.items()}
    if set(listed) != set(present):
        odd = sorted(set(listed) ^ set(present))
        raise BundleRefused(f"the manifest and the entries differ ({len(odd)} keys, e.g. {odd[0][:16]})")
    out = {}
    for key, data in sorted(present.items()):
        if not isinstance(listed[key], dict) or listed[key].get("sha256") != hashlib.sha256(data).hexdigest():
            raise BundleRefused(f"entry {key[:16]} does not match the manifest's sha256 (tampered)")
        try:
            out[key] = decode_entry(data, key)
        except CorruptEntry as exc:
            raise BundleRefused(f"entry {key[:16]} does not verify: {exc}") from None
    return out


def import_bundle(cache: DiskCache, path: Path) -> dict:
    entries = verified_entries(path)  # all of it, before anything is written
    present = 0
    for key, (header, payload) in entries.items():
        try:
            cache.load(cache.entry_path(key))
            present += 1
            continue
        except (CorruptEntry, OSError):
            pass
        cache.write(key, header, payload)
    return {"bundle": str(path), "cache_dir": str(cache.root), "entries": len(entries),
            "imported": len(entries) - present, "already_present": present}


# ---- commands -------------------------------------------------------------------------

def _refused(verb: str, exc: Exception) -> int:
    reason = " ".join(str(exc).split())  # one line, whatever the library said
    sys.stderr.write(f"cache-inspect: error: {verb}: {reason}\n")
    return 1


def cmd_export(cache: DiskCache, args) -> int:
    try:
        out = export(cache, args.out, args)
    except BundleRefused as exc:
        return _refused("export", exc)
    print(json.dumps(out, indent=2) if args.json else f"exported {out['entries']} entries to {out['bundle']}")
    return 0


def cmd_import(cache: DiskCache, args) -> int:
    try:
        out = import_bundle(cache, args.bundle)
    except (BundleRefused, CacheWriteError) as exc:  # a cache that cannot be written: what landed stays valid
        return _refused(f"import {args.bundle}", exc)
    print(json.dumps(out, indent=2) if args.json else
          f"imported {out['imported']} entries into {out['cache_dir']} ({out['already_present']} already there)")
    return 0
