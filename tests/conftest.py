import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _gpu_count() -> int:
    try:
        from cuda.bindings import driver
    except ImportError:
        return 0
    try:
        (err,) = driver.cuInit(0)
        if err != driver.CUresult.CUDA_SUCCESS:
            return 0
        err, n = driver.cuDeviceGetCount()
        return n if err == driver.CUresult.CUDA_SUCCESS else 0
    except Exception:  # no driver library at all
        return 0


GPU_COUNT = _gpu_count()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none here")
    for item in items:
        if "gpu" in item.keywords and GPU_COUNT == 0:
            item.add_marker(skip)


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    """An empty private cache root and lock folder, and an empty memory tier."""
    from ep_jit.jit import clear_memory_cache

    root = tmp_path / "cache"
    monkeypatch.setenv("EP_JIT_CACHE_DIR", str(root))
    monkeypatch.setenv("EP_JIT_LOCK_DIR", str(tmp_path / "locks"))
    for var in ("EP_JIT_ARCH", "EP_JIT_NVRTC_OPTIONS", "EP_JIT_TEMPLATE_DIR", "EP_JIT_ALLOW_SHARED_CACHE",
                "EP_JIT_LOCK_TIMEOUT", "EP_JIT_SHARED_CACHE_DIR", "EP_JIT_REQUIRE_WARM"):
        monkeypatch.delenv(var, raising=False)
    clear_memory_cache()
    yield root
    clear_memory_cache()


@pytest.fixture
def template_copy(tmp_path, monkeypatch):
    """A private copy of templates/ that a test may edit, used through EP_JIT_TEMPLATE_DIR."""
    from ep_jit.compiler import template_dir

    copy = tmp_path / "templates"
    shutil.copytree(template_dir(), copy)
    monkeypatch.setenv("EP_JIT_TEMPLATE_DIR", str(copy))
    return copy


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now (all sockets are held until every port is chosen)."""
    import contextlib
    import socket
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def free_port() -> int:
    return free_ports(1)[0]


def run_py(code: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """Run Python code in a fresh interpreter with the repository importable."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, **kw)


def run_cli(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], env=full_env, capture_output=True, text=True)


def spawn_ranks(code: str, world: int, env_for_rank=lambda r: {}, timeout: float = 240) -> list[str]:
    """Run `code` as `world` processes (argv: rank, world, a free port); their stdouts in rank order."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(world), str(port)],
                              env={**os.environ, "PYTHONPATH": str(REPO), **env_for_rank(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, f"stdout: {out[-1000:]}\nstderr: {err[-3000:]}"
            outs.append(out)
    finally:
        for p in procs:  # a failed rank must not leave the others waiting forever
            p.kill()
    return outs
