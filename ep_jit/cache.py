"""The on-disk kernel cache: keys, self-describing entry files, atomic publish,
per-key locks and quarantine.

An entry file is

    prefix   8s magic | u32 format | u32 reserved | u64 header length | u64 payload length
    header   JSON: key, every key input, status, lowered names, log, timings, source
    payload  the cubin (empty for a remembered compile failure)
    digest   sha256 of prefix + header + payload

and is verified on every read: anything else is a miss, and the file is moved to
quarantine/ so it can be rebuilt and looked at later.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import stat
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import filelock

from . import __version__, config
from .errors import ConfigError

FORMAT_VERSION = 1
MAGIC = b"EPJITKC\0"
_PREFIX = struct.Struct("<8sIIQQ")
_DIGEST_SIZE = 32
ENTRY_SUFFIX = ".entry"

log = config.log


def key_inputs(compile_inputs: dict[str, object]) -> dict[str, object]:
    """Everything the binary depends on: the compile's inputs plus the cache format."""
    return {"format": FORMAT_VERSION, "ep_jit": __version__, **compile_inputs}


def cache_key(inputs: dict[str, object]) -> str:
    """sha256 over canonical JSON of key_inputs()."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class CorruptEntry(Exception):
    """An entry file that does not verify; the message says why."""


@dataclass(frozen=True)
class Entry:
    key: str
    header: dict
    payload: bytes
    path: Path

    @property
    def failed(self) -> bool:
        return self.header.get("status") == "failed"


def encode_entry(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(head), len(payload)) + head + payload
    return body + hashlib.sha256(body).digest()


def decode_entry(data: bytes, key: str) -> tuple[dict, bytes]:
    if len(data) < _PREFIX.size + _DIGEST_SIZE:
        raise CorruptEntry(f"truncated: {len(data)} bytes")
    magic, version, _, head_len, payload_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CorruptEntry("bad magic")
    if version != FORMAT_VERSION:
        raise CorruptEntry(f"format {version}, expected {FORMAT_VERSION}")
    expected = _PREFIX.size + head_len + payload_len + _DIGEST_SIZE
    if len(data) != expected:
        raise CorruptEntry(f"size {len(data)}, expected {expected}")
    body = data[:-_DIGEST_SIZE]
    if hashlib.sha256(body).digest() != data[-_DIGEST_SIZE:]:
        raise CorruptEntry("checksum mismatch")
    try:
        header = json.loads(body[_PREFIX.size:_PREFIX.size + head_len])
    except ValueError as exc:
        raise CorruptEntry(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict) or header.get("key") != key:
        raise CorruptEntry(f"header names key {header.get('key') if isinstance(header, dict) else None!r}")
    return header, body[_PREFIX.size + head_len:]


def decode_verified(data: bytes, key: str) -> tuple[dict, bytes]:
    """decode_entry, and the header's key inputs must hash to `key`: for bytes that come
    from elsewhere (a peer, a bundle), so an entry cannot claim a key it was not made for."""
    header, payload = decode_entry(data, key)
    if cache_key(header.get("inputs", {})) != key:
        raise CorruptEntry("its key inputs do not hash to its key")
    return header, payload


_HOST = socket.gethostname().replace(".", "_")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_private_dir(path: Path) -> None:
    """mkdir -p where every folder created is 0700 (mkdir's parents= ignores mode)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)


class DiskCache:
    """One cache root. Nothing is created on disk until something is written."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else config.cache_root()
        self.entries_dir = self.root / f"v{FORMAT_VERSION}"
        self.quarantine_dir = self.root / "quarantine"
        self._checked = False

    # ---- safety -----------------------------------------------------------

    def check_root(self) -> None:
        """Refuse a root that others can write to: a cubin is code that will run."""
        if self._checked or not self.root.exists():
            return
        st = self.root.stat()
        shared = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        foreign = st.st_uid != os.getuid()
        if (shared or foreign) and not config.allow_shared_cache():
            who = "writable by group/others" if shared else f"owned by uid {st.st_uid}"
            raise ConfigError(
                f"EP_JIT_CACHE_DIR: expected a cache root only this user can write, got {self.root} "
                f"(mode {stat.S_IMODE(st.st_mode):o}, {who}); set EP_JIT_ALLOW_SHARED_CACHE=1 to accept it")
        self._checked = True

    def ensure_root(self) -> None:
        _make_private_dir(self.root)
        self.check_root()

    # ---- paths ------------------------------------------------------------

    def entry_path(self, key: str) -> Path:
        return self.entries_dir / key[:2] / f"{key}{ENTRY_SUFFIX}"

    def entry_paths(self) -> Iterator[Path]:
        if self.entries_dir.is_dir():
            yield from sorted(self.entries_dir.glob(f"*/*{ENTRY_SUFFIX}"))

    def temp_paths(self) -> Iterator[Path]:
        if self.entries_dir.is_dir():
            yield from sorted(self.entries_dir.glob("*/.*.tmp"))

    # ---- read -------------------------------------------------------------

    def load(self, path: Path) -> Entry:
        """Read and verify one entry file; raises CorruptEntry or OSError."""
        key = path.name[: -len(ENTRY_SUFFIX)]
        header, payload = decode_entry(path.read_bytes(), key)
        return Entry(key, header, payload, path)

    def read(self, key: str) -> Entry | None:
        """The verified entry for `key`, or None. A bad entry is quarantined."""
        self.check_root()
        path = self.entry_path(key)
        try:
            entry = self.load(path)
        except FileNotFoundError:
            return None
        except CorruptEntry as exc:
            self.quarantine(path, str(exc))
            return None
        with contextlib.suppress(OSError):  # last use = atime, set explicitly (noatime mounts)
            os.utime(path, (time.time(), path.stat().st_mtime))
        return entry

    def quarantine(self, path: Path, reason: str) -> Path | None:
        """Move a bad entry aside. Returns where it went, or None if it was already gone."""
        log.warning("cache entry %s is corrupt (%s); quarantined, it will be rebuilt", path.name, reason)
        _make_private_dir(self.quarantine_dir)
        target = self.quarantine_dir / f"{path.name}.{time.time_ns()}.{os.getpid()}"
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return None
        return target

    # ---- write ------------------------------------------------------------

    def write(self, key: str, header: dict, payload: bytes) -> Path:
        """Publish atomically: temp file in the target folder, fsync, rename, fsync folder."""
        self.ensure_root()
        final = self.entry_path(key)
        _make_private_dir(final.parent)
        self._remove_dead_writers_temps(key)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{key}.{_HOST}.{os.getpid()}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(encode_entry(header, payload))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(final.parent)
        return final

    def _remove_dead_writers_temps(self, key: str) -> None:
        """Temp files of this key left by writers on this host that died mid-write."""
        for tmp in self.entry_path(key).parent.glob(f".{key}.{_HOST}.*.tmp"):
            pid = tmp.name.split(".")[3]
            if pid.isdigit() and not _pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    # ---- per-key lock -----------------------------------------------------

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[float]:
        """Node-local flock for one key; yields the seconds spent waiting.

        A holder that dies releases it with its file descriptor. On timeout the caller
        goes on without it: the lock only saves work, correctness never needs it.
        """
        root = config.lock_root()
        _make_private_dir(root)
        lock = filelock.FileLock(str(root / f"{key}.lock"), timeout=config.lock_timeout())
        start = time.perf_counter()
        try:
            lock.acquire()
            acquired = True
        except filelock.Timeout:
            acquired = False
            log.warning("lock for %s not acquired in %.0f s; compiling without it", key[:16], lock.timeout)
        try:
            yield time.perf_counter() - start
        finally:
            if acquired:
                lock.release()
