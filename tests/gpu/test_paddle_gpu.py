"""The torch GPU checks through Paddle (skipped where paddle-gpu is not installed)."""

import os
import subprocess
import sys

import pytest

from helpers import GPU_COUNT, REPO, free_ports

paddle = pytest.importorskip("paddle")


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
def test_paddle_dispatch_combine_match_reference(world):
    if not paddle.device.is_compiled_with_cuda():
        pytest.skip("paddle is a CPU build")
    if GPU_COUNT < world:
        pytest.skip(f"needs {world} GPUs, found {GPU_COUNT}")
    ports = free_ports(world)
    eps = ",".join(f"127.0.0.1:{p}" for p in ports)
    procs = []
    for r in range(world):
        env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": str(r), "WORLD_SIZE": str(world),
               "PADDLE_TRAINER_ID": str(r), "PADDLE_TRAINERS_NUM": str(world), "PADDLE_TRAINER_ENDPOINTS": eps,
               "PADDLE_CURRENT_ENDPOINT": f"127.0.0.1:{ports[r]}"}
        procs.append(subprocess.Popen([sys.executable, str(REPO / "tests" / "gpu" / "ep_worker_paddle.py")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for r, p in enumerate(procs):
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0 and "OK paddle" in out, f"rank {r}:\n{out[-4000:]}"
