"""get_kernel(spec): the three tiers, memory -> disk -> NVRTC.

The memory tier is a dict keyed by the frozen spec, so a hit costs one hash and no
file or key work. A miss renders the source, computes the key, reads the verified
disk entry, and otherwise compiles under the key's lock and publishes the entry.
Compile failures are remembered in memory and on disk, so later calls and other
ranks fail fast with the same NVRTC log.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Literal

from . import __version__, config
from .cache import CacheWriteError, DiskCache, Entry, cache_key, key_inputs
from .compiler import Source, compile_source, nvrtc_version, render
from .config import log
from .errors import CompileError
from .spec import KernelSpec

Tier = Literal["memory", "disk", "compiled"]


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
    compiles: int = 0
    compile_failures: int = 0
    compile_seconds: float = 0.0
    load_seconds: float = 0.0
    lock_wait_seconds: float = 0.0


_stats = Stats()
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
            must_publish: bool = False) -> tuple[KernelBinary, Tier]:
    """get_kernel's slow path, also saying which tier answered (ep-jit-warm reports it).

    A kernel that compiled but could not be written to the cache is still returned, with
    one warning per cache root, unless `must_publish` (then CacheWriteError is raised).
    """
    with _mutex:
        if spec in _memory:
            _stats.memory_hits += 1
            return _memory[spec], "memory"
        if spec in _failures:
            raise _failures[spec]
        config.check_environment()
        cache = cache or DiskCache()
        try:
            if config.always_compile():
                binary, tier = _compile_and_publish(*_keyed(spec), None, must_publish), "compiled"
            else:
                binary, tier = _from_disk_or_compile(spec, cache, must_publish)
        except CompileError as exc:
            _failures[spec] = exc
            raise
        _memory[spec] = binary
        return binary, tier


def _keyed(spec: KernelSpec) -> tuple[Source, dict, str]:
    source = render(spec)
    inputs = key_inputs(source.key_inputs())
    return source, inputs, cache_key(inputs)


def spec_key(spec: KernelSpec) -> str:
    """The cache key of `spec`: renders and hashes, reads and writes nothing."""
    return _keyed(spec)[2]


def lookup(spec: KernelSpec, cache: DiskCache) -> tuple[str, Entry | None]:
    """The spec's key and its verified disk entry, if any. Compiles nothing."""
    key = spec_key(spec)
    return key, _read(cache, key)


def _from_disk_or_compile(spec: KernelSpec, cache: DiskCache, must_publish: bool) -> tuple[KernelBinary, Tier]:
    source, inputs, key = _keyed(spec)
    entry = _read(cache, key)
    if entry is None:
        with cache.lock(key) as waited:
            _stats.lock_wait_seconds += waited
            entry = _read(cache, key)  # another process may have built it while we waited
            if entry is None:
                return _compile_and_publish(source, inputs, key, cache, must_publish), "compiled"
    if entry.failed:
        raise remembered_failure(spec, entry)
    _stats.disk_hits += 1
    return KernelBinary(spec, key, entry.payload, entry.header["lowered_names"]), "disk"


def remembered_failure(spec: KernelSpec, entry: Entry) -> CompileError:
    return CompileError("NVRTC could not compile this spec (remembered failure)", spec=spec, key=entry.key,
                        log=entry.header.get("log", ""), source=entry.header.get("source", ""))


def _read(cache: DiskCache, key: str) -> Entry | None:
    start = time.perf_counter()
    entry = cache.read(key)
    _stats.load_seconds += time.perf_counter() - start
    return entry


def _publish(cache: DiskCache | None, key: str, header: dict, payload: bytes, must_publish: bool) -> None:
    """Write the entry; a cache that cannot be written costs the disk tier, not the kernel."""
    if cache is None:  # EP_JIT_ALWAYS_COMPILE: the disk tier is bypassed
        return
    try:
        cache.write(key, header, payload)
    except CacheWriteError as exc:
        if must_publish:
            raise
        if str(cache.root) not in _unwritable:
            _unwritable.add(str(cache.root))
            log.warning("the kernel cache %s cannot be written (%s); kernels are kept in memory only",
                        cache.root, exc)


def _compile_and_publish(source: Source, inputs: dict, key: str, cache: DiskCache | None,
                         must_publish: bool) -> KernelBinary:
    spec = source.spec
    header = {
        "key": key,
        "inputs": inputs,
        "spec": {"template": spec.template, **spec.params(), "member_hash": spec.member_hash, "arch": spec.arch},
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ep_jit_version": __version__,
        "nvrtc_version": nvrtc_version(),
        "source": source.text,
        "headers": source.headers,
    }
    log.info("compiling %s (key %s)", spec.describe(), key[:16])
    start = time.perf_counter()
    try:
        program = compile_source(source, key)
    except CompileError as exc:
        _stats.compile_failures += 1
        _publish(cache, key, {**header, "status": "failed", "log": exc.log, "lowered_names": {},
                              "compile_seconds": time.perf_counter() - start}, b"", must_publish)
        raise
    _stats.compiles += 1
    _stats.compile_seconds += program.seconds
    _publish(cache, key, {**header, "status": "ok", "log": program.log, "lowered_names": program.lowered_names,
                          "compile_seconds": program.seconds}, program.cubin, must_publish)
    return KernelBinary(spec, key, program.cubin, program.lowered_names)
