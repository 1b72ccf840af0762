"""One rank of the Paddle GPU checks: the same inputs and CPU reference as the torch
worker (tests/gpu/ep_worker.py), through Paddle tensors, a Paddle group and Paddle streams.

    PADDLE_TRAINER_ID=.. PADDLE_TRAINERS_NUM=.. PADDLE_TRAINER_ENDPOINTS=.. \\
    PADDLE_CURRENT_ENDPOINT=.. RANK=.. WORLD_SIZE=.. python tests/gpu/ep_worker_paddle.py
"""

import os
import sys

import numpy as np
import paddle
import paddle.distributed as dist
import torch

sys.path.insert(0, os.path.dirname(__file__))
from ep_reference import combine_reference, dispatch_reference, expert_output  # noqa: E402
from ep_worker import KINDS, RANK, SEED, WORLD, inputs  # noqa: E402

import ep_jit  # noqa: E402


def to_paddle(t: torch.Tensor) -> paddle.Tensor:
    if t.dtype == torch.bfloat16:
        return paddle.to_tensor(t.view(torch.int16).numpy()).view(paddle.bfloat16)
    return paddle.to_tensor(t.numpy())


def to_torch(t: paddle.Tensor) -> torch.Tensor:
    if t.dtype == paddle.bfloat16:
        return torch.from_numpy(t.view(paddle.int16).numpy()).view(torch.bfloat16)
    return torch.from_numpy(np.asarray(t.numpy()))


def check_round(buf, data, E, H, stream) -> None:
    x, idx, w, _ = (to_paddle(t) if t is not None else None for t in data[RANK])
    res = buf.dispatch(x, idx, w, stream=stream)
    assert type(res.recv_x).__module__.startswith("paddle")
    refs = [dispatch_reference([d[0] for d in data], [d[1] for d in data], [d[2] for d in data], None,
                               r, WORLD, E) for r in range(WORLD)]
    y = to_paddle(expert_output(refs[RANK]["x"], None, RANK))
    out = buf.combine(y, res.handle, stream=stream)
    paddle.device.synchronize()
    ref = refs[RANK]
    assert torch.equal(to_torch(res.recv_x).view(torch.int16), ref["x"].view(torch.int16))
    assert torch.equal(to_torch(res.recv_topk_idx), ref["idx"])
    assert torch.equal(to_torch(res.recv_topk_weights), ref["weights"])
    want = combine_reference(data[RANK][0].shape[0], H, refs,
                             [expert_output(r["x"], None, j) for j, r in enumerate(refs)], RANK)
    got = to_torch(out).float()
    assert bool(((got - want).abs() <= want.abs() * 2.0 ** -7 + 1e-30).all())


def main() -> None:
    paddle.device.set_device(f"gpu:{RANK}")
    dist.init_parallel_env()
    checks = 0
    H, E, K = 2048, 64, 8
    side = paddle.device.Stream()
    group = dist.collective._get_global_group()
    for transport in ("nvlink", "collective"):
        with ep_jit.Buffer(group, H, E, K, max_tokens_per_rank=128, num_sms=8, transport=transport) as buf:
            for i, kind in enumerate(KINDS):
                data = inputs(kind, E, K, H, "bf16", 128, SEED + i)
                check_round(buf, data, E, H, None)
                if transport == "nvlink":  # an explicit stream other than Paddle's current one
                    check_round(buf, data, E, H, side)
                else:  # Paddle's collectives run on its current stream: switch that instead
                    with paddle.device.stream_guard(side):
                        check_round(buf, data, E, H, None)
                checks += 2
    dist.barrier()
    print(f"OK paddle {checks}", flush=True)


if __name__ == "__main__":
    main()
