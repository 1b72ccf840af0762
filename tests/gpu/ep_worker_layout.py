"""One rank of the expert-layout, autograd and lazy-compilation checks (run by
tests/gpu/test_ep_layout_gpu.py like tests/gpu/ep_worker.py, whose inputs and helpers it uses).

    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. EP_TEST_SEED=.. python tests/gpu/ep_worker_layout.py SUITE
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from ep_reference import expert_combine_reference, expert_layout_reference, expert_output  # noqa: E402
from ep_worker import (DEV, RANK, SEED, WORLD, bits, case_buffers, check_round, inputs, main, named,  # noqa: E402
                       pending_messages, poison, poison_outputs)

import ep_jit  # noqa: E402
import ep_jit.jit  # noqa: E402

LAYOUT_CASES = [((2048, 8, 1), "bf16"), ((2048, 8, 2), "bf16"), ((2048, 64, 8), "bf16"), ((2048, 64, 2), "fp8_e4m3")]
LAYOUT_KINDS = ["random", "skewed", "empty", "masked", "zero_on_one"]
PADS = [1, 16, 128, 64]


def check_expert_round(buf, data, E, H, dtype, pad, capacity=None, out=None) -> tuple:
    """As check_round, in the expert layout."""
    x, idx, w, sc = data[RANK]
    g = [t.to(DEV) if t is not None else None for t in (x, idx, w, sc)]
    poison()
    if out is not None:
        poison_outputs(*out)
    res = buf.dispatch(*g, capacity=capacity, layout="expert", pad_multiple=pad, out=out and out[0])
    y = expert_output(res.recv_x, res.recv_scales, RANK)
    out_tensor = buf.combine(y, res.handle, out=out and out[1])
    if out is not None:
        assert res is out[0] and out_tensor is out[1], "out= did not return its arguments"
    out = out_tensor
    torch.cuda.current_stream().synchronize()
    fp8 = dtype == "fp8_e4m3"
    refs = [expert_layout_reference([d[0] for d in data], [d[1] for d in data], [d[2] for d in data],
                                    [d[3] for d in data] if fp8 else None, r, WORLD, E, pad) for r in range(WORLD)]
    ref = refs[RANK]
    M = ref["offsets"][-1]
    assert res.recv_topk_idx is None and res.recv_topk_weights is None
    assert res.expert_offsets.cpu().tolist() == ref["offsets"], "expert_offsets differ"
    assert res.tokens_per_expert.cpu().tolist() == ref["counts"], "tokens_per_expert differs"
    rows = res.recv_x.shape[0]
    assert rows == (M if capacity is None else capacity), f"recv_x has {rows} rows"
    if capacity is None:
        assert res.handle.expert_offsets_list == ref["offsets"] and res.handle.tokens_per_expert_list == ref["counts"]
    assert torch.equal(bits(res.recv_x[:M].cpu()), bits(ref["x"])), "recv_x differs (rows, order or padding)"
    assert torch.equal(res.recv_weights[:M].cpu(), ref["weights"]), "recv_weights differ"
    if fp8:
        assert torch.equal(res.recv_scales[:M].cpu(), ref["scales"]), "recv_scales differ"
    if rows > M:  # past the last segment: zero rows, weight 0
        assert not bool(res.recv_x[M:].view(torch.uint8).any()) and not bool(res.recv_weights[M:].any()), "tail"
    ys = [expert_output(refs[r]["x"], refs[r]["scales"], r) for r in range(WORLD)]
    want, mag = expert_combine_reference(x.shape[0], H, refs, ys, RANK, w)
    got = out.float().cpu()
    assert out.shape == (x.shape[0], H) and out.dtype == torch.bfloat16
    bad = ((got - want).abs() > mag * 2.0 ** -7 + 1e-6) | got.isnan()
    assert not bool(bad.any()), f"combine differs at {int(bad.sum())} elements, max err {(got - want).abs().max()}"
    return res, out


def suite_expert() -> int:
    """The expert layout, bitwise against the CPU reference, in both modes and several P."""
    n = 0
    for H, E, K, dtype, buf in case_buffers(LAYOUT_CASES, 128):
        for i, kind in enumerate(LAYOUT_KINDS):
            data = inputs(kind, E, K, H, dtype, 128, SEED + 1000 * n + i)
            pad = PADS[(n + i) % len(PADS)]
            for capacity in (None, WORLD * 128 * K + pad * E):
                with named(f"H={H} E={E} K={K} {dtype} {kind} P={pad} capacity={capacity}"):
                    check_expert_round(buf, data, E, H, dtype, pad, capacity)
                n += 1
    H, E, K = 2048, 8, 2  # a capacity too small is reported, as in the token layout
    with ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=64, num_sms=8) as buf:
        data = inputs("full", E, K, H, "bf16", 64, SEED + 7)
        g = [t.to(DEV) for t in data[RANK][:3]]
        buf.dispatch(*g, capacity=3, layout="expert", pad_multiple=16)
        torch.cuda.synchronize()
        try:
            buf.raise_pending()
        except ValueError as e:
            assert "capacity: expected at least" in str(e), e
        else:
            raise AssertionError("a too-small capacity was not reported")
        n += 1
    return n


def suite_expert_drop() -> int:
    """Capacities that cut the expert layout short: the pairs past the capacity add nothing
    to combine's output, the receiver is told how many rows it needed, and every source that
    lost pairs is told how many; the next default-mode round is exact."""
    H, E, K, T = 2048, 4 * WORLD, 2, 64
    n = 0
    with ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=T, num_sms=8) as buf:
        for i, (capacity, pad) in enumerate([(5, 1), (0, 16), (37, 16), (100, 1), (4 * T * K, 16)]):
            data = inputs("full" if i % 2 == 0 else "random", E, K, H, "bf16", T, SEED + 41 * i)
            x, idx, w, _ = data[RANK]
            poison()
            res = buf.dispatch(x.to(DEV), idx.to(DEV), w.to(DEV), capacity=capacity, layout="expert", pad_multiple=pad)
            out = buf.combine(expert_output(res.recv_x, None, RANK), res.handle)
            torch.cuda.synchronize()
            refs = [expert_layout_reference([d[0] for d in data], [d[1] for d in data], [d[2] for d in data], None,
                                            r, WORLD, E, pad) for r in range(WORLD)]
            kept = [dict(origin={p: row for p, row in ref["origin"].items() if row < capacity}) for ref in refs]
            ys = [expert_output(ref["x"], None, r) for r, ref in enumerate(refs)]
            want, mag = expert_combine_reference(x.shape[0], H, kept, ys, RANK, w)
            got = out.float().cpu()
            bad = ((got - want).abs() > mag * 2.0 ** -7 + 1e-6) | got.isnan()
            assert not bool(bad.any()), f"capacity {capacity}: combine differs from the kept pairs at {int(bad.sum())}"
            needed = refs[RANK]["offsets"][-1]
            lost = sum(row >= capacity for ref in refs for (s, _, _), row in ref["origin"].items() if s == RANK)
            want_msgs = [f"capacity: expected at least {needed} rows"] if needed > capacity else []
            if lost:
                want_msgs.append(f"{lost} rows (token layout) or pairs (expert layout) of this rank's tokens were "
                                 "dropped there")
            messages = pending_messages(buf)
            assert len(messages) == len(want_msgs) and all(m in got_m for m, got_m in zip(want_msgs, messages)), \
                f"capacity {capacity}: raise_pending said {messages}, expected {want_msgs}"
            check_expert_round(buf, data, E, H, "bf16", pad)
            n += 3
    return n


PATH_CASES = [((7168, 256, 8), "bf16"), ((2048, 64, 2), "fp8_e4m3"), ((2048, 8, 1), "bf16")]


def shuffled(data: list, seed: int) -> list:
    """Every rank's inputs with their tokens' rows and their routing permuted apart: new
    contents, the same shapes (the same generator on every rank, so every rank agrees)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for x, idx, w, sc in data:
        rows, route = torch.randperm(x.shape[0], generator=g), torch.randperm(x.shape[0], generator=g)
        out.append((x[rows], idx[route].contiguous(), w[route].contiguous(), None if sc is None else sc[rows]))
    return out


