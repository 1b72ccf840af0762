"""The on-disk kernel cache: keys, self-describing entry files, atomic publish,
per-key locks and quarantine.

An entry file is

    prefix   8s magic | u32 format | u32 reserved | u64 header length | u64 payload length
    header   JSON: key, every key input, status, lowered names, log, timings, source
    payload  the cubin (empty for a remembered compile failure)
    digest   sha256 of prefix + header + payload

and is verified on every read: anything else is a miss, and the file is moved to
quarantine/ so it can be rebuilt and looked at later.

Safety: entry files are opened in one place (_read_entry_file) without following
links and without blocking, must be regular files of bounded size, and nothing is
written, moved or deleted through a link or outside the cache root. An entry's last
use is its mtime, set when a process loads it, never by reading it to inspect it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import filelock

from . import config
from .version import __version__
from .errors import ConfigError, EPJitError

FORMAT_VERSION = 1
MAGIC = b"EPJITKC\0"
_PREFIX = struct.Struct("<8sIIQQ")
_DIGEST_SIZE = 32
ENTRY_SUFFIX = ".entry"
MAX_ENTRY_BYTES = 256 * 2**20  # far above any cubin and its header; a larger file is not an entry
STALE_SECONDS = 86400  # temp files and lock files untouched this long are left-overs

log = config.log


def make_key(compile_inputs: dict[str, object]) -> tuple[dict[str, object], str]:
    """The one place a key is made: everything the binary depends on (the compile's inputs,
    the cache format, the ep_jit version) and the sha256 over its canonical JSON."""
    inputs = {"format": FORMAT_VERSION, "ep_jit": __version__, **compile_inputs}
    return inputs, cache_key(inputs)


def cache_key(inputs: dict[str, object]) -> str:
    """sha256 over canonical JSON of a key's inputs (make_key's; an entry's recorded ones)."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class CorruptEntry(Exception):
    """An entry file that does not verify; the message says why."""


class CacheWriteError(EPJitError):
    """The cache could not be written, or would have been written through a link."""


@dataclass(frozen=True)
class EntryHeader:
    """What an entry says about its payload: every key input, and how it was made."""

    key: str
    inputs: dict             # every key input, as hashed into `key`
    spec: dict               # the spec's fields (template, its parameters, member_hash, arch)
    status: str              # "ok", or "failed" for a remembered compile failure (no payload)
    lowered_names: dict      # name expression -> mangled kernel name
    log: str                 # NVRTC's log
    compile_seconds: float
    created_at: str          # ISO 8601, UTC
    ep_jit_version: str
    nvrtc_version: str
    source: str              # the rendered source
    headers: dict            # every local header it includes, by name

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    @classmethod
    def from_json(cls, obj: object) -> "EntryHeader":
        """The header of a decoded entry; CorruptEntry unless every field is there with its type."""
        if not isinstance(obj, dict) or set(obj) != _HEADER_FIELDS.keys():
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise CorruptEntry(f"header fields {found}, expected {sorted(_HEADER_FIELDS)}")
        for name, kind in _HEADER_FIELDS.items():
            if not isinstance(obj[name], kind) or isinstance(obj[name], bool):
                raise CorruptEntry(f"header field {name} is a {type(obj[name]).__name__}")
        return cls(**obj)


_HEADER_FIELDS = {f.name: {"str": str, "dict": dict, "float": (int, float)}[f.type]
                  for f in dataclasses.fields(EntryHeader)}


@dataclass(frozen=True)
class Entry:
    key: str
    header: EntryHeader
    payload: bytes
    path: Path | None        # None for an entry that could not be written (kept in memory)

    @property
    def failed(self) -> bool:
        return self.header.failed


def encode_entry(header: EntryHeader, payload: bytes) -> bytes:
    head = json.dumps(dataclasses.asdict(header), sort_keys=True).encode()
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(head), len(payload)) + head + payload
    return body + hashlib.sha256(body).digest()


def decode_entry(data: bytes, key: str) -> tuple[EntryHeader, bytes]:
    if len(data) < _PREFIX.size + _DIGEST_SIZE:
        raise CorruptEntry(f"truncated: {len(data)} bytes")
    magic, version, _, head_len, payload_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CorruptEntry("bad magic")
    if version != FORMAT_VERSION:
        raise CorruptEntry(f"format {version}, expected {FORMAT_VERSION}")
    expected = _PREFIX.size + head_len + payload_len + _DIGEST_SIZE
    if len(data) != expected:
        raise CorruptEntry(f"size {len(data)}, its prefix states {expected}")
    body = data[:-_DIGEST_SIZE]
    if hashlib.sha256(body).digest() != data[-_DIGEST_SIZE:]:
        raise CorruptEntry("checksum mismatch")
    try:
        header = json.loads(body[_PREFIX.size:_PREFIX.size + head_len])
    except ValueError as exc:
        raise CorruptEntry(f"header is not JSON: {exc}") from None
    header = EntryHeader.from_json(header)
    if header.key != key:
        raise CorruptEntry(f"header names key {header.key!r}")
    if cache_key(header.inputs) != key:
        raise CorruptEntry("its key inputs do not hash to its key")
    return header, body[_PREFIX.size + head_len:]


