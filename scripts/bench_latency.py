#!/usr/bin/env python3
"""Dispatch + combine latency at decode sizes, one member on one GPU.

    python scripts/bench_latency.py [--tokens 1 8 32 128 512 4096 --hidden 7168 --experts 256 --topk 8]

Per token count and mode, the median over --iters calls after warm-up (spread over --rounds
rounds that take the modes in turn, so a slow spell of the host weighs on every mode alike) of
- wall: host time from the dispatch call until combine's output is ready (the stream
  synchronised), what a caller waits;
- gpu: CUDA-event time from before dispatch to after combine on the stream (other calls:
  the event records stay out of the wall).
Modes: default (the host waits for the counts, exact-size outputs), capacity
(capacity = T, never synchronises), reuse (capacity mode, each call writing the previous
call's outputs again through `out=`: no allocation) and graph (the capacity-mode calls
captured once in a CUDA graph and replayed: the GPU floor, no host work). Also, from
each round's calls issued back to back without synchronising in between (medians over the
rounds): `host_us`, the host's own time per call, and `back_to_back_us`, the time per call
until the last is done.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import ep_jit


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 512, 4096])
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--sms", type=int, default=24)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5, help="rounds of --iters / rounds calls per mode")
    p.add_argument("--out", type=Path, help="write the JSON results here")
    return p.parse_args()


def measure(step, iters: int, warmup: int) -> tuple[list[float], list[float]]:
    """(wall us, gpu us) of each call; alternate calls are timed by the host alone (the wall:
    no event records of its own in it) and by CUDA events around the call (the gpu)."""
    stream = torch.cuda.current_stream()
    walls, events = [], []
    for i in range(warmup + 2 * iters):
        timed_by_events = i % 2 == 1
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream.synchronize()
        t = time.perf_counter()
        if timed_by_events:
            start.record()
        step()
        if timed_by_events:
            end.record()
        stream.synchronize()
        if i < warmup:
            continue
        if timed_by_events:
            events.append(start.elapsed_time(end) * 1e3)
        else:
            walls.append((time.perf_counter() - t) * 1e6)
    return walls, events


def back_to_back(step, iters: int, warmup: int) -> tuple[float, float]:
    """Microseconds per call of `iters` calls issued back to back: (the host's own time, the
    time until the last one is done: what a loop that never synchronises pays per call)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    issued = time.perf_counter() - t
    torch.cuda.synchronize()
    done = time.perf_counter() - t
    return issued / iters * 1e6, done / iters * 1e6


def main() -> None:
    args = parse()
    torch.cuda.set_device(0)
    g = torch.Generator(device="cuda").manual_seed(0)
    buf = ep_jit.Buffer(ep_jit.GroupInfo([0], 0), args.hidden, args.experts, args.topk, max(args.tokens),
                        num_sms=args.sms, device=0)
    rows = []
    for T in args.tokens:
        x = torch.randn(T, args.hidden, device="cuda", generator=g).bfloat16()
        idx = torch.rand(T, args.experts, device="cuda", generator=g).argsort(dim=1)[:, :args.topk].contiguous()
        w = torch.rand(T, args.topk, device="cuda", generator=g)

        def default() -> None:
            r = buf.dispatch(x, idx, w)
            buf.combine(r.recv_x, r.handle)

        def capacity() -> None:
            r = buf.dispatch(x, idx, w, capacity=T)
            buf.combine(r.recv_x, r.handle)

        kept = buf.dispatch(x, idx, w, capacity=T)
        out = buf.combine(kept.recv_x, kept.handle)

        def reuse() -> None:  # capacity mode into the outputs of the call before: no allocation
            buf.dispatch(x, idx, w, capacity=T, out=kept)
            buf.combine(kept.recv_x, kept.handle, out=out)

        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            capacity()
        steps = {"default": default, "capacity": capacity, "reuse": reuse, "graph": graph.replay}
        samples = {mode: ([], [], [], []) for mode in steps}  # wall, gpu, host, back to back
        per_round = max(1, args.iters // args.rounds)
        for _ in range(args.rounds):
            for mode, step in steps.items():
                walls, gpus = measure(step, per_round, args.warmup)
                host, pipelined = back_to_back(step, per_round, args.warmup)
                for into, values in zip(samples[mode], (walls, gpus, [host], [pipelined])):
                    into.extend(values)
        for mode, columns in samples.items():
            wall, gpu, host, pipelined = map(statistics.median, columns)
            rows.append(dict(tokens=T, mode=mode, wall_us=round(wall, 1), gpu_us=round(gpu, 1), host_us=round(host, 1),
                             back_to_back_us=round(pipelined, 1)))
            print(f"T={T:5d} {mode:9s} wall {wall:8.1f} us   gpu {gpu:8.1f} us   host {host:8.1f} us   "
                  f"back to back {pipelined:8.1f} us", flush=True)
    buf.close()
    if args.out:
        args.out.write_text(json.dumps(dict(args={k: str(v) for k, v in vars(args).items()}, results=rows), indent=1))


if __name__ == "__main__":
    main()