def suite_paths() -> int:
    """Non-blocking dispatches down both kernel paths whatever T, forced with
    EP_JIT_FUSED_DISPATCH_TOKENS: send and pull in one launch (the small-batch path) and in
    two; both layouts, against the CPU references; for some routings a second round with
    new contents writes the first round's outputs again (out=), poisoned first. From one
    token per rank (rows cut into slices for the warps) to 256 (a warp per row or more)."""
    n = 0
    for limit in (0, 1 << 30):
        os.environ["EP_JIT_FUSED_DISPATCH_TOKENS"] = str(limit)
        for H, E, K, dtype, buf in case_buffers(PATH_CASES, 256):
            for i, kind in enumerate(["random", "skewed", "empty", "zero_on_one", "full", "single"]):
                data = inputs(kind, E, K, H, dtype, 256, SEED + 1000 * n + i)
                pad = PADS[(n + i) % len(PADS)]
                path = "one launch" if limit else "two launches"
                again = kind in ("random", "zero_on_one", "full", "single")
                with named(f"{path}: H={H} E={E} K={K} {dtype} {kind}, token layout"):
                    first = check_round(buf, data, E, H, dtype, capacity=WORLD * 256)
                    if again:
                        check_round(buf, shuffled(data, SEED + n), E, H, dtype, capacity=WORLD * 256, out=first)
                with named(f"{path}: H={H} E={E} K={K} {dtype} {kind}, expert layout P={pad}"):
                    capacity = WORLD * 256 * K + pad * E
                    first = check_expert_round(buf, data, E, H, dtype, pad, capacity)
                    if again:
                        check_expert_round(buf, shuffled(data, SEED + n + 1), E, H, dtype, pad, capacity, out=first)
                n += 2
            fused = "dispatch" in buf._transport._resident  # checked at the first fused launch
            assert fused == bool(limit), f"EP_JIT_FUSED_DISPATCH_TOKENS={limit}: one-launch path taken: {fused}"
    os.environ.pop("EP_JIT_FUSED_DISPATCH_TOKENS")
    return n


