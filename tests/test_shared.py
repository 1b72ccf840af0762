"""Shared read-only tiers (EP_JIT_SHARED_CACHE_DIR) and EP_JIT_REQUIRE_WARM."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

import ep_jit
from helpers import REPO, run_cli
from ep_jit.cache import DiskCache
from ep_jit.jit import clear_memory_cache, resolve
from ep_jit.plan import preset_job
from helpers import layout_spec

TINY = list(preset_job("tiny", "sm_90a").specs())


def _snapshot(root) -> dict:
    """Every path under root with its type, size, mtime and content hash."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.fixture
def shared(cache_env, tmp_path):
    """A cache filled by ep-jit-warm --preset tiny, as a cluster filesystem would hold it."""
    root = tmp_path / "shared"
    out = run_cli("ep_jit.cli.warm", "--preset", "tiny", "--cache-dir", str(root), "--json",
                  env={"EP_JIT_LOCK_DIR": str(tmp_path / "warm-locks")})
    assert out.returncode == 0 and json.loads(out.stdout)["compiled"] == len(TINY), out.stderr
    return root


def _delta(before: dict) -> dict:
    after = ep_jit.stats()
    return {k: after[k] - before[k] for k in ("compiles", "disk_hits", "shared_hits")}


def test_shared_hit_is_copied_locally_and_the_tier_is_untouched(shared, cache_env, tmp_path, monkeypatch):
    before = _snapshot(shared)
    monkeypatch.setenv("EP_JIT_SHARED_CACHE_DIR", f"{tmp_path / 'absent'}:{shared}")  # searched in order
    s0 = ep_jit.stats()
    assert {resolve(s)[1] for s in TINY} == {"shared"}
    assert _delta(s0) == {"compiles": 0, "disk_hits": 0, "shared_hits": len(TINY)}
    local = DiskCache(cache_env)
    assert len([local.load(p) for p in local.entry_paths()]) == len(TINY)  # copied, and they verify
    clear_memory_cache()
    assert {resolve(s)[1] for s in TINY} == {"disk"}  # next time from the local copy
    assert _snapshot(shared) == before                # not written, touched, locked or moved
    assert not (tmp_path / "absent").exists()


def test_shared_miss_compiles_locally_and_writes_nothing_there(cache_env, tmp_path, monkeypatch):
    empty = tmp_path / "empty-shared"
    empty.mkdir()
    monkeypatch.setenv("EP_JIT_SHARED_CACHE_DIR", str(empty))
    assert resolve(layout_spec())[1] == "compiled"
    assert list(empty.iterdir()) == [] and len(list(DiskCache(cache_env).entry_paths())) == 1


def test_corrupt_shared_entry_is_ignored_not_moved_and_rebuilt_locally(shared, cache_env, monkeypatch):
    victim = next(DiskCache(shared).entry_paths())
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x01
    victim.write_bytes(bytes(data))
    before = _snapshot(shared)
    monkeypatch.setenv("EP_JIT_SHARED_CACHE_DIR", str(shared))
    tiers = {binary.key: tier for binary, tier in map(resolve, TINY)}
    key = victim.name.split(".")[0]
    assert tiers.pop(key) == "compiled" and set(tiers.values()) == {"shared"}
    assert _snapshot(shared) == before and not (shared / "quarantine").exists()
    assert DiskCache(cache_env).read(key) is not None  # a good local entry now


def test_world_writable_shared_tier_is_refused(shared, cache_env, monkeypatch):
    os.chmod(shared, 0o777)
    monkeypatch.setenv("EP_JIT_SHARED_CACHE_DIR", str(shared))
    with pytest.raises(ep_jit.ConfigError, match="EP_JIT_SHARED_CACHE_DIR: expected folders that others cannot"):
        resolve(TINY[0])
    monkeypatch.setenv("EP_JIT_ALLOW_SHARED_CACHE", "1")
    assert resolve(TINY[0])[1] == "shared"


READ_ONLY = textwrap.dedent("""
    import json, os, sys
    root = os.path.realpath(sys.argv[1])
    WRITES = {"os.rename", "os.replace", "os.remove", "os.rmdir", "os.mkdir", "os.utime", "os.chmod", "os.chown",
              "os.link", "os.symlink", "os.truncate"}
    FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def hook(event, args):
        # a read-only mount, even for root: anything that would change the tier fails
        if event == "open":
            mode, flags = args[1], args[2]
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & FLAGS)
            paths = args[:1] if writing else ()
        else:
            paths = args if event in WRITES else ()
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(p)).startswith(root):
                raise PermissionError(f"read-only file system: {event} {p}")

    sys.addaudithook(hook)
    try:
        open(os.path.join(root, "probe"), "w")
    except PermissionError:
        pass
    else:
        raise SystemExit("the read-only hook does not work")
    from ep_jit.jit import resolve
    from ep_jit.plan import preset_job
    print(json.dumps([resolve(s)[1] for s in preset_job("tiny", "sm_90a").specs()]))
""")


def test_read_only_shared_folder(shared, cache_env, tmp_path):
    before = _snapshot(shared)
    for path in [shared, *shared.rglob("*")]:
        os.chmod(path, 0o555 if path.is_dir() else 0o444)
    try:
        out = subprocess.run([sys.executable, "-c", READ_ONLY, str(shared)], cwd=REPO, capture_output=True,
                             text=True, env={**os.environ, "PYTHONPATH": str(REPO),
                                             "EP_JIT_SHARED_CACHE_DIR": str(shared)})
    finally:
        for path in [shared, *shared.rglob("*")]:
            os.chmod(path, 0o700 if path.is_dir() else 0o600)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["shared"] * len(TINY)
    after = _snapshot(shared)
    assert {k: v[1:] for k, v in after.items()} == {k: v[1:] for k, v in before.items()}


# ---- EP_JIT_REQUIRE_WARM ----------------------------------------------------------

def test_require_warm_raises_naming_the_spec_and_compiles_nothing(cache_env, monkeypatch):
    monkeypatch.setenv("EP_JIT_REQUIRE_WARM", "1")
    s0 = ep_jit.stats()
    with pytest.raises(ep_jit.NotWarmError, match=r"holds layout\(hidden=2048, experts=64, ep_size=4, topk=4"):
        ep_jit.get_kernel(layout_spec())
    assert _delta(s0)["compiles"] == 0 and not cache_env.exists()
    monkeypatch.setenv("EP_JIT_REQUIRE_WARM", "0")
    assert resolve(layout_spec())[1] == "compiled"
    clear_memory_cache()
    monkeypatch.setenv("EP_JIT_REQUIRE_WARM", "1")
    assert resolve(layout_spec())[1] == "disk"


def test_require_warm_accepts_a_shared_hit(shared, cache_env, monkeypatch):
    monkeypatch.setenv("EP_JIT_REQUIRE_WARM", "1")
    monkeypatch.setenv("EP_JIT_SHARED_CACHE_DIR", str(shared))
    assert {resolve(s)[1] for s in TINY} == {"shared"}


def test_require_warm_bad_value(cache_env, monkeypatch):
    monkeypatch.setenv("EP_JIT_REQUIRE_WARM", "yes")
    with pytest.raises(ep_jit.ConfigError, match="EP_JIT_REQUIRE_WARM: expected 0 or 1, got 'yes'"):
        ep_jit.get_kernel(layout_spec())
