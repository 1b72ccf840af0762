"""Many processes, one cache: dedup under the per-key lock, and dead holders."""

import json
import os
import signal
import subprocess
import sys
import time

from helpers import REPO
from ep_jit.cache import DiskCache
from ep_jit.transports import BUFFER_TEMPLATES

PLAN = """
[[job]]
name = "a"
hidden = [1024, 2048]
experts = 8
topk = 2
dtype = ["bf16", "fp8"]
world_size = 4
ep_size = 2
"""

WORKER = """
import hashlib, json, os, sys, time
from pathlib import Path
from ep_jit.jit import resolve
from ep_jit.plan import load_plan, unique_specs
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.005)
out = {}
for spec in unique_specs(load_plan(Path(sys.argv[1]), "sm_90a")):
    binary, tier = resolve(spec)
    out[binary.key] = [tier, hashlib.sha256(binary.cubin).hexdigest()]
print(json.dumps(out))
"""


def _env(cache_env, tmp_path, **extra):
    return {**os.environ, "PYTHONPATH": str(REPO), "EP_JIT_CACHE_DIR": str(cache_env),
            "EP_JIT_LOCK_DIR": str(tmp_path / "locks"), **extra}


def test_sixteen_processes_compile_each_key_once(cache_env, tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(plan), str(go)], env=_env(cache_env, tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(16)]
    time.sleep(1.0)  # let every interpreter start and wait at the line
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out))
    keys = set(results[0])
    assert len(keys) == 2 * 2 * 2 * len(BUFFER_TEMPLATES)  # 2 groups x 2 hidden x 2 dtypes x a Buffer's kernels
    for key in keys:
        tiers = [r[key][0] for r in results]
        assert tiers.count("compiled") == 1, (key, tiers)
        assert len({r[key][1] for r in results}) == 1  # identical bytes everywhere
    cache = DiskCache(cache_env)
    assert {p.name.split(".")[0] for p in cache.entry_paths()} == keys
    assert list(cache.temp_paths()) == []
    leftovers = [p for p in cache_env.rglob("*") if p.is_file() and not p.name.endswith(".entry")]
    assert leftovers == []


KILLED_WORKER = """
import os, sys, time
from pathlib import Path
import ep_jit.jit as jit
sys.path.insert(0, "tests")
from helpers import layout_spec
real = jit.compile_source
def slow(source, key):
    Path(sys.argv[1]).touch()       # the lock is held and the compile has begun
    time.sleep(600)
    return real(source, key)
jit.compile_source = slow
jit.resolve(layout_spec())
"""


def _kill_once_started(code: str, env: dict, tmp_path) -> None:
    """Run `code`, wait until it touches its marker file, then SIGKILL it."""
    started = tmp_path / "started"
    victim = subprocess.Popen([sys.executable, "-c", code, str(started)], env=env, cwd=REPO)
    deadline = time.time() + 60
    while not started.exists():
        assert time.time() < deadline and victim.poll() is None
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()


def _warm_one_buffer(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-m", "ep_jit.cli.warm", "--hidden", "2048", "--experts", "64",
                          "--topk", "4", "--world-size", "4", "--json"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_killed_compiler_does_not_block_the_next_run(cache_env, tmp_path):
    env = _env(cache_env, tmp_path, EP_JIT_LOCK_TIMEOUT="60")
    _kill_once_started(KILLED_WORKER, env, tmp_path)
    t0 = time.time()
    assert _warm_one_buffer(env)["compiled"] == len(BUFFER_TEMPLATES)
    assert time.time() - t0 < 60
    verify = subprocess.run([sys.executable, "-m", "cache_tools", "verify", "--json"], env=env,
                            capture_output=True, text=True)
    assert verify.returncode == 0 and json.loads(verify.stdout)["entries"] == len(BUFFER_TEMPLATES)


KILLED_WRITER = """
import os, sys, time
from pathlib import Path
import ep_jit.cache as cache
sys.path.insert(0, "tests")
from helpers import layout_spec
import ep_jit.jit as jit
real = os.replace
def stall(src, dst):
    if str(src).endswith(".tmp"):
        Path(sys.argv[1]).touch()   # the temp file is written, not yet published
        time.sleep(600)
    return real(src, dst)
cache.os.replace = stall
jit.resolve(layout_spec())
"""


def test_writer_killed_mid_publish_leaves_no_partial_entry(cache_env, tmp_path):
    env = _env(cache_env, tmp_path, EP_JIT_LOCK_TIMEOUT="60")
    _kill_once_started(KILLED_WRITER, env, tmp_path)
    cache = DiskCache(cache_env)
    assert list(cache.entry_paths()) == [] and len(list(cache.temp_paths())) == 1
    assert _warm_one_buffer(env)["compiled"] == len(BUFFER_TEMPLATES)
    assert len(list(cache.entry_paths())) == len(BUFFER_TEMPLATES)
    assert list(cache.temp_paths()) == []  # the dead writer's temp file was cleaned up
