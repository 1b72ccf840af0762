"""The framework collectives the collective transport moves tokens with, on CPU groups:
torch over gloo end to end; Paddle's all_gather over gloo (tests/test_paddle.py) and its
all_to_all call checked against the installed signature (Paddle's gloo has no all_to_all)."""

import inspect
import textwrap

import pytest

from helpers import spawn_ranks

TORCH_WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from ep_jit.frameworks.torch import TorchAdapter
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    a, g = TorchAdapter(), dist.group.WORLD
    row = torch.tensor([100 * rank + i for i in range(5)], dtype=torch.int32)
    gathered = torch.full((world * 5,), -7, dtype=torch.int32)
    a.all_gather(g, gathered, row, None)
    assert gathered.tolist() == [100 * r + i for r in range(world) for i in range(5)], gathered.tolist()
    # rank s sends (s + d) % 3 rows to rank d (some zero); row j to d is [s, d, j, ...]
    n = lambda s, d: (s + d) % 3
    send = torch.cat([torch.tensor([[rank, d, j, 9]], dtype=torch.uint8).repeat(1, 4)
                      for d in range(world) for j in range(n(rank, d))] or [torch.empty(0, 16, dtype=torch.uint8)])
    recv = torch.full((sum(n(s, rank) for s in range(world)), 16), 255, dtype=torch.uint8)
    a.all_to_all(g, recv, send, [n(s, rank) for s in range(world)], [n(rank, d) for d in range(world)], None)
    want = [[s, rank, j, 9] * 4 for s in range(world) for j in range(n(s, rank))]
    assert recv.tolist() == want, (recv.tolist(), want)
    print("TORCH COLLECTIVES OK", flush=True)
    dist.barrier()
    os._exit(0)  # gloo's teardown in torch 2.13 sometimes aborts (std::terminate); it is not under test here
""")


def test_torch_collectives_over_gloo():
    pytest.importorskip("torch.distributed")
    for out in spawn_ranks(TORCH_WORKER, 3):
        assert "TORCH COLLECTIVES OK" in out


def test_paddle_all_to_all_call_fits_the_installed_signature(monkeypatch):
    paddle = pytest.importorskip("paddle")
    import paddle.distributed as dist

    from ep_jit.frameworks.paddle import PaddleAdapter
    real = inspect.signature(dist.alltoall_single)
    seen = {}

    def fake(*args, **kwargs):
        bound = real.bind(*args, **kwargs)  # raises if a keyword is not Paddle's
        seen.update(bound.arguments)

    monkeypatch.setattr(dist, "alltoall_single", fake)
    out, inp, group = paddle.empty([3, 16], dtype="uint8"), paddle.ones([2, 16], dtype="uint8"), object()
    PaddleAdapter().all_to_all(group, out, inp, [1, 2], [2, 0], None)
    assert seen["out_tensor"] is out and seen["in_tensor"] is inp and seen["group"] is group
    assert seen["out_split_sizes"] == [1, 2] and seen["in_split_sizes"] == [2, 0]
    with pytest.raises(ValueError, match="stream: expected Paddle's current stream for a collective"):
        PaddleAdapter().all_to_all(group, out, inp, [1, 2], [2, 0], 1234)
