"""ep_jit.warm over a torch gloo group of 8 processes, each with its own cache (as on 8
nodes): one compile per key per group, every cache filled and verified, and a failed
compile raised alike on every rank without a hang."""

import json
import textwrap
import time

import pytest

import ep_jit
from helpers import spawn_ranks
from ep_jit import GroupInfo
from ep_jit.cache import DiskCache
from ep_jit.jit import clear_memory_cache, resolve

WORLD = 8
TIMEOUT_S = 60  # the process group's timeout: no rank may wait longer than this

WORKER = textwrap.dedent("""
    import datetime, json, os, sys, time
    import torch.distributed as dist
    import ep_jit
    from ep_jit.jit import clear_memory_cache
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=%(timeout)d))

    def phase(hidden, dtypes):
        specs = [s for d in dtypes for s in ep_jit.buffer_specs(hidden=hidden, num_experts=8, topk=2, dtype=d,
                                                                members=range(world), arch="sm_90a")]
        before = ep_jit.stats()
        t = time.perf_counter()
        try:
            out = {"keys": [b.key for b in ep_jit.warm(specs, dist.group.WORLD)]}
        except ep_jit.EPJitError as exc:
            out = {"error": type(exc).__name__, "message": str(exc)}
        after = ep_jit.stats()
        out["seconds"] = time.perf_counter() - t
        out["delta"] = {k: after[k] - before[k] for k in ("compiles", "peer_hits", "disk_hits", "compile_failures")}
        return out

    results = {}
    for name in os.environ["PHASES"].split(","):
        if name == "cold":
            results[name] = phase(1024, ["bf16", "fp8"])
        elif name == "again":            # a new process would start like this: memory empty, disk full
            clear_memory_cache()
            results[name] = phase(1024, ["bf16", "fp8"])
        elif name == "held":             # only rank 0's cache holds these
            results[name] = phase(2048, ["bf16"])
        elif name == "broken_rank":      # one rank cannot even render its sources
            clear_memory_cache()
            if rank == 3:
                os.environ["EP_JIT_TEMPLATE_DIR"] = "/nonexistent/templates"
            results[name] = phase(1024, ["bf16"])
    print("RESULT " + json.dumps(results), flush=True)
    dist.barrier()
    os._exit(0)  # gloo's teardown sometimes aborts (std::terminate); it is not under test here
""") % {"timeout": TIMEOUT_S}


def _run(tmp_path, phases: str, **env) -> list[dict]:
    def env_for_rank(r):
        return {"EP_JIT_CACHE_DIR": str(tmp_path / f"cache{r}"), "EP_JIT_LOCK_DIR": str(tmp_path / f"locks{r}"),
                "PHASES": phases, **env}
    outs = spawn_ranks(WORKER, WORLD, env_for_rank, timeout=4 * TIMEOUT_S)
    return [json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]) for out in outs]


def _verified_keys(root) -> set[str]:
    cache = DiskCache(root)
    return {cache.load(p).key for p in cache.entry_paths()}


def test_eight_private_caches_compile_each_key_once(cache_env, tmp_path):
    # rank 0's cache already holds the "held" phase's kernels: the others get them from it
    held = ep_jit.buffer_specs(hidden=2048, num_experts=8, topk=2, dtype="bf16", members=range(WORLD), arch="sm_90a")
    for spec in held:
        resolve(spec, DiskCache(tmp_path / "cache0"))
    results = _run(tmp_path, "cold,again,held,broken_rank")

    cold = [r["cold"] for r in results]
    keys = set(cold[0]["keys"])
    assert len(keys) == 8 and all(set(r["keys"]) == keys for r in cold)
    assert sum(r["delta"]["compiles"] for r in cold) == len(keys)  # one compile per key per group
    for r in cold:  # every other key came from a peer, verified
        assert r["delta"]["peer_hits"] == len(keys) - r["delta"]["compiles"]
    for rank in range(WORLD):
        assert keys <= _verified_keys(tmp_path / f"cache{rank}")

    again = [r["again"] for r in results]
    assert all(r["delta"] == {"compiles": 0, "peer_hits": 0, "disk_hits": 8, "compile_failures": 0} for r in again)

    held_run = [r["held"] for r in results]
    assert sum(r["delta"]["compiles"] for r in held_run) == 0
    assert all(r["delta"]["peer_hits"] == len(held) for r in held_run[1:])
    for rank in range(WORLD):
        assert set(held_run[0]["keys"]) <= _verified_keys(tmp_path / f"cache{rank}")

    broken = [r["broken_rank"] for r in results]
    assert {r["error"] for r in broken} == {"GroupWarmError"}
    assert all("rank 3: ConfigError: EP_JIT_TEMPLATE_DIR" in r["message"] for r in broken)
    assert all(r["seconds"] < TIMEOUT_S for r in broken)