# ---- training -------------------------------------------------------------------------

def moe_inputs(H: int, E: int, K: int, T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    Ts = [T if s % 2 == 0 else T // 2 for s in range(WORLD)]
    xs = [(torch.randn(t, H, generator=g)).bfloat16() for t in Ts]
    idxs = [torch.rand(t, E, generator=g).argsort(dim=1)[:, :K] for t in Ts]
    ws = [torch.rand(t, K, generator=g) for t in Ts]
    W = torch.randn(E, H, H, generator=g) / H ** 0.5
    grads = [torch.randn(t, H, generator=g) for t in Ts]
    return xs, idxs, ws, W, grads


def dense_reference(xs, idxs, ws, W, grads):
    """The MoE layer in fp32 on one process: every rank's output and gradients."""
    xs = [x.float().requires_grad_() for x in xs]
    ws = [w.clone().requires_grad_() for w in ws]
    W = W.clone().requires_grad_()
    outs, loss = [], 0
    for x, idx, w, g in zip(xs, idxs, ws, grads):
        out = torch.einsum("tk,tkh->th", w, torch.einsum("th,tkhj->tkj", x, W[idx]))
        outs.append(out)
        loss = loss + (out * g).sum()
    loss.backward()
    return outs, [x.grad for x in xs], [w.grad for w in ws], W.grad


def moe_forward(buf, x, idx, w, W_local, layout: str, pad: int, capacity=None, scales=None):
    """The layer through ep_jit: dispatch, the experts (a grouped matmul over the padded
    segments, or per-expert rows in the token layout), combine. fp8: x with its scales."""
    local = W_local.shape[0]

    def rows(res):  # the received rows as the experts see them
        xf = res.recv_x.float()
        return xf if res.recv_scales is None else xf * res.recv_scales.repeat_interleave(128, dim=1)

    if layout == "expert":
        res = buf.dispatch(x, idx, w, scales, capacity=capacity, layout="expert", pad_multiple=pad)
        off = res.handle.expert_offsets_list or res.expert_offsets.tolist()  # non-blocking: on the device
        xf = rows(res)
        # rows past the last segment (up to the capacity) are zero: any expert gives zero there
        y = torch.cat([xf[off[e]:off[e + 1]] @ W_local[e] for e in range(local)] + [xf[off[-1]:] @ W_local[0]])
        return buf.combine(y.bfloat16(), res.handle)
    res = buf.dispatch(x, idx, w, scales, capacity=capacity)
    xf = rows(res)
    y = 0
    for e in range(local):  # token layout: each row carries its local experts' weights
        y = y + res.recv_topk_weights.mul(res.recv_topk_idx == e).sum(1, keepdim=True) * (xf @ W_local[e])
    return buf.combine(torch.as_tensor(y).bfloat16(), res.handle)


def quantized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp8 rows and their per-128 scales, and what they stand for (the fp32 reference's x)."""
    blocks = x.float().view(x.shape[0], -1, 128)
    scales = blocks.abs().amax(-1).clamp(min=1e-4) / 448.0
    x8 = (blocks / scales[..., None]).to(torch.float8_e4m3fn).view(x.shape[0], -1)
    return x8, scales, x8.float().view(x.shape[0], -1, 128).mul(scales[..., None]).view(x.shape[0], -1)


def close(name: str, got: torch.Tensor, want: torch.Tensor, rel: float = 2e-2) -> None:
    err = (got.float().cpu() - want.float()).abs().max().item()
    scale = want.abs().max().item() + 1e-6
    assert err <= rel * scale, f"{name}: max error {err:.3g} over a scale of {scale:.3g}"


def suite_train() -> int:
    """Forward and backward of a small MoE layer through ep_jit, in each layout and mode,
    against the dense fp32 reference (output, x.grad, topk_weights.grad, each rank's
    expert-weight grads); with fp8 x, the weights' gradients alone."""
    H, E, K, T = 256, 8, 2, 96
    n = 0
    local = E // WORLD
    with ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=T, num_sms=max(8, WORLD + 1)) as buf:
        for layout, pad, capacity in (("expert", 16, None), ("token", None, None), ("expert", 1, None),
                                      ("expert", 16, WORLD * T * K + 16 * E), ("token", None, WORLD * T)):
            xs, idxs, ws, W, grads = moe_inputs(H, E, K, T, SEED + n)
            ref_out, ref_gx, ref_gw, ref_gW = dense_reference(xs, idxs, ws, W, grads)
            x = xs[RANK].to(DEV).requires_grad_()
            w = ws[RANK].to(DEV).requires_grad_()
            W_local = W[RANK * local:(RANK + 1) * local].to(DEV).requires_grad_()
            out = moe_forward(buf, x, idxs[RANK].to(DEV), w, W_local, layout, pad, capacity)
            (out.float() * grads[RANK].to(DEV)).sum().backward()
            with named(f"layout={layout} P={pad} capacity={capacity}"):
                close("output", out, ref_out[RANK])
                close("x.grad", x.grad, ref_gx[RANK])
                close("topk_weights.grad", w.grad, ref_gw[RANK])
                close("expert weight grads", W_local.grad, ref_gW[RANK * local:(RANK + 1) * local])
            n += 1
    with ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=T, dtype="fp8_e4m3",
                       num_sms=max(8, WORLD + 1)) as buf:
        for layout, pad in (("expert", 16), ("token", None)):
            xs, idxs, ws, W, grads = moe_inputs(H, E, K, T, SEED + n)
            q = [quantized(x) for x in xs]
            ref_out, _, ref_gw, ref_gW = dense_reference([d for _, _, d in q], idxs, ws, W, grads)
            x8, scales, _ = q[RANK]
            w = ws[RANK].to(DEV).requires_grad_()
            W_local = W[RANK * local:(RANK + 1) * local].to(DEV).requires_grad_()
            out = moe_forward(buf, x8.to(DEV), idxs[RANK].to(DEV), w, W_local, layout, pad, scales=scales.to(DEV))
            (out.float() * grads[RANK].to(DEV)).sum().backward()
            with named(f"fp8 x, layout={layout} P={pad}: the weights' gradients"):
                close("output", out, ref_out[RANK])
                close("topk_weights.grad", w.grad, ref_gw[RANK])
                close("expert weight grads", W_local.grad, ref_gW[RANK * local:(RANK + 1) * local])
            n += 1
    return n


def suite_gradcheck() -> int:
    """Directional finite differences of a loss through dispatch and combine (tiny shape):
    the layer is linear in x and in the weights, so central differences are exact up to
    rounding."""
    H, E, K, T = 256, 4, 2, 8
    n = 0
    with ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=T, num_sms=max(8, WORLD + 1)) as buf:
        for layout, pad in (("expert", 4), ("token", None)):
            xs, idxs, ws, W, grads = moe_inputs(H, E, K, T, SEED + 100 + n)
            local = E // WORLD
            W_local = W[RANK * local:(RANK + 1) * local].to(DEV)
            idx, G = idxs[RANK].to(DEV), grads[RANK].to(DEV)
            gen = torch.Generator().manual_seed(SEED + 200 + n)  # the same direction on every rank

            def loss(x, w):
                return float((moe_forward(buf, x, idx, w, W_local, layout, pad).float() * G).sum())

            dirs = [(torch.randn(xs[s].shape, generator=gen), torch.randn(ws[s].shape, generator=gen))
                    for s in range(WORLD)]
            dx, dw = dirs[RANK][0].to(DEV), dirs[RANK][1].to(DEV)
            x, w = xs[RANK].to(DEV).float(), ws[RANK].to(DEV)
            xg, wg = x.bfloat16().requires_grad_(), w.clone().requires_grad_()
            (moe_forward(buf, xg, idx, wg, W_local, layout, pad).float() * G).sum().backward()
            eps = 0.25
            for name, plus, minus, grad, d in (
                    ("x", (x + eps * dx, w), (x - eps * dx, w), xg.grad.float(), dx),
                    ("topk_weights", (x, w + eps * dw), (x, w - eps * dw), wg.grad, dw)):
                # every rank moves along its own direction at once: the loss sums over ranks
                numeric = (loss(plus[0].bfloat16(), plus[1]) - loss(minus[0].bfloat16(), minus[1])) / (2 * eps)
                pairs = [None] * WORLD
                dist.all_gather_object(pairs, (float((grad * d).sum()), numeric, float((grad * d).abs().sum())))
                analytic, numeric = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
                # relative to the sum of the terms' sizes: the bf16 forward's rounding does not
                # shrink when the terms cancel
                scale = sum(p[2] for p in pairs)
                assert abs(analytic - numeric) <= 1e-2 * scale + 1e-3, \
                    f"{layout} {name}: autograd {analytic:.5g}, finite differences {numeric:.5g}, terms {scale:.5g}"
                n += 1
    return n


