"""A hostile or broken filesystem: what stands in place of an entry, links that lead out
of the cache root, a cache that cannot be written, the lock folder, last use."""

import dataclasses
import errno
import logging
import os
import signal
import stat
import time
import tracemalloc

import pytest

from helpers import run_cli
from ep_jit import ConfigError, get_kernel
from ep_jit.cache import DiskCache, encode_entry
from ep_jit.jit import clear_memory_cache, resolve, spec_key
from helpers import layout_spec


@pytest.fixture
def no_hang():
    """Fail, rather than hang, when something blocks for 30 s."""
    def expire(*_):
        raise TimeoutError("blocked for 30 s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def outside(tmp_path):
    """A folder outside the cache root, holding files that must survive."""
    folder = tmp_path / "outside"
    folder.mkdir()
    for name in ("precious.entry", "notes.txt"):
        (folder / name).write_text(name)
    return folder


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _quarantined(cache_env):
    return list((cache_env / "quarantine").iterdir())


def _plant(path, kind, good: bytes, outside):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
        (path / "inside").write_text("x")
    elif kind == "device":
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: endless bytes
        except PermissionError:
            pytest.skip("creating a device node needs CAP_MKNOD")
    elif kind == "symlink":  # to a valid copy of the entry: following it would "work"
        (outside / path.name).write_bytes(good)
        path.symlink_to(outside / path.name)
    elif kind == "sparse_4g":
        with open(path, "wb") as f:
            f.truncate(4 * 2**30)


@pytest.mark.parametrize("kind", ["fifo", "folder", "device", "symlink", "sparse_4g"])
def test_what_stands_in_place_of_an_entry_is_corrupt(cache_env, outside, no_hang, kind):
    spec = layout_spec()
    good, _ = resolve(spec)
    path = DiskCache().entry_path(good.key)
    _plant(path, kind, path.read_bytes(), outside)
    before = _snapshot(outside)
    clear_memory_cache()
    tracemalloc.start()
    rebuilt, tier = resolve(spec)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert tier == "compiled" and rebuilt.cubin == good.cubin
    assert peak < 64 * 2**20  # the 4 GB file was never read
    assert len(_quarantined(cache_env)) == 1 and _snapshot(outside) == before
    assert DiskCache().read(good.key).payload == good.cubin


def test_entry_whose_key_inputs_hash_elsewhere_is_corrupt(cache_env):
    good, _ = resolve(layout_spec())
    cache = DiskCache()
    entry = cache.read(good.key)
    forged = dataclasses.replace(entry.header, inputs={**entry.header.inputs, "arch": "sm_100a"})  # key, digest valid
    entry.path.write_bytes(encode_entry(forged, entry.payload))
    assert cache.read(good.key) is None and len(_quarantined(cache_env)) == 1


def test_entry_stating_a_huge_length_is_corrupt_without_reading(cache_env):
    good, _ = resolve(layout_spec())
    path = DiskCache().entry_path(good.key)
    data = bytearray(path.read_bytes())
    data[16:24] = (2**62).to_bytes(8, "little")  # header length
    path.write_bytes(bytes(data))
    assert DiskCache().read(good.key) is None and len(_quarantined(cache_env)) == 1


# ---- nothing outside the root -------------------------------------------------

def test_publishing_refuses_a_linked_shard_folder(cache_env, outside, caplog):
    spec = layout_spec()
    key = spec_key(spec)
    (cache_env / "v1").mkdir(parents=True)
    (cache_env / "v1" / key[:2]).symlink_to(outside)
    before = _snapshot(outside)
    with caplog.at_level(logging.WARNING, logger="ep_jit"):
        binary, tier = resolve(spec)
    assert tier == "compiled" and binary.cubin[:4] == b"\x7fELF"
    assert _snapshot(outside) == before
    assert [r for r in caplog.records if "cannot be written" in r.getMessage()]


def test_reading_a_corrupt_entry_never_moves_it_into_a_linked_quarantine(cache_env, outside):
    good, _ = resolve(layout_spec())
    path = DiskCache().entry_path(good.key)
    path.write_bytes(b"garbage")
    (cache_env / "quarantine").symlink_to(outside)
    before = _snapshot(outside)
    clear_memory_cache()
    assert resolve(layout_spec())[1] == "compiled"
    assert _snapshot(outside) == before
    assert DiskCache().read(good.key).payload == good.cubin  # rebuilt in place


# ---- an unwritable cache is not fatal -------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_unwritable_cache_still_returns_the_kernel_with_one_warning(cache_env, monkeypatch, caplog, code):
    import ep_jit.cache as cache_module

    def fail(*_, **__):
        raise OSError(code, os.strerror(code))
    monkeypatch.setattr(cache_module.tempfile, "mkstemp", fail)
    with caplog.at_level(logging.WARNING, logger="ep_jit"):
        a = get_kernel(layout_spec())
        b = get_kernel(layout_spec(topk=2))
    assert a.cubin[:4] == b"\x7fELF" and b.cubin[:4] == b"\x7fELF"
    assert get_kernel(layout_spec()) is a  # kept in memory
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and os.strerror(code) in warnings[0] and str(cache_env) in warnings[0]


def test_broken_quarantine_still_returns_the_kernel_with_one_warning(cache_env, caplog):
    good, _ = resolve(layout_spec())
    DiskCache().entry_path(good.key).write_bytes(b"garbage")
    (cache_env / "quarantine").write_text("a file, not a folder")
    clear_memory_cache()
    with caplog.at_level(logging.WARNING, logger="ep_jit"):
        assert get_kernel(layout_spec()).cubin == good.cubin
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not be quarantined" in warnings[0]


# ---- the lock folder ----------------------------------------------------------

def test_lock_folder_is_created_private(cache_env, tmp_path, monkeypatch):
    monkeypatch.setenv("EP_JIT_LOCK_DIR", str(tmp_path / "new" / "locks"))
    resolve(layout_spec())
    for folder in (tmp_path / "new", tmp_path / "new" / "locks"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


@pytest.mark.parametrize("kind", ["foreign_owner", "world_writable", "symlink"])
def test_lock_folder_that_is_not_this_users_is_refused(cache_env, tmp_path, monkeypatch, kind):
    locks = tmp_path / "locks"
    if kind == "symlink":
        (tmp_path / "elsewhere").mkdir()
        locks.symlink_to(tmp_path / "elsewhere")
    else:
        locks.mkdir(mode=0o700)
        if kind == "world_writable":
            os.chmod(locks, 0o777)
        else:
            try:
                os.chown(locks, os.getuid() + 4242, -1)
            except PermissionError:
                pytest.skip("giving a folder away needs root")
    with pytest.raises(ConfigError, match="EP_JIT_LOCK_DIR: expected a folder of uid"):
        resolve(layout_spec())
    out = run_cli("ep_jit.cli.warm", "--preset", "tiny")
    assert out.returncode == 2 and "EP_JIT_LOCK_DIR: expected a folder of uid" in out.stderr
    assert not cache_env.exists()


def test_planted_lock_symlink_is_a_clear_error(cache_env, tmp_path, outside):
    spec = layout_spec()
    (tmp_path / "locks").mkdir(mode=0o700)
    (tmp_path / "locks" / f"{spec_key(spec)}.lock").symlink_to(outside / "notes.txt")
    with pytest.raises(ConfigError, match="EP_JIT_LOCK_DIR: expected lock files .* a symbolic link"):
        resolve(spec)
    assert (outside / "notes.txt").read_text() == "notes.txt"


# ---- last use -----------------------------------------------------------------

def test_a_disk_hit_records_its_last_use(cache_env):
    good, _ = resolve(layout_spec())
    path = DiskCache().entry_path(good.key)
    os.utime(path, (time.time(), 1e9))
    clear_memory_cache()
    assert resolve(layout_spec())[1] == "disk"
    assert time.time() - path.stat().st_mtime < 60