def test_failed_compile_raises_the_same_error_on_every_rank(cache_env, template_copy, tmp_path):
    path = template_copy / "combine.cu"
    path.write_text(path.read_text().replace("blockIdx.x", "broken_here", 1))
    start = time.time()
    results = [r["cold"] for r in _run(tmp_path, "cold", EP_JIT_TEMPLATE_DIR=str(template_copy))]
    assert time.time() - start < 3 * TIMEOUT_S
    assert {r["error"] for r in results} == {"CompileError"}
    assert len({r["message"] for r in results}) == 1  # the same error, word for word
    assert "broken_here" in results[0]["message"] and "NVRTC log" in results[0]["message"]
    assert sum(r["delta"]["compile_failures"] for r in results) == 2  # combine, bf16 and fp8: once each
    assert sum(r["delta"]["compiles"] for r in results) == 6          # every other kernel still built once
    assert all(r["seconds"] < TIMEOUT_S for r in results)


# ---- in one process, with a hand-made gather -----------------------------------

def _specs(hidden=1024):
    return ep_jit.buffer_specs(hidden=hidden, num_experts=8, topk=2, dtype="bf16", members=[0, 1], arch="sm_90a")


def test_a_lone_member_needs_no_gather(cache_env):
    binaries = ep_jit.warm(_specs(), GroupInfo([0], 0))
    assert [b.spec for b in binaries] == _specs() and ep_jit.stats()["compiles"] >= len(binaries)
    with pytest.raises(ValueError, match="all_gather: expected a callable"):
        ep_jit.warm(_specs(), GroupInfo([0, 1], 0))


def test_peer_bytes_that_do_not_verify_are_rebuilt_here(cache_env, monkeypatch):
    """Rank 1 lacks everything and 'rank 0' sends garbage: rank 1 builds its kernels itself."""
    specs = _specs()
    calls = []

    def gather(obj):
        calls.append(obj)
        if len(calls) == 1:  # round 1: rank 0 claims to hold every key
            keys = set(obj["ok"]["lacking"])
            return [{"ok": {"keys": keys, "held": keys, "lacking": {}, "require_warm": False,
                            "always_compile": False}}, obj]
        return [{"ok": {k: b"garbage" for k in calls[0]["ok"]["lacking"]}}, obj]

    s0 = ep_jit.stats()
    binaries = ep_jit.warm(specs, GroupInfo([0, 1], 1), all_gather=gather)
    assert len(calls) == 2 and ep_jit.stats()["compiles"] - s0["compiles"] == len(specs)
    assert all(b.cubin for b in binaries)


def test_require_warm_in_a_group_raises_before_compiling(cache_env, monkeypatch):
    monkeypatch.setenv("EP_JIT_REQUIRE_WARM", "1")
    s0 = ep_jit.stats()
    with pytest.raises(ep_jit.NotWarmError, match=r"EP_JIT_REQUIRE_WARM=1 .* holds .*layout\(hidden=1024"):
        ep_jit.warm(_specs(), GroupInfo([0], 0))
    assert ep_jit.stats()["compiles"] == s0["compiles"] and not cache_env.exists()
    monkeypatch.delenv("EP_JIT_REQUIRE_WARM")
    ep_jit.warm(_specs(), GroupInfo([0], 0))
    clear_memory_cache()
    monkeypatch.setenv("EP_JIT_REQUIRE_WARM", "1")
    assert len(ep_jit.warm(_specs(), GroupInfo([0], 0))) == len(_specs())  # warm now: allowed


def test_always_compile_bypasses_the_disk_in_a_group_too(cache_env, monkeypatch):
    """EP_JIT_ALWAYS_COMPILE on any member: every member compiles for itself, nothing is
    read from or written to a disk cache, no entry travels."""
    monkeypatch.setenv("EP_JIT_ALWAYS_COMPILE", "1")
    calls = []

    def gather(obj):
        calls.append(obj)
        return [obj, obj]

    s0 = ep_jit.stats()
    binaries = ep_jit.warm(_specs(), GroupInfo([0, 1], 0), all_gather=gather)
    assert len(calls) == 1 and ep_jit.stats()["compiles"] - s0["compiles"] == len(binaries)
    assert not (cache_env / "v1").exists()


def test_an_entry_travels_as_its_outcome_and_compressed_payload(cache_env):
    """Peers rebuild the rest of the header from the key, so a DeepSeek-V3 dispatch entry
    crosses the group in well under 32 KB (a fresh gloo group's first larger message costs
    about 0.2 s), and what arrives is the entry that was sent."""
    import pickle

    from ep_jit import group_warm
    from ep_jit.cache import DiskCache

    spec = ep_jit.buffer_specs(hidden=7168, num_experts=256, topk=8, dtype="bf16", members=range(8),
                               arch="sm_90a", transport="nvlink")[0]
    key = ep_jit.get_kernel(spec).key
    entry = DiskCache().read(key)
    wire = group_warm._pack(entry)
    assert len(pickle.dumps(wire)) < 32_000
    assert group_warm._unpack(spec, key, wire) == (entry.header, entry.payload)
    outcome, packed, digest = wire
    with pytest.raises(ep_jit.cache.CorruptEntry, match="checksum"):
        group_warm._unpack(spec, key, (outcome, packed, "0" * 64))
