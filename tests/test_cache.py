import dataclasses
import os
import stat

import pytest

import ep_jit
from helpers import run_py
from ep_jit import CompileError, ConfigError, get_kernel, member_hash
from ep_jit.cache import DiskCache, decode_entry, encode_entry
from ep_jit.jit import clear_memory_cache, resolve, spec_key
from helpers import layout_spec


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in ("memory_hits", "disk_hits", "compiles", "compile_failures")}


def test_three_tiers_and_counters(cache_env):
    spec = layout_spec()
    s0 = ep_jit.stats()
    b1, tier1 = resolve(spec)
    b2 = get_kernel(spec)
    clear_memory_cache()
    b3, tier3 = resolve(spec)
    s1 = ep_jit.stats()
    assert (tier1, tier3) == ("compiled", "disk")
    assert b1 is b2 and b1.cubin == b3.cubin and b1.lowered_names == b3.lowered_names
    assert _delta(s0, s1) == {"memory_hits": 1, "disk_hits": 1, "compiles": 1, "compile_failures": 0}
    for k in ("compile_seconds", "load_seconds", "lock_wait_seconds"):
        assert s1[k] >= s0[k]
    assert s1["compile_seconds"] > s0["compile_seconds"]


def test_root_and_folders_are_private(cache_env):
    resolve(layout_spec())
    for path in [cache_env, *[p for p in cache_env.rglob("*") if p.is_dir()]]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for path in cache_env.rglob("*.entry"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_shared_root_is_refused_unless_opted_in(cache_env, monkeypatch):
    cache_env.mkdir(mode=0o700)
    os.chmod(cache_env, 0o777)
    with pytest.raises(ConfigError, match="EP_JIT_ALLOW_SHARED_CACHE"):
        resolve(layout_spec())
    assert not any(cache_env.iterdir())
    monkeypatch.setenv("EP_JIT_ALLOW_SHARED_CACHE", "1")
    assert resolve(layout_spec())[1] == "compiled"


def test_entry_roundtrip_and_header_contents(cache_env):
    binary, _ = resolve(layout_spec())
    entry = DiskCache().read(binary.key)
    h = dataclasses.asdict(entry.header)
    assert entry.payload == binary.cubin
    assert h["status"] == "ok" and h["key"] == binary.key
    assert h["inputs"]["member_hash"] == member_hash([0, 1, 2, 3])
    for field in ("format", "ep_jit", "template", "source_sha256", "params", "arch", "nvrtc", "options",
                  "name_expressions", "cuda_headers"):
        assert field in h["inputs"], field
    for field in ("lowered_names", "log", "compile_seconds", "created_at", "ep_jit_version", "nvrtc_version",
                  "source"):
        assert field in h, field


CORRUPTIONS = {
    "flipped": lambda b: b[:100] + bytes([b[100] ^ 0x01]) + b[101:],
    "flipped_payload": lambda b: b[:-40] + bytes([b[-40] ^ 0x80]) + b[-39:],
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "garbage": lambda b: os.urandom(len(b)),
    "short_garbage": lambda b: b"EPJITKC\0garbage",
    "extra_bytes": lambda b: b + b"\0",
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_entries_are_quarantined_and_rebuilt(cache_env, kind):
    spec = layout_spec()
    good, _ = resolve(spec)
    path = DiskCache().entry_path(good.key)
    path.write_bytes(CORRUPTIONS[kind](path.read_bytes()))
    clear_memory_cache()
    s0 = ep_jit.stats()
    rebuilt, tier = resolve(spec)
    assert tier == "compiled" and _delta(s0, ep_jit.stats())["disk_hits"] == 0
    assert rebuilt.cubin == good.cubin
    quarantined = list((cache_env / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith(good.key)
    assert DiskCache().read(good.key).payload == good.cubin


def test_entry_with_another_keys_header_is_corrupt(cache_env):
    a, _ = resolve(layout_spec())
    b, _ = resolve(layout_spec(topk=2))
    cache = DiskCache()
    cache.entry_path(a.key).write_bytes(cache.entry_path(b.key).read_bytes())
    assert cache.read(a.key) is None
    assert len(list((cache_env / "quarantine").iterdir())) == 1


def test_decode_rejects_wrong_format_version(cache_env):
    binary, _ = resolve(layout_spec())
    data = bytearray(encode_entry(DiskCache().read(binary.key).header, b"x"))
    data[8] = 99
    with pytest.raises(Exception, match="format 99"):
        decode_entry(bytes(data), binary.key)


# ---- key sensitivity --------------------------------------------------------

def test_key_is_stable_across_processes(cache_env):
    code = ("import sys; sys.path.insert(0, 'tests'); from helpers import layout_spec;"
            "from ep_jit.jit import spec_key; print(spec_key(layout_spec()))")
    out = run_py(code, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == spec_key(layout_spec())


@pytest.mark.parametrize("change", [
    dict(member_hash=member_hash([0, 1, 2, 4])),
    dict(member_hash=member_hash([1, 0, 2, 3])),
    dict(arch="sm_90"),
    dict(arch="sm_100a"),
    dict(hidden=4096),
    dict(num_experts=128),
    dict(num_ranks=8, member_hash=member_hash(range(8))),
    dict(topk=8),
    dict(dtype="fp8_e4m3"),
])
def test_key_changes_with_every_spec_field(cache_env, change):
    assert spec_key(layout_spec(**change)) != spec_key(layout_spec())


def test_key_changes_with_template_source(cache_env, template_copy):
    before = spec_key(layout_spec())
    path = template_copy / "layout.cu"
    path.write_text(path.read_text() + "\n// a comment is a change\n")
    assert spec_key(layout_spec()) != before


def test_key_changes_with_included_header(cache_env, template_copy):
    before = spec_key(layout_spec())
    path = template_copy / "ep_common.cuh"
    path.write_text(path.read_text() + "\nnamespace ep_jit { constexpr int kUnused = 1; }\n")
    assert spec_key(layout_spec()) != before


def test_key_ignores_template_location(cache_env, template_copy):
    # same bytes in another folder: same key (paths of this machine never enter it)
    from ep_jit.compiler import template_dir
    os.environ.pop("EP_JIT_TEMPLATE_DIR")
    original = spec_key(layout_spec())
    os.environ["EP_JIT_TEMPLATE_DIR"] = str(template_copy)
    assert template_dir() == template_copy
    assert spec_key(layout_spec()) == original


def test_key_changes_with_nvrtc_options(cache_env, monkeypatch):
    before = spec_key(layout_spec())
    monkeypatch.setenv("EP_JIT_NVRTC_OPTIONS", "-lineinfo")
    assert spec_key(layout_spec()) != before


def test_key_changes_with_nvrtc_version(cache_env, monkeypatch):
    import ep_jit.compiler as compiler
    before = spec_key(layout_spec())
    monkeypatch.setattr(compiler, "nvrtc_version", lambda: "99.9")
    assert spec_key(layout_spec()) != before


# ---- remembered failures ----------------------------------------------------

def test_compile_failure_is_remembered_in_process_and_on_disk(cache_env, template_copy):
    path = template_copy / "layout.cu"
    path.write_text(path.read_text().replace("blockIdx.x, a.topk_idx", "broken_here, a.topk_idx"))
    spec = layout_spec()
    with pytest.raises(CompileError, match="broken_here"):
        get_kernel(spec)
    s0 = ep_jit.stats()
    with pytest.raises(CompileError, match="broken_here"):
        get_kernel(spec)
    assert _delta(s0, ep_jit.stats())["compile_failures"] == 0
    # another process (another rank) reads the failure and does not compile again
    code = ("import sys, ep_jit; sys.path.insert(0, 'tests'); from helpers import layout_spec\n"
            "try:\n    ep_jit.get_kernel(layout_spec())\n"
            "except ep_jit.CompileError as e:\n    print('FAILED', ep_jit.stats()['compiles'], 'broken_here' in e.log)")
    out = run_py(code, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.stdout.split() == ["FAILED", "0", "True"], out.stderr


def test_bad_settings_are_clear_errors(cache_env, monkeypatch):
    from ep_jit import config
    monkeypatch.setenv("EP_JIT_LOCK_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="EP_JIT_LOCK_TIMEOUT: expected a positive number of seconds, got 'soon'"):
        config.lock_timeout()
    monkeypatch.setenv("EP_JIT_ARCH", "hopper")
    with pytest.raises(ConfigError, match="EP_JIT_ARCH"):
        config.default_arch()
    monkeypatch.setenv("EP_JIT_LOG", "loud")
    with pytest.raises(ConfigError, match="EP_JIT_LOG"):
        config.configure_logging()