def suite_lazy() -> int:
    """Buffer() fetches no kernel; the first dispatch and combine fetch theirs. Records the
    first-call cost with a cold cache, with a disk hit and with a memory hit."""
    H, E, K = 7168, 256, 8
    cache = tempfile.mkdtemp(prefix=f"ep-jit-lazy-{RANK}-")
    os.environ["EP_JIT_CACHE_DIR"] = cache
    data = inputs("random", E, K, H, "bf16", 128, SEED + 9)
    g = [t.to(DEV) for t in data[RANK][:3]]
    figures = {}
    for situation in ("cold", "disk", "memory"):
        if situation == "disk":
            ep_jit.jit.clear_memory_cache()
        dist.barrier()
        start = time.perf_counter()
        buf = ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=128, num_sms=24)
        built = time.perf_counter() - start
        assert buf.first_fetch_s == {}, f"Buffer() fetched {buf.first_fetch_s}"
        start = time.perf_counter()
        res = buf.dispatch(*g, layout="expert", pad_multiple=128)
        torch.cuda.synchronize()
        first_dispatch = time.perf_counter() - start
        assert set(buf.first_fetch_s) == {"dispatch"}, buf.first_fetch_s
        start = time.perf_counter()
        buf.combine(expert_output(res.recv_x, None, RANK), res.handle)
        torch.cuda.synchronize()
        first_combine = time.perf_counter() - start
        start = time.perf_counter()
        res = buf.dispatch(*g)
        buf.combine(expert_output(res.recv_x, None, RANK), res.handle)
        torch.cuda.synchronize()
        later = time.perf_counter() - start
        figures[situation] = dict(buffer_s=built, first_dispatch_s=first_dispatch, first_combine_s=first_combine,
                                  next_round_s=later, fetch_s=buf.first_fetch_s)
        buf.close()
    with ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=128, num_sms=24, warm=True) as buf:
        assert set(buf.first_fetch_s) == {"dispatch", "combine"}, buf.first_fetch_s
    print("LAZY " + json.dumps({"rank": RANK, "world": WORLD, "shape": [H, E, K], **figures}), flush=True)
    return 3


if __name__ == "__main__":
    main(globals())
