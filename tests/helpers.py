"""What the tests share: the repository, the GPU count, specs, ports and subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

from ep_jit import KernelSpec, member_hash

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


def layout_spec(**overrides) -> KernelSpec:
    fields = dict(template="layout", hidden=2048, num_experts=64, num_ranks=4, topk=4, dtype="bf16",
                  member_hash=member_hash([0, 1, 2, 3]), arch="sm_90a")
    fields.update(overrides)
    return KernelSpec(**fields)


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
