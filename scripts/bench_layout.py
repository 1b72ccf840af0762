#!/usr/bin/env python3
"""Expert-layout dispatch and combine against the token layout plus a torch permute into the
same padded segments (and the reverse for combine), in the same run.

    python scripts/bench_layout.py [--tokens 4096 --hidden 7168 --experts 256 --topk 8 --pad 128 --sms 24]

One process, a group of one member on GPU 0 (the NVLink transport's kernels, every pull
local). Times are CUDA-event medians after warm-up with L2 flushed before each call
(bench_ep.time_ms); GB/s = rows of the result x row bytes / time. The permute baseline is
what a training framework writes without the fused layout: a stable sort of the (row, k)
pairs by expert, the padded offsets, and an indexed copy into a zeroed [M, H] tensor; its
combine side gathers the pairs' rows, weights them and index_adds them back to token rows
(fp32) before the token-layout combine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))
from bench_ep import time_ms  # noqa: E402

import ep_jit  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--pad", type=int, default=128)
    p.add_argument("--sms", type=int, default=24)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, help="write the JSON results here")
    p.add_argument("--commit", help="the commit measured (default: git rev-parse HEAD here)")
    return p.parse_args()


def permute_to_segments(recv_x: torch.Tensor, recv_idx: torch.Tensor, num_local: int, pad: int):
    """Token-layout rows -> the expert layout's padded segments, in torch."""
    rows, ks = (recv_idx >= 0).nonzero(as_tuple=True)
    experts = recv_idx[rows, ks]
    experts, order = torch.sort(experts, stable=True)
    rows = rows[order]
    counts = torch.bincount(experts, minlength=num_local)
    padded = (counts + pad - 1) // pad * pad
    starts = torch.cumsum(padded, 0) - padded
    firsts = torch.cumsum(counts, 0) - counts
    dest = starts[experts] + torch.arange(experts.numel(), device=experts.device) - firsts[experts]
    out = torch.zeros(int(padded.sum()), recv_x.shape[1], dtype=recv_x.dtype, device=recv_x.device)
    out[dest] = recv_x[rows]
    return out, dest, rows, ks


def unpermute_from_segments(y: torch.Tensor, dest, rows, ks, recv_w: torch.Tensor, num_rows: int):
    """The reverse: each token row's weighted sum of its pairs' rows (fp32), as bf16."""
    acc = torch.zeros(num_rows, y.shape[1], dtype=torch.float32, device=y.device)
    acc.index_add_(0, rows, y[dest].float() * recv_w[rows, ks].unsqueeze(1))
    return acc.bfloat16()


def main() -> None:
    args = parse()
    T, H, E, K, P = args.tokens, args.hidden, args.experts, args.topk, args.pad
    torch.cuda.set_device(0)
    info = ep_jit.GroupInfo(members=[0], rank=0)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    idx = torch.rand(T, E, device="cuda", generator=g).argsort(dim=1)[:, :K].contiguous()
    w = torch.rand(T, K, device="cuda", generator=g)
    with ep_jit.Buffer(info, H, E, K, T, num_sms=args.sms, device=0, all_gather=lambda o: [o], warm=True) as buf:
        ex = buf.dispatch(x, idx, w, layout="expert", pad_multiple=P)
        tok = buf.dispatch(x, idx, w)
        permuted, dest, rows, ks = permute_to_segments(tok.recv_x, tok.recv_topk_idx, E, P)
        assert torch.equal(permuted, ex.recv_x), "the permute baseline and the expert layout differ"
        y = ex.recv_x  # a stand-in expert output in the expert layout
        M, N = ex.recv_x.shape[0], tok.recv_x.shape[0]

        def token_dispatch_permute():
            r = buf.dispatch(x, idx, w)
            permute_to_segments(r.recv_x, r.recv_topk_idx, E, P)

        def token_unpermute_combine():
            buf.combine(unpermute_from_segments(y, dest, rows, ks, tok.recv_topk_weights, N), tok.handle)

        times = {
            "expert_dispatch": time_ms(lambda: buf.dispatch(x, idx, w, layout="expert", pad_multiple=P),
                                       args.iters, args.warmup),
            "token_dispatch": time_ms(lambda: buf.dispatch(x, idx, w), args.iters, args.warmup),
            "token_dispatch_permute": time_ms(token_dispatch_permute, args.iters, args.warmup),
            "expert_combine": time_ms(lambda: buf.combine(y, ex.handle), args.iters, args.warmup),
            "token_combine": time_ms(lambda: buf.combine(tok.recv_x, tok.handle), args.iters, args.warmup),
            "unpermute_token_combine": time_ms(token_unpermute_combine, args.iters, args.warmup),
        }
    row_bytes = H * 2
    result = {
        "date": datetime.date.today().isoformat(), "machine": f"{torch.cuda.get_device_name(0)}, {platform.node()}",
        "commit": args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                text=True, cwd=REPO).stdout.strip() or None,
        "command": "python " + " ".join(sys.argv), "members": 1,
        "shape": dict(tokens=T, hidden=H, experts=E, topk=K, pad_multiple=P, num_sms=args.sms),
        "rows": dict(expert_layout=M, token_layout=N),
        "ms": times,
        "GBps": {"expert_dispatch": M * row_bytes / times["expert_dispatch"] / 1e6,
                 "token_dispatch": N * row_bytes / times["token_dispatch"] / 1e6,
                 "expert_combine": M * row_bytes / times["expert_combine"] / 1e6,
                 "token_combine": N * row_bytes / times["token_combine"] / 1e6},
        "speedup": {"dispatch_vs_token_plus_permute": times["token_dispatch_permute"] / times["expert_dispatch"],
                    "combine_vs_unpermute_plus_token": times["unpermute_token_combine"] / times["expert_combine"]},
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