def _read_entry_file(path: Path, touch: bool) -> bytes:
    """The bytes of an entry file: never through a final link, never blocking on a FIFO
    or a device, never more than MAX_ENTRY_BYTES. `touch` records a use (the mtime)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CorruptEntry("a symbolic link, not an entry file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptEntry(f"not a regular file (mode {stat.filemode(st.st_mode)})")
        if st.st_size > MAX_ENTRY_BYTES:
            raise CorruptEntry(f"{st.st_size} bytes, more than the {MAX_ENTRY_BYTES} an entry may have")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_ENTRY_BYTES + 1)
        if len(data) > MAX_ENTRY_BYTES:
            raise CorruptEntry(f"more than the {MAX_ENTRY_BYTES} bytes an entry may have")
        if touch:
            with contextlib.suppress(OSError):  # a read-only cache still serves its entries
                os.utime(fd)
        return data
    finally:
        os.close(fd)


_HOST = socket.gethostname().replace(".", "_")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale_temp(path: Path, now: float) -> bool:
    """A temp file (.<key>.<host>.<pid>.<random>.tmp) of a writer on this host that died,
    or of any writer long ago."""
    parts = path.name.split(".")
    if len(parts) == 6 and parts[2] == _HOST and parts[3].isdigit() and not _pid_alive(int(parts[3])):
        return True
    with contextlib.suppress(FileNotFoundError):
        return now - os.lstat(path).st_mtime > STALE_SECONDS
    return False


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


def _remove(path: Path) -> None:
    """Delete a file, a link (not what it points to) or a folder tree (links in it are not followed)."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


