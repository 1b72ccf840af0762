"""ep_jit.warm: bring a set of kernels into every member's memory tier with one compile
per key per group, whatever the filesystem.

Round 1: every member reports the keys of its specs, which of them it can hand out (a
verified entry in its local cache or a shared tier) and which it lacks. Every member
derives the same plan from the reports: each key lacking somewhere goes to a member that
holds it or, where none does, to the least-loaded member that needs it, which compiles
it. Round 2: the members pass their shares' entries round through the group's object
all-gather (compact: see _pack); each member verifies what it lacks against its key and
publishes it into its own local cache. A member that fails before a round still joins it, carrying its error,
so every member raises instead of waiting for it.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Any, Callable, Iterable

from .cache import CorruptEntry, DiskCache, Entry, EntryHeader
from .config import always_compile, log, require_warm
from .errors import CompileError, GroupWarmError
from .frameworks import group_all_gather, group_info
from .jit import (OUTCOME_FIELDS, KernelBinary, Tier, cached, entry_header, fetch_or_build, find, get_kernel, install,
                  keyed, not_warm, publish, resolve, spec_key)
from .spec import KernelSpec

Gather = Callable[[Any], list]
Plan = dict[str, tuple[int, str]]  # key -> (member that provides it, "send" or "compile")


def warm(specs: Iterable[KernelSpec], group: Any, *, all_gather: Gather | None = None) -> list[KernelBinary]:
    """Every kernel of `specs` for this member, in order, each key compiled at most once in
    the group. Collective: every member of `group` (a torch or paddle group, or a GroupInfo
    with `all_gather(obj) -> list` in group-rank order) calls it. A failed compile raises
    the same CompileError, with the NVRTC log, on every member; a member that cannot take
    part makes every member raise GroupWarmError naming it. A peer that never arrives is
    bounded by the gather's own timeout (the process group's)."""
    wanted = list(specs)
    unique = list(dict.fromkeys(wanted))
    info = group_info(group)
    gather = group_all_gather(group, info.size, all_gather)
    cache = DiskCache()
    found: dict[str, tuple[Entry, Tier]] = {}
    keys: list[str] = []
    reports = _exchange(gather, lambda: _survey(unique, cache, keys, found))
    if any(r["always_compile"] for r in reports):  # EP_JIT_ALWAYS_COMPILE: no disk, no sharing, anywhere
        return [resolve(s)[0] for s in wanted]
    plan = _plan(reports)
    to_compile = [k for k, (_, action) in plan.items() if action == "compile"]
    if to_compile and any(r["require_warm"] for r in reports):
        names = [r["lacking"][k] for k in to_compile for r in reports if k in r["lacking"]]
        raise not_warm(list(dict.fromkeys(names)), cache)
    received: dict[str, Wire] = {}
    if plan:
        by_key = dict(zip(keys, unique))
        for share in _exchange(gather, lambda: _share(plan, info.rank, by_key, found, cache)):
            received.update(share)
    binaries = _install_all(unique, keys, found, received, cache)
    return [binaries[s] for s in wanted]


def _exchange(gather: Gather, make: Callable[[], Any]) -> list:
    """One round: gather every member's `make()`, or its error, so that no member waits
    for one that failed; any error is raised on every member."""
    try:
        mine = {"ok": make()}
    except Exception as exc:  # noqa: BLE001 - carried to every member, re-raised below
        mine, cause = {"error": f"{type(exc).__name__}: {exc}"}, exc
    else:
        cause = None
    everyone = gather(mine)
    errors = [f"rank {r}: {m['error']}" for r, m in enumerate(everyone) if "error" in m]
    if errors:
        raise GroupWarmError(f"ep_jit.warm: a member could not take part ({'; '.join(errors)})") from cause
    return [m["ok"] for m in everyone]


def _survey(specs: list[KernelSpec], cache: DiskCache, keys: list[str], found: dict) -> dict:
    """Round 1's report: keys, those this member can hand out, those it lacks (with the
    spec's description, for messages). Fills `keys` (in spec order) and `found` (key ->
    the entry this member holds)."""
    lacking = {}
    for spec in specs:
        key = spec_key(spec)
        keys.append(key)
        if cached(spec) is not None:
            continue
        hit = None if always_compile() else find(key, cache)
        if hit is None:
            lacking[key] = spec.describe()
        else:
            found[key] = hit
    return {"keys": set(keys), "held": set(found), "lacking": lacking, "require_warm": require_warm(),
            "always_compile": always_compile()}


def _plan(reports: list[dict]) -> Plan:
    """The same on every member: who sends or compiles each key that some member lacks.
    Holders send (cheap); otherwise the member needing it with the fewest compiles so far
    compiles it."""
    compiles, sends = [0] * len(reports), [0] * len(reports)
    plan: Plan = {}
    for key in sorted({k for r in reports for k in r["lacking"]}):
        holders = [i for i, r in enumerate(reports) if key in r["held"]]
        if holders:
            rank = min(holders, key=lambda i: (sends[i], i))
            sends[rank] += 1
            plan[key] = (rank, "send")
        else:
            needers = [i for i, r in enumerate(reports) if key in r["keys"]]
            rank = min(needers, key=lambda i: (compiles[i], sends[i], i))
            compiles[rank] += 1
            plan[key] = (rank, "compile")
    return plan


def _share(plan: Plan, me: int, by_key: dict[str, KernelSpec], found: dict, cache: DiskCache) -> dict[str, Wire]:
    """Round 2's payload: the entries of this member's share, compiling where planned
    (a failed compile is an entry too, so every member raises its error)."""
    out = {}
    for key, (rank, action) in plan.items():
        if rank != me:
            continue
        if action == "compile":
            found[key] = fetch_or_build(by_key[key], cache, require_warm=False)
        out[key] = _pack(found[key][0])
    return out


# What travels for an entry is what its compile made (OUTCOME_FIELDS) and its compressed
# payload with a digest: the rest of the header follows from the key, which every member
# that needs the entry has rendered itself. So a message stays small (tens of KB): through
# a fresh gloo group the first message above ~32 KB costs about 0.2 s.
Wire = tuple[dict, bytes, str]


def _pack(entry: Entry) -> Wire:
    return ({f: getattr(entry.header, f) for f in OUTCOME_FIELDS}, zlib.compress(entry.payload, 6),
            hashlib.sha256(entry.payload).hexdigest())


def _unpack(spec: KernelSpec, key: str, wire: Wire) -> tuple[EntryHeader, bytes]:
    """The verified header and payload of a peer's entry for `key` (CorruptEntry if not)."""
    try:
        outcome, packed, digest = wire
        payload = zlib.decompress(packed)
    except (TypeError, ValueError, zlib.error) as exc:
        raise CorruptEntry(f"not an entry message ({exc})") from None
    if not isinstance(outcome, dict) or hashlib.sha256(payload).hexdigest() != digest:
        raise CorruptEntry("payload checksum mismatch")
    source, inputs, own_key = keyed(spec)
    if own_key != key:
        raise CorruptEntry(f"it was sent for key {key[:16]}, this member's key is {own_key[:16]}")
    return entry_header(source, inputs, key, **outcome), payload


