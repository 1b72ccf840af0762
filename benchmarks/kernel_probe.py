#!/usr/bin/env python3
"""Probe: each EP kernel alone, with no cross-rank wait, to separate kernel speed from
synchronisation. Run under the same launcher environment as scripts/bench_ep.py:

    python benchmarks/kernel_probe.py --world 2
"""

import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def median_us(fn, n=20):
    import torch
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    return statistics.median(ts)


def rank_main():
    import torch
    import torch.distributed as dist
    import ep_jit
    from ep_jit.transports import COPY_THREADS
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    T, H, E, K = 4096, 7168, 256, 8
    idx = torch.rand(T, E, device="cuda").argsort(1)[:, :K].contiguous()
    w = torch.rand(T, K, device="cuda")
    x = torch.randn(T, H, device="cuda").bfloat16()
    buf = ep_jit.Buffer(dist.group.WORLD, H, E, K, T, num_sms=24)
    res = buf.dispatch(x, idx, w)
    y = torch.randn(res.handle.num_recv, H, device="cuda").bfloat16()
    out = buf.combine(y, res.handle)
    torch.cuda.synchronize()
    dist.barrier()
    s = torch.cuda.current_stream().cuda_stream
    nv = buf._transport  # the NVLink transport's internals, probed kernel by kernel
    L, peers, status, r = nv.layout, nv.sym.peer_table, nv._status, buf.group.rank
    h = res.handle
    p = lambda t: t.data_ptr()  # noqa: E731
    d, c = nv.modules["dispatch"], nv.modules["combine"]
    runs = {
        "stage": (d[0], (p(x), 0, p(idx), p(w), p(h.token_slot), T, peers, L, r, 0, 10**9, status)),
        "pull": (d[1], (p(res.recv_x), 0, p(res.recv_topk_idx), p(res.recv_topk_weights), h.num_recv,
                        p(h.recv_offsets), peers, L, r, 1, status, nv._counters)),
        "push": (c[0], (p(y), h.num_recv, p(h.recv_offsets), peers, L, r, 2, 0, 10**9, status, nv._counters + 4)),
        "reduce": (c[1], (p(out), p(h.token_slot), T, peers, L, r, 2, 10**9, status, nv._counters + 8)),
    }
    results = {}
    for name, (kern, args) in runs.items():
        dist.barrier()
        torch.cuda.synchronize()
        results[name] = median_us(lambda: kern.launch(24, COPY_THREADS, s, *args))
    n = h.num_recv
    print(f"rank {rank}: rows {n}; " + ", ".join(f"{k} {v:.0f} us" for k, v in results.items()) +
          f"; stage {T * H * 2 / results['stage'] / 1e3:.0f} GB/s, pull {n * H * 2 / results['pull'] / 1e3:.0f} GB/s,"
          f" push {n * H * 2 / results['push'] / 1e3:.0f} GB/s, reduce {n * H * 2 / results['reduce'] / 1e3:.0f} GB/s read",
          flush=True)
    dist.barrier()
    torch.cuda.synchronize()
    os._exit(0)


def main():
    if "RANK" in os.environ:
        rank_main()
        return
    world = int(sys.argv[sys.argv.index("--world") + 1]) if "--world" in sys.argv else 2
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, __file__], env={**env, "RANK": str(r)}) for r in range(world)]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    main()
