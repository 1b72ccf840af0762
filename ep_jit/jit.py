"""get_kernel(spec): the tiers, memory -> local disk -> shared read-only tiers -> NVRTC.

The memory tier is a dict keyed by the frozen spec, so a hit costs one hash and no
file or key work. A miss renders the source, computes the key, reads the verified
local entry, then the shared tiers (a hit there is copied into the local cache), and
otherwise compiles under the key's lock and publishes the entry. Compile failures are
remembered in memory and on disk, so later calls and other ranks fail fast with the
same NVRTC log. With EP_JIT_REQUIRE_WARM=1 a miss in every tier raises instead.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Literal

from . import config
from .version import __version__
from .cache import CacheWriteError, DiskCache, Entry, EntryHeader, make_key
from .compiler import Source, compile_source, nvrtc_version, render
from .config import log
from .errors import CompileError, NotWarmError
from .shared import read_shared
from .spec import KernelSpec

# "peer": the entry came from another member of the group (ep_jit.warm)
Tier = Literal["memory", "disk", "shared", "peer", "compiled"]


@dataclass(frozen=True)
class KernelBinary:
    """A verified cubin and the mangled names of the kernels in it."""

    spec: KernelSpec
    key: str
    cubin: bytes
    lowered_names: dict[str, str]

    def symbol(self, kernel: str | None = None) -> str:
        """The mangled name of catalogue kernel `kernel` (default: the template's first)."""
        return self.lowered_names[self.spec.name_expression(kernel) if kernel else self.spec.name_expressions()[0]]


@dataclass
class Stats:
    memory_hits: int = 0
    disk_hits: int = 0
    shared_hits: int = 0
    peer_hits: int = 0
    compiles: int = 0
    compile_failures: int = 0
    compile_seconds: float = 0.0
    load_seconds: float = 0.0
    lock_wait_seconds: float = 0.0


_stats = Stats()
_HIT_COUNTERS = {"disk": "disk_hits", "shared": "shared_hits", "peer": "peer_hits"}
_memory: dict[KernelSpec, KernelBinary] = {}
_failures: dict[KernelSpec, CompileError] = {}
_mutex = threading.Lock()
_unwritable: set[str] = set()  # cache roots this process has warned about


def stats() -> dict[str, float]:
    """This process's cache counters."""
    return asdict(_stats)


def record_load(seconds: float) -> None:
    """Time spent loading a binary into a GPU context (counted with disk reads)."""
    _stats.load_seconds += seconds


def clear_memory_cache() -> None:
    """Forget loaded kernels and remembered failures (the disk cache stays)."""
    with _mutex:
        _memory.clear()
        _failures.clear()


def get_kernel(spec: KernelSpec) -> KernelBinary:
    """The kernel binary for `spec`, from memory, disk or NVRTC."""
    binary = _memory.get(spec)
    if binary is not None:
        _stats.memory_hits += 1
        return binary
    return resolve(spec)[0]


def resolve(spec: KernelSpec, cache: DiskCache | None = None, *,
            require_warm: bool | None = None, must_publish: bool = False) -> tuple[KernelBinary, Tier]:
    """get_kernel's slow path, also saying which tier answered (ep-jit-warm reports it).
    `require_warm`: refuse to compile (default: EP_JIT_REQUIRE_WARM). A kernel that
    compiled but could not be written to the cache is still returned, with one warning
    per cache root, unless `must_publish` (then CacheWriteError is raised)."""
    with _mutex:
        if spec in _memory:
            _stats.memory_hits += 1
            return _memory[spec], "memory"
        if spec in _failures:
            raise _failures[spec]
        config.check_environment()
        cache = cache or DiskCache()
        if config.always_compile():
            entry, tier = _compile_and_publish(*keyed(spec), None, must_publish), "compiled"
        else:
            entry, tier = fetch_or_build(spec, cache, require_warm=require_warm, must_publish=must_publish)
        return _install(spec, entry, tier), tier


def cached(spec: KernelSpec) -> KernelBinary | None:
    """The memory tier's binary for `spec`, if any (counts no hit)."""
    return _memory.get(spec)


def install(spec: KernelSpec, entry: Entry, tier: Tier) -> KernelBinary:
    """Put a verified entry into the memory tier; a failed compile's entry raises its CompileError."""
    with _mutex:
        return _install(spec, entry, tier)


def _install(spec: KernelSpec, entry: Entry, tier: Tier) -> KernelBinary:
    if entry.failed:
        exc = _failures[spec] = remembered_failure(spec, entry)
        raise exc
    if tier in _HIT_COUNTERS:
        setattr(_stats, _HIT_COUNTERS[tier], getattr(_stats, _HIT_COUNTERS[tier]) + 1)
    binary = _memory[spec] = KernelBinary(spec, entry.key, entry.payload, entry.header.lowered_names)
    return binary


def keyed(spec: KernelSpec) -> tuple[Source, dict, str]:
    """The rendered source of `spec`, its key inputs and its key (reads and writes nothing)."""
    source = render(spec)
    inputs, key = make_key(source.key_inputs())
    return source, inputs, key


def spec_inputs(spec: KernelSpec) -> tuple[dict, str]:
    """The key inputs of `spec` and the key they hash to: renders and hashes, reads and writes nothing."""
    return keyed(spec)[1:]


def spec_key(spec: KernelSpec) -> str:
    """The cache key of `spec`: renders and hashes, reads and writes nothing."""
    return keyed(spec)[2]


def lookup(spec: KernelSpec, cache: DiskCache) -> tuple[str, Entry | None]:
    """The spec's key and its verified local disk entry, if any. Compiles nothing."""
    key = spec_key(spec)
    return key, _read(cache, key)


def find(key: str, cache: DiskCache) -> tuple[Entry, Tier] | None:
    """The verified entry for `key` from the local disk or, copied into it, a shared tier."""
    entry = _read(cache, key)
    if entry is not None:
        return entry, "disk"
    start = time.perf_counter()
    shared = read_shared(key)
    _stats.load_seconds += time.perf_counter() - start
    if shared is None:
        return None
    return publish(cache, key, shared.header, shared.payload), "shared"


def publish(cache: DiskCache | None, key: str, header: EntryHeader, payload: bytes,
            must_publish: bool = False) -> Entry:
    """Write a verified entry into the local cache. A cache that cannot be written costs
    the disk tier, not the kernel (unless `must_publish`); None: the disk tier is bypassed
    (EP_JIT_ALWAYS_COMPILE)."""
    path = None
    if cache is not None:
        try:
            path = cache.write(key, header, payload)
        except CacheWriteError as exc:
            if must_publish:
                raise
            if str(cache.root) not in _unwritable:
                _unwritable.add(str(cache.root))
                log.warning("the kernel cache %s cannot be written (%s); kernels are kept in memory only",
                            cache.root, exc)
    return Entry(key, header, payload, path)


def fetch_or_build(spec: KernelSpec, cache: DiskCache, *, require_warm: bool | None = None,
                   must_publish: bool = False) -> tuple[Entry, Tier]:
    """The spec's entry from the local disk, a shared tier, or NVRTC (then published);
    a failed compile gives an entry too. Touches neither memory tier nor failure memory."""
    source, inputs, key = keyed(spec)
    found = find(key, cache)
    if found is None:
        if config.require_warm() if require_warm is None else require_warm:
            raise not_warm([spec.describe()], cache)
        with cache.lock(key) as waited:
            _stats.lock_wait_seconds += waited
            # another process may have built it while we waited
            found = find(key, cache) or (_compile_and_publish(source, inputs, key, cache, must_publish), "compiled")
    return found


def not_warm(names: list[str], cache: DiskCache) -> NotWarmError:
    """The error for specs (their descriptions) that no tier holds under EP_JIT_REQUIRE_WARM=1."""
    return NotWarmError(f"EP_JIT_REQUIRE_WARM=1 and no cache tier (local {cache.root}, shared "
                        f"{':'.join(map(str, config.shared_cache_roots())) or 'none'}) holds {'; '.join(names)}; "
                        f"run ep-jit-warm first (nothing was compiled)")


def remembered_failure(spec: KernelSpec, entry: Entry) -> CompileError:
    return CompileError(f"NVRTC could not compile {spec.describe()}", spec=spec, key=entry.key,
                        log=entry.header.log, source=entry.header.source)


def _read(cache: DiskCache, key: str) -> Entry | None:
    start = time.perf_counter()
    entry = cache.read(key)
    _stats.load_seconds += time.perf_counter() - start
    return entry


def entry_header(source: Source, inputs: dict, key: str, **outcome: object) -> EntryHeader:
    """An entry's header: what the key says (inputs, spec, rendered source and headers) and
    `outcome`, what the compile made of it (OUTCOME_FIELDS). CorruptEntry if outcome is off."""
    spec = source.spec
    return EntryHeader.from_json({
        "key": key, "inputs": inputs, "source": source.text, "headers": source.headers,
        "spec": {"template": spec.template, **spec.params(), "member_hash": spec.member_hash, "arch": spec.arch},
        **outcome})


OUTCOME_FIELDS = ("status", "lowered_names", "log", "compile_seconds", "created_at", "ep_jit_version", "nvrtc_version")


def _compile_and_publish(source: Source, inputs: dict, key: str, cache: DiskCache | None,
                         must_publish: bool = False) -> Entry:
    """Compile and publish; a failure is published too (status "failed", the NVRTC log)."""
    spec = source.spec

    def header(status: str, log_text: str, lowered: dict, seconds: float) -> EntryHeader:
        return entry_header(source, inputs, key, status=status, lowered_names=lowered, log=log_text,
                            compile_seconds=seconds, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            ep_jit_version=__version__, nvrtc_version=nvrtc_version())

    log.info("compiling %s (key %s)", spec.describe(), key[:16])
    start = time.perf_counter()
    try:
        program = compile_source(source, key)
    except CompileError as exc:
        _stats.compile_failures += 1
        return publish(cache, key, header("failed", exc.log, {}, time.perf_counter() - start), b"", must_publish)
    _stats.compiles += 1
    _stats.compile_seconds += program.seconds
    return publish(cache, key, header("ok", program.log, program.lowered_names, program.seconds), program.cubin,
                   must_publish)
