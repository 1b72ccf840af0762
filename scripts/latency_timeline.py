#!/usr/bin/env python3
"""Where the wall time of one decode step goes on the host, one member on one GPU.

    python scripts/latency_timeline.py [--tokens 1 128]

A steady loop of dispatch + combine into `out=` (capacity mode, T tokens, DeepSeek-V3
shape, 24 SMs), synchronised after every step: the medians (and 10th percentiles) over
2000 steps after 300 of warm-up of the time the dispatch call takes on the host, then the
combine call, then the wait in synchronize until combine's output is ready, and their sum,
the step's wall. The wait is what the GPU still needs once the host has queued both
kernels. Also the cost of synchronising an idle stream.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ep_jit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 128])
    args = p.parse_args()
    torch.cuda.set_device(0)
    buf = ep_jit.Buffer(ep_jit.GroupInfo([0], 0), 7168, 256, 8, 4096, num_sms=24, device=0)
    stream = torch.cuda.current_stream()
    for T in args.tokens:
        x = torch.randn(T, 7168, device="cuda").bfloat16()
        idx = torch.rand(T, 256, device="cuda").argsort(dim=1)[:, :8].contiguous()
        w = torch.rand(T, 8, device="cuda")
        r = buf.dispatch(x, idx, w, capacity=T)
        o = buf.combine(r.recv_x, r.handle)
        torch.cuda.synchronize()
        rows = []
        for i in range(2300):
            stream.synchronize()
            t0 = time.perf_counter_ns()
            buf.dispatch(x, idx, w, capacity=T, out=r)
            t1 = time.perf_counter_ns()
            buf.combine(r.recv_x, r.handle, out=o)
            t2 = time.perf_counter_ns()
            stream.synchronize()
            t3 = time.perf_counter_ns()
            if i >= 300:
                rows.append((t1 - t0, t2 - t1, t3 - t2, t3 - t0))
        med = [statistics.median(c) / 1e3 for c in zip(*rows)]
        p10 = [sorted(c)[len(c) // 10] / 1e3 for c in zip(*rows)]
        print(f"T={T}: dispatch call {med[0]:.1f}  combine call {med[1]:.1f}  sync wait {med[2]:.1f}  wall {med[3]:.1f} us"
              f"   (10th pct: {p10[0]:.1f} {p10[1]:.1f} {p10[2]:.1f} {p10[3]:.1f})", flush=True)
        idle = []
        for _ in range(1000):
            t0 = time.perf_counter_ns()
            stream.synchronize()
            idle.append(time.perf_counter_ns() - t0)
        print(f"  idle synchronize {statistics.median(idle) / 1e3:.1f} us", flush=True)
    buf.close()


if __name__ == "__main__":
    main()
