#!/usr/bin/env python3
"""Intra-node EP dispatch/combine bandwidth, with an all-to-all baseline in the same run.

    python scripts/bench_ep.py --world 4 [--tokens 4096 --hidden 7168 --experts 256 --topk 8 --sms 24]

Spawns one process per GPU. Per rank and per phase it reports GB/s by the common EP
formula: received rows x row bytes / time (CUDA events, median after warm-up, L2
flushed before each call). fp8 rows
count their fp32 scales. The baseline is the dispatcher training frameworks build from
torch: permute by destination, torch.distributed.all_to_all_single, unpermute (and the
reverse plus index_add for combine). Also reports ep_jit's collective transport (the
path for groups that span NVLink domains: ep_jit's permute kernels around NCCL's
all_to_all) and the peer-copy bandwidth GPU0 -> GPU1.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--sms", type=int, default=24)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, help="write the JSON results here")
    p.add_argument("--profile", action="store_true", help="print per-kernel GPU times (torch.profiler) on rank 0")
    return p.parse_args()


def time_ms(fn, iters: int, warmup: int) -> float:
    """Median of CUDA-event intervals around fn. Before each, a 256 MiB memset evicts L2
    (so no input is timed from cache) and lets the host queue fn ahead of the GPU, as in
    a training step; the host still waits inside fn where fn itself waits (the counts)."""
    import torch
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(warmup + iters)]
    torch.cuda.synchronize()
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events[warmup:])


def profile(fn, label: str, show: bool) -> None:
    """Per-kernel GPU times of 10 rounds, in launch order (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    if show:
        rows = [(e.time_range.start, e.name.split("<")[0].replace("void ep_jit::", ""), e.time_range.elapsed_us())
                for e in prof.events() if e.device_type.name == "CUDA"]
        rows.sort()
        t0 = rows[0][0] if rows else 0
        print(f"--- {label}: kernels of 10 rounds (start us, name, duration us) ---")
        print(" ".join(f"{(start - t0):.0f}:{name}:{dur:.0f}" for start, name, dur in rows))


def peer_copy_gbps(src_dev: int, dst_dev: int, nbytes: int = 1 << 30) -> float:
    import torch
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=f"cuda:{src_dev}")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dst_dev}")
    ms = time_ms(lambda: dst.copy_(src, non_blocking=True), 10, 3)
    return nbytes / ms / 1e6


