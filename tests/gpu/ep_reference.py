"""Plain CPU reference for intra-node EP dispatch/combine (DESIGN.md "EP semantics")."""

from __future__ import annotations

import torch


def dispatch_reference(xs, idxs, weights, scales, rank: int, num_ranks: int, num_experts: int):
    """xs/idxs/weights/scales: per-source-rank CPU tensors. Returns what `rank` receives."""
    local = num_experts // num_ranks
    lo, hi = rank * local, (rank + 1) * local
    rows, r_idx, r_w, r_s, origin = [], [], [], [], []
    per_expert = [0] * local
    for s in range(num_ranks):
        for t in range(xs[s].shape[0]):
            ids = [int(e) for e in idxs[s][t]]
            if not any(lo <= e < hi for e in ids):
                continue
            rows.append(xs[s][t])
            local_ids = [e - lo if lo <= e < hi else -1 for e in ids]
            r_idx.append(local_ids)
            r_w.append([float(w) if l >= 0 else 0.0 for w, l in zip(weights[s][t], local_ids)])
            if scales is not None:
                r_s.append(scales[s][t])
            origin.append((s, t))
            for l in local_ids:
                if l >= 0:
                    per_expert[l] += 1
    H, K = xs[0].shape[1], idxs[0].shape[1]
    return {
        "x": torch.stack(rows) if rows else torch.empty(0, H, dtype=xs[0].dtype),
        "idx": torch.tensor(r_idx, dtype=torch.int64).reshape(-1, K),
        "weights": torch.tensor(r_w, dtype=torch.float32).reshape(-1, K),
        "scales": (torch.stack(r_s) if r_s else torch.empty(0, H // 128)) if scales is not None else None,
        "tokens_per_expert": per_expert,
        "origin": origin,
    }


def expert_output(recv_x: torch.Tensor, recv_scales, rank: int) -> torch.Tensor:
    """A stand-in expert: a rank-dependent function of the received rows, in bf16."""
    x = recv_x.float()
    if recv_scales is not None:
        x = x * recv_scales.float().repeat_interleave(128, dim=1)
    return (x * (rank + 1) + 0.125 * rank).to(torch.bfloat16)


def combine_reference(num_tokens: int, hidden: int, received: list[dict], ys: list[torch.Tensor], source: int):
    """out[t] = sum over ranks r that received (source, t) of y_r at that row, in fp32."""
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    for r, (rec, y) in enumerate(zip(received, ys)):
        for j, (s, t) in enumerate(rec["origin"]):
            if s == source:
                out[t] += y[j].float()
    return out


def expert_layout_reference(xs, idxs, weights, scales, rank: int, num_ranks: int, num_experts: int, pad: int):
    """What `rank` receives with layout="expert", pad_multiple=pad: one row per (source token,
    local expert) pair, grouped by local expert, ordered by (source rank, token, k) within a
    segment, segments starting at multiples of `pad`; every other row zero (weight 0)."""
    local = num_experts // num_ranks
    H = xs[0].shape[1]
    pairs = []  # per local expert: [(s, t, k)] in order
    for e in range(local):
        found = []
        for s in range(num_ranks):
            hits = (idxs[s] == rank * local + e).nonzero().tolist()  # row-major: (t, k) order
            found += [(s, t, k) for t, k in hits]
        pairs.append(found)
    offsets = [0]
    for found in pairs:
        offsets.append(-(-(offsets[-1] + len(found)) // pad) * pad)
    M = offsets[-1]
    x = torch.zeros(M, H, dtype=xs[0].dtype)
    w = torch.zeros(M, dtype=torch.float32)
    sc = torch.zeros(M, H // 128, dtype=torch.float32) if scales is not None else None
    origin = {}  # (s, t, k) -> row
    for e, found in enumerate(pairs):
        for i, (s, t, k) in enumerate(found):
            row = offsets[e] + i
            x[row], w[row], origin[(s, t, k)] = xs[s][t], weights[s][t][k], row
            if sc is not None:
                sc[row] = scales[s][t]
    return {"x": x, "weights": w, "scales": sc, "offsets": offsets, "counts": [len(f) for f in pairs],
            "origin": origin}


def expert_combine_reference(num_tokens: int, hidden: int, received: list[dict], ys: list[torch.Tensor],
                             source: int, weights: torch.Tensor):
    """out[t] = sum_k w[t, k] * y[row(t, k)] in fp32, and sum_k |w[t, k] * y[row(t, k)]| (for tolerances)."""
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    mag = torch.zeros(num_tokens, hidden, dtype=torch.float32)
    for rec, y in zip(received, ys):
        for (s, t, k), row in rec["origin"].items():
            if s == source:
                term = float(weights[t, k]) * y[row].float()
                out[t] += term
                mag[t] += term.abs()
    return out, mag