def _install_all(specs: list[KernelSpec], keys: list[str], found: dict, received: dict[str, Wire],
                 cache: DiskCache) -> dict[KernelSpec, KernelBinary]:
    """Memory-tier binaries for every spec; the first compile failure is raised after the rest are in."""
    binaries: dict[KernelSpec, KernelBinary] = {}
    failure: CompileError | None = None
    for spec, key in zip(specs, keys):
        try:
            if key in found:
                binaries[spec] = install(spec, *found[key])
            elif key in received and cached(spec) is None:
                binaries[spec] = _adopt(spec, key, received[key], cache)
            else:
                binaries[spec] = get_kernel(spec)  # already in the memory tier
        except CompileError as exc:
            failure = failure or exc
    if failure is not None:
        raise failure
    return binaries


def _adopt(spec: KernelSpec, key: str, wire: Wire, cache: DiskCache) -> KernelBinary:
    """Verify a peer's entry against the key, publish it locally, load it into memory.
    A message that does not verify is a miss: the kernel is then built here."""
    try:
        header, payload = _unpack(spec, key, wire)
    except CorruptEntry as exc:
        log.warning("entry %s from a peer does not verify (%s); building it here", key[:16], exc)
        return resolve(spec, cache)[0]
    return install(spec, publish(cache, key, header, payload), "peer")