class AllToAllDispatcher:
    """Baseline: permute + all_to_all_single + unpermute, as token dispatchers do it."""

    def __init__(self, world: int, num_experts: int):
        self.world, self.local = world, num_experts // world

    def dispatch(self, x, topk_idx, topk_weights, scales=None):
        import torch
        import torch.distributed as dist
        T = x.shape[0]
        dest = torch.where(topk_idx >= 0, topk_idx // self.local, -1)
        mask = torch.zeros(T, self.world, dtype=torch.bool, device=x.device)
        mask.scatter_(1, dest.clamp(min=0), dest >= 0)
        rank_of_pair, token_of_pair = mask.t().nonzero(as_tuple=True)  # sorted by (rank, token)
        send_counts = mask.sum(0).to(torch.int64)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        send, recv = send_counts.tolist(), recv_counts.tolist()  # the host needs the splits
        n = sum(recv)
        out = []
        for t in (x, topk_idx, topk_weights, *([scales] if scales is not None else [])):
            buf = torch.empty((n, *t.shape[1:]), dtype=t.dtype, device=t.device)
            src = t.index_select(0, token_of_pair)
            if t.dtype == torch.float8_e4m3fn:
                dist.all_to_all_single(buf.view(torch.uint8), src.view(torch.uint8), recv, send)
            else:
                dist.all_to_all_single(buf, src, recv, send)
            out.append(buf)
        return out, (token_of_pair, send, recv, T)

    def combine(self, y, state):
        import torch
        import torch.distributed as dist
        token_of_pair, send, recv, T = state
        back = torch.empty((sum(send), y.shape[1]), dtype=y.dtype, device=y.device)
        dist.all_to_all_single(back, y, send, recv)
        out = torch.zeros(T, y.shape[1], dtype=torch.float32, device=y.device)
        out.index_add_(0, token_of_pair, back.float())
        return out.to(torch.bfloat16)


def rank_main(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import ep_jit
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    dist.init_process_group("nccl", device_id=dev)
    T, H, E, K = args.tokens, args.hidden, args.experts, args.topk
    g = torch.Generator(device=dev).manual_seed(1000 + rank)
    idx = torch.rand(T, E, generator=g, device=dev).argsort(dim=1)[:, :K].contiguous()
    w = torch.rand(T, K, generator=g, device=dev)
    xf = torch.randn(T, H, generator=g, device=dev)
    scale = (xf.view(T, H // 128, 128).abs().amax(2) / 448).clamp(min=1e-4)
    x8 = (xf.view(T, H // 128, 128) / scale.unsqueeze(2)).view(T, H).to(torch.float8_e4m3fn)
    results = {"rank": rank}
    base = AllToAllDispatcher(world, E)
    for dtype, x, sc in (("bf16", xf.bfloat16(), None), ("fp8_e4m3", x8, scale.contiguous())):
        row_bytes = H * x.element_size() + (H // 128 * 4 if sc is not None else 0)
        with ep_jit.Buffer(dist.group.WORLD, H, E, K, T, dtype=dtype, num_sms=args.sms) as buf:
            res = buf.dispatch(x, idx, w, sc)
            n = res.handle.num_recv
            y = torch.randn(n, H, generator=g, device=dev).bfloat16()
            d_ms = time_ms(lambda: buf.dispatch(x, idx, w, sc), args.iters, args.warmup)
            nb_ms = time_ms(lambda: buf.dispatch(x, idx, w, sc, capacity=world * T), args.iters, args.warmup)
            c_ms = time_ms(lambda: buf.combine(y, res.handle), args.iters, args.warmup)
            if args.profile:  # every rank runs it (the ops are collective); rank 0 prints
                profile(lambda: buf.dispatch(x, idx, w, sc), f"{dtype} dispatch", rank == 0)
                profile(lambda: buf.combine(y, res.handle), f"{dtype} combine", rank == 0)
        with ep_jit.Buffer(dist.group.WORLD, H, E, K, T, dtype=dtype, num_sms=args.sms,
                           transport="collective") as coll:
            cres = coll.dispatch(x, idx, w, sc)
            assert cres.handle.num_recv == n
            cd_ms = time_ms(lambda: coll.dispatch(x, idx, w, sc), args.iters, args.warmup)
            cc_ms = time_ms(lambda: coll.combine(y, cres.handle), args.iters, args.warmup)
            if args.profile:
                profile(lambda: coll.dispatch(x, idx, w, sc), f"{dtype} dispatch (collective)", rank == 0)
        (bx, *_), state = base.dispatch(x, idx, w, sc)
        assert bx.shape[0] == n
        bd_ms = time_ms(lambda: base.dispatch(x, idx, w, sc), args.iters, args.warmup)
        bc_ms = time_ms(lambda: base.combine(y, state), args.iters, args.warmup)
        gb = lambda rows, nbytes, ms: rows * nbytes / ms / 1e6  # noqa: E731
        results[dtype] = {
            "recv_rows": n, "dispatch_ms": d_ms, "dispatch_nonblocking_ms": nb_ms, "combine_ms": c_ms,
            "baseline_dispatch_ms": bd_ms, "baseline_combine_ms": bc_ms,
            "collective_dispatch_ms": cd_ms, "collective_combine_ms": cc_ms,
            "collective_dispatch_GBps": gb(n, row_bytes, cd_ms), "collective_combine_GBps": gb(n, H * 2, cc_ms),
            "dispatch_GBps": gb(n, row_bytes, d_ms), "dispatch_nonblocking_GBps": gb(n, row_bytes, nb_ms),
            "combine_GBps": gb(n, H * 2, c_ms), "baseline_dispatch_GBps": gb(n, row_bytes, bd_ms),
            "baseline_combine_GBps": gb(n, H * 2, bc_ms)}
    if rank == 0:
        results["peer_copy_GBps"] = peer_copy_gbps(0, 1)
    everyone = [None] * world
    dist.all_gather_object(everyone, results)
    if rank == 0:
        print("RESULTS " + json.dumps(everyone))
    dist.barrier()
    dist.destroy_process_group()


def summarise(per_rank: list[dict], args) -> dict:
    summary = {"peer_copy_GBps": per_rank[0]["peer_copy_GBps"], "config": vars(args) | {"out": str(args.out)}}
    for dtype in ("bf16", "fp8_e4m3"):
        keys = per_rank[0][dtype].keys()
        summary[dtype] = {k: statistics.mean(r[dtype][k] for r in per_rank) for k in keys}
    summary["per_rank"] = per_rank
    return summary


def main() -> None:
    args = parse()
    if "RANK" in os.environ:
        rank_main(args)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": str(args.world), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, __file__, *sys.argv[1:]], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(args.world)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        for r, o in enumerate(outs):
            print(f"--- rank {r} ---\n{o[-3000:]}")
        sys.exit(1)
    line = next(l for l in outs[0].splitlines() if l.startswith("RESULTS "))
    print("\n".join(l for l in outs[0].splitlines() if not l.startswith("RESULTS ")))
    summary = summarise(json.loads(line[len("RESULTS "):]), args)
    print(f"{args.world} GPUs, {args.tokens} tokens/rank, hidden {args.hidden}, {args.experts} experts, "
          f"top-{args.topk}, {args.sms} SMs; peer copy {summary['peer_copy_GBps']:.0f} GB/s")
    print(f"{'dtype':9} {'phase':9} {'ep_jit GB/s':>12} {'ms':>8} {'a2a GB/s':>10} {'ms':>8} {'speed-up':>9}")
    for dtype in ("bf16", "fp8_e4m3"):
        d = summary[dtype]
        for phase in ("dispatch", "combine"):
            print(f"{dtype:9} {phase:9} {d[phase + '_GBps']:12.1f} {d[phase + '_ms']:8.3f} "
                  f"{d['baseline_' + phase + '_GBps']:10.1f} {d['baseline_' + phase + '_ms']:8.3f} "
                  f"{d['baseline_' + phase + '_ms'] / d[phase + '_ms']:8.2f}x")
        print(f"{dtype:9} {'dispatch (non-blocking)':9} {d['dispatch_nonblocking_GBps']:12.1f} "
              f"{d['dispatch_nonblocking_ms']:8.3f}")
        for phase in ("dispatch", "combine"):
            print(f"{dtype:9} {phase + ' (transport=collective)':9} {d['collective_' + phase + '_GBps']:12.1f} "
                  f"{d['collective_' + phase + '_ms']:8.3f} {'':10} {'':8} "
                  f"{d['baseline_' + phase + '_ms'] / d['collective_' + phase + '_ms']:8.2f}x")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