class DiskCache:
    """One cache root. Nothing is created on disk until something is written."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else config.cache_root()
        self.entries_dir = self.root / f"v{FORMAT_VERSION}"
        self.quarantine_dir = self.root / "quarantine"
        self._checked = False
        self._left_corrupt: set[str] = set()  # keys whose corrupt entry could not be moved (warned once)

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

    def not_a_folder(self, folder: Path) -> Path | None:
        """The first path from below the root down to `folder` that exists but is a link or
        not a folder: nothing is ever written, moved or deleted through it."""
        current = self.root
        for name in folder.relative_to(self.root).parts:
            current = current / name
            try:
                mode = os.lstat(current).st_mode
            except FileNotFoundError:
                return None
            if not stat.S_ISDIR(mode):
                return current
        return None

    def _refuse_links(self, folder: Path) -> None:
        bad = self.not_a_folder(folder)
        if bad is not None:
            raise CacheWriteError(f"{bad} is a symbolic link or not a folder; the cache never writes through it")

    def private_folder(self, folder: Path) -> None:
        """Create `folder` (0700) below the root, refusing links before and after."""
        self._refuse_links(folder)
        _make_private_dir(folder)
        self._refuse_links(folder)

    # ---- paths ------------------------------------------------------------

    def entry_path(self, key: str) -> Path:
        return self.entries_dir / key[:2] / f"{key}{ENTRY_SUFFIX}"

    def _shards(self) -> tuple[list[Path], list[Path]]:
        """The shard folders under v<format>/, and what stands there that is not a folder."""
        folders, foreign = [], []
        if self.not_a_folder(self.entries_dir) is not None:
            return folders, [self.entries_dir]
        with contextlib.suppress(FileNotFoundError), os.scandir(self.entries_dir) as it:
            for e in it:
                (folders if e.is_dir(follow_symlinks=False) else foreign).append(Path(e.path))
        return sorted(folders), sorted(foreign)

    def _files(self, match) -> Iterator[Path]:
        for shard in self._shards()[0]:
            with contextlib.suppress(FileNotFoundError), os.scandir(shard) as it:
                yield from sorted(Path(e.path) for e in it if match(e.name))

    def entry_paths(self) -> Iterator[Path]:
        """Everything named like an entry in a real shard folder (files, links or not)."""
        return self._files(lambda n: n.endswith(ENTRY_SUFFIX) and not n.startswith("."))

    def temp_paths(self) -> Iterator[Path]:
        return self._files(lambda n: n.startswith(".") and n.endswith(".tmp"))

    def foreign_paths(self) -> list[Path]:
        """Links or files where shard folders belong; the cache never looks through them."""
        return self._shards()[1]

    def stale_temp_paths(self) -> list[Path]:
        now = time.time()
        return [p for p in self.temp_paths() if _is_stale_temp(p, now)]

    def quarantined_paths(self) -> list[Path]:
        if self.not_a_folder(self.quarantine_dir) is not None or not self.quarantine_dir.exists():
            return []
        return sorted(self.quarantine_dir.iterdir())

    # ---- read -------------------------------------------------------------

    def load(self, path: Path, touch: bool = False) -> Entry:
        """Read and verify one entry file; raises CorruptEntry or OSError."""
        key = path.name[: -len(ENTRY_SUFFIX)]
        header, payload = decode_entry(_read_entry_file(path, touch), key)
        return Entry(key, header, payload, path)

    def read(self, key: str) -> Entry | None:
        """The verified entry for `key`, or None. A bad entry is quarantined. A hit
        records the entry's last use."""
        self.check_root()
        path = self.entry_path(key)
        if self.not_a_folder(path.parent) is not None:
            return None  # never read through a link; publishing says so
        try:
            return self.load(path, touch=True)
        except FileNotFoundError:
            return None
        except CorruptEntry as exc:
            try:
                self.quarantine(path)
            except CacheWriteError as why:
                if key not in self._left_corrupt:
                    self._left_corrupt.add(key)
                    log.warning("cache entry %s is corrupt (%s) and could not be quarantined (%s); it will be "
                                "rebuilt", path.name, exc, why)
            else:
                log.warning("cache entry %s is corrupt (%s); quarantined, it will be rebuilt", path.name, exc)
            return None

    # ---- change -----------------------------------------------------------

    def quarantine(self, path: Path) -> Path | None:
        """Move a bad entry (or whatever stands in its place) aside. Returns where it went,
        or None if it was already gone."""
        self._refuse_links(path.parent)
        self.private_folder(self.quarantine_dir)
        target = self.quarantine_dir / f"{path.name}.{time.time_ns()}.{os.getpid()}"
        try:
            os.replace(path, target)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CacheWriteError(f"could not move {path} to {self.quarantine_dir}: {exc.strerror}") from None
        return target

    def remove(self, path: Path) -> bool:
        """Delete an entry, temp file or quarantined file below the root; False if it was gone."""
        self._refuse_links(path.parent)
        try:
            _remove(path)
        except FileNotFoundError:
            return False
        return True

    def write(self, key: str, header: EntryHeader, payload: bytes) -> Path:
        """Publish atomically: temp file in the target folder, fsync, rename, fsync folder.
        Raises CacheWriteError when the cache cannot be written."""
        final = self.entry_path(key)
        try:
            self.ensure_root()
            self.private_folder(final.parent)
            self._remove_dead_writers_temps(key)
            fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{key}.{_HOST}.{os.getpid()}.", suffix=".tmp")
        except OSError as exc:
            raise CacheWriteError(f"could not write {final}: {exc.strerror or exc}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(encode_entry(header, payload))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except BaseException as exc:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise CacheWriteError(f"could not write {final}: {exc.strerror or exc}") from None
            raise
        return final

    def _remove_dead_writers_temps(self, key: str) -> None:
        now = time.time()
        for tmp in self.entry_path(key).parent.glob(f".{key}.*.tmp"):
            if _is_stale_temp(tmp, now):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    # ---- per-key lock -----------------------------------------------------

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[float]:
        """Node-local flock for one key; yields the seconds spent waiting.

        A holder that dies releases it with its file descriptor. On timeout the caller
        goes on without it: the lock only saves work, correctness never needs it.
        """
        path = private_lock_folder() / f"{key}.lock"
        if path.is_symlink() or (path.exists() and not path.is_file()):
            raise ConfigError(f"EP_JIT_LOCK_DIR: expected lock files in {path.parent}, got a symbolic link or "
                              f"a non-file at {path}; remove it")
        lock = filelock.FileLock(str(path), timeout=config.lock_timeout())
        start = time.perf_counter()
        try:
            lock.acquire()
            acquired = True
        except filelock.Timeout:
            acquired = False
            log.warning("lock for %s not acquired in %.0f s; compiling without it", key[:16], lock.timeout)
        except OSError as exc:
            raise ConfigError(f"EP_JIT_LOCK_DIR: cannot lock {path}: {exc.strerror or exc}") from None
        try:
            if acquired:
                with contextlib.suppress(OSError):
                    os.utime(path)  # its last use, so prune can tell old lock files
            yield time.perf_counter() - start
        finally:
            if acquired:
                lock.release()


def private_lock_folder() -> Path:
    """The lock folder, created 0700; refused unless it is a real folder of this user's
    that nobody else can write (the default one's parent in $TMPDIR too)."""
    root = config.lock_root()
    try:
        _make_private_dir(root)
    except OSError as exc:
        raise ConfigError(f"EP_JIT_LOCK_DIR: cannot create {root}: {exc.strerror or exc}") from None
    for folder in (root,) if config.raw("EP_JIT_LOCK_DIR") else (root.parent, root):
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise ConfigError(
                f"EP_JIT_LOCK_DIR: expected a folder of uid {os.getuid()} that only it can write, got {folder} "
                f"({stat.filemode(st.st_mode)}, uid {st.st_uid})")
    return root


def stale_lock_paths() -> list[Path]:
    """Lock files nobody has taken for a day."""
    root = config.lock_root()
    if not root.is_dir() or root.is_symlink():
        return []
    now = time.time()
    return sorted(p for p in root.glob("*.lock")
                  if not p.is_symlink() and p.is_file() and now - p.lstat().st_mtime > STALE_SECONDS)
