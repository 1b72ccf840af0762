"""One rank of the multi-GPU EP checks (run by tests/gpu/test_ep_gpu.py, one process per
GPU; rank r on GPU r % count, so ranks share GPUs where there are more ranks than GPUs).

    RANK=.. WORLD_SIZE=.. MASTER_ADDR=.. MASTER_PORT=.. EP_TEST_SEED=.. python tests/gpu/ep_worker.py SUITE

Every rank draws every rank's inputs from the shared seed, so each can build the CPU
reference of what it must receive without communication. Prints "OK <suite> <n checks>".
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import time
from typing import Iterator

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from ep_reference import combine_reference, dispatch_reference, expert_output  # noqa: E402

import ep_jit  # noqa: E402
import ep_jit.symmetric  # noqa: E402
from ep_jit.errors import EPJitError, PeerTimeout  # noqa: E402

RANK, WORLD = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
SEED = int(os.environ.get("EP_TEST_SEED", "1234"))
DEV = torch.device("cuda", RANK % torch.cuda.device_count())
FP8 = torch.float8_e4m3fn


def inputs(kind: str, E: int, K: int, H: int, dtype: str, max_t: int, seed: int):
    """All ranks' (x, idx, weights, scales) on the CPU, for one routing kind."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in range(WORLD):
        T = int(torch.randint(1, max_t + 1, (1,), generator=g))
        if kind == "zero_on_one" and s == 1 % WORLD:
            T = 0
        if kind == "full":
            T = max_t
        if kind == "single":  # one token per rank: the rows are cut into slices for the warps
            T = 1
        xf = torch.randn(T, H, generator=g) * 3
        idx = torch.rand(T, E, generator=g).argsort(dim=1)[:, :K].to(torch.int64)
        if kind == "skewed":  # most tokens go to the same few experts, on one rank
            hot = torch.rand(T, generator=g) < 0.9
            idx[hot] = torch.arange(K, dtype=torch.int64)
        if kind == "empty":
            idx[:] = -1
        if kind in ("masked", "zero_on_one"):
            idx[torch.rand(T, K, generator=g) < 0.3] = -1
        w = torch.rand(T, K, generator=g)
        if dtype == "fp8_e4m3":
            blocks = xf.view(T, H // 128, 128)
            scale = (blocks.abs().amax(dim=2) / 448.0).clamp(min=1e-4)
            x = (blocks / scale.unsqueeze(2)).view(T, H).to(FP8)
            out.append((x, idx, w, scale.float()))
        else:
            out.append((xf.to(torch.bfloat16), idx, w, None))
    return out


@contextlib.contextmanager
def named(case: str) -> Iterator[None]:
    """Print which case failed at once: leaving a Buffer's `with` waits for the peers, which
    may be elsewhere."""
    try:
        yield
    except AssertionError as e:
        print(f"FAILED {case}: {e}", flush=True)
        raise


def poison():
    """Fill freed allocator blocks with NaN bytes so unwritten outputs cannot pass."""
    junk = torch.empty(64 << 20, dtype=torch.uint8, device=DEV)
    junk.fill_(0xFF)
    del junk


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int16) if t.element_size() == 2 else t


def poison_outputs(res, out) -> None:
    """Poison every tensor a dispatch and combine into `out=` must write again."""
    for t in (*res, res.handle.arrays.storage, out):  # the handle's arrays too: the kernels rewrite them
        if isinstance(t, torch.Tensor):
            t.view(torch.uint8).fill_(0xFF)


def check_round(buf, data, E, H, dtype, stream=None, capacity=None, out=None) -> tuple:
    """One dispatch and combine against the references; `out`: (result, combine output) of
    an earlier round to write again (out=). Returns this round's (result, combine output)."""
    x, idx, w, sc = data[RANK]
    g = [t.to(DEV) if t is not None else None for t in (x, idx, w, sc)]
    poison()
    if out is not None:
        poison_outputs(*out)
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream())
    ctx = torch.cuda.stream(stream) if stream is not None else torch.cuda.stream(torch.cuda.current_stream())
    with ctx:
        res = buf.dispatch(*g, stream=stream, capacity=capacity, out=out and out[0])
        y_dev = expert_output(res.recv_x, res.recv_scales, RANK)
        out_tensor = buf.combine(y_dev, res.handle, stream=stream, out=out and out[1])
        if out is not None:
            assert res is out[0] and out_tensor is out[1], "out= did not return its arguments"
        out = out_tensor
    (stream or torch.cuda.current_stream()).synchronize()
    refs = [dispatch_reference([d[0] for d in data], [d[1] for d in data], [d[2] for d in data],
                               [d[3] for d in data] if dtype == "fp8_e4m3" else None, r, WORLD, E)
            for r in range(WORLD)]
    ref = refs[RANK]
    n = ref["x"].shape[0]
    got_n = int(res.handle.recv_offsets[WORLD].item())
    assert got_n == n, f"received {got_n} rows, expected {n}"
    rows = slice(0, n)
    assert torch.equal(bits(res.recv_x[rows].cpu()), bits(ref["x"])), "recv_x differs"
    assert torch.equal(res.recv_topk_idx[rows].cpu(), ref["idx"]), "recv_topk_idx differs"
    assert torch.equal(res.recv_topk_weights[rows].cpu(), ref["weights"]), "recv_topk_weights differs"
    if dtype == "fp8_e4m3":
        assert torch.equal(res.recv_scales[rows].cpu(), ref["scales"]), "recv_scales differ"
    assert res.tokens_per_expert.cpu().tolist() == ref["tokens_per_expert"], "tokens_per_expert differs"
    if capacity is None:
        assert res.handle.tokens_per_expert_list == ref["tokens_per_expert"]
        assert res.recv_x.shape[0] == n
    else:
        assert res.recv_x.shape[0] == capacity
        assert bool((res.recv_topk_idx[n:] == -1).all()) and bool((res.recv_topk_weights[n:] == 0).all())
        assert not bool(res.recv_x[n:].view(torch.uint8).any()), "recv_x rows past the count are not zero"
        if dtype == "fp8_e4m3":
            assert not bool(res.recv_scales[n:].any()), "recv_scales rows past the count are not zero"
    ys = [expert_output(refs[r]["x"], refs[r]["scales"], r) for r in range(WORLD)]
    want = combine_reference(x.shape[0], H, refs, ys, RANK)
    got = out.float().cpu()
    assert out.shape == (x.shape[0], H) and out.dtype == torch.bfloat16
    tol = want.abs() * 2.0 ** -7 + 1e-30
    bad = ((got - want).abs() > tol) | got.isnan()
    assert not bool(bad.any()), f"combine differs at {int(bad.sum())} elements, max err {(got - want).abs().max()}"
    return res, out


SHAPES = [(2048, 8, 1), (2048, 8, 2), (2048, 64, 8), (7168, 64, 2), (7168, 256, 8), (2048, 256, 8)]
CASES = [*[(s, "bf16") for s in SHAPES], ((7168, 256, 8), "fp8_e4m3"), ((2048, 64, 2), "fp8_e4m3")]
KINDS = ["random", "skewed", "empty", "masked", "zero_on_one", "full", "single"]


def case_buffers(cases: list, max_tokens: int) -> Iterator[tuple]:
    """(H, E, K, dtype, Buffer) for each case whose experts divide among the ranks."""
    for (H, E, K), dtype in cases:
        if E % WORLD:
            continue
        with ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=max_tokens, dtype=dtype,
                           num_sms=max(8, WORLD + 1)) as buf:
            yield H, E, K, dtype, buf


def suite_full(kinds: list[str] = KINDS) -> int:
    n = 0
    side = torch.cuda.Stream(DEV)
    for H, E, K, dtype, buf in case_buffers(CASES, 256):
        for i, kind in enumerate(kinds):
            data = inputs(kind, E, K, H, dtype, 256, SEED + 1000 * n + i)
            for mode in ("default", "side stream", "non-blocking"):  # the failing case names itself
                with named(f"H={H} E={E} K={K} {dtype} {kind} routing, {mode}"):
                    check_round(buf, data, E, H, dtype, stream=side if mode == "side stream" else None,
                                capacity=WORLD * 256 if mode == "non-blocking" else None)
                n += 1
    return n


def suite_sharing() -> int:
    """`full` with two routings: where ranks share a GPU their kernels time-slice (~1 s a round)."""
    return suite_full(["skewed", "zero_on_one"])


def same_bits(a, b, data) -> None:
    """Two Buffers (the two transports) give the same bits for the same dispatch and combine."""
    g = [t.to(DEV) if t is not None else None for t in data[RANK]]
    ra, rb = a.dispatch(*g), b.dispatch(*g)
    for name in ("recv_x", "recv_topk_idx", "recv_topk_weights", "recv_scales", "tokens_per_expert"):
        ta, tb = getattr(ra, name), getattr(rb, name)
        assert (ta is None) == (tb is None) and (ta is None or torch.equal(bits(ta), bits(tb))), f"{name} differs"
    y = expert_output(ra.recv_x, ra.recv_scales, RANK)
    assert torch.equal(bits(a.combine(y, ra.handle)), bits(b.combine(y, rb.handle))), "combine differs"


def suite_collective() -> int:
    """transport='collective' (NCCL all_to_all): the reference checks, the same bits as the
    NVLink transport, its errors, and rounds back to back."""
    n = 0
    side = torch.cuda.Stream(DEV)
    for (H, E, K), dtype in CASES:
        if E % WORLD:
            continue
        args = (dist.group.WORLD, H, E, K, 256, dtype, 8)
        with ep_jit.Buffer(*args, transport="collective") as coll, ep_jit.Buffer(*args) as nvlink:
            for i, kind in enumerate(KINDS):
                data = inputs(kind, E, K, H, dtype, 256, SEED + 1000 * n + i)
                check_round(coll, data, E, H, dtype)
                check_round(coll, data, E, H, dtype, stream=side)
                same_bits(coll, nvlink, data)
                n += 3
    H, E, K = 2048, 64, 2
    with ep_jit.Buffer(dist.group.WORLD, H, E, K, 64, num_sms=4, transport="collective") as buf:
        x = torch.randn(32, H, device=DEV).bfloat16()
        idx = torch.randint(0, E, (32, K), device=DEV)
        w = torch.rand(32, K, device=DEV)
        bad, culprit = idx.clone(), 1 % WORLD
        if RANK == culprit:
            bad[5, 1] = -3
        n += expect(ValueError, f"rank {culprit} passed an id outside that range at [5, 1]",
                    lambda: buf.dispatch(x, bad, w))
        n += expect(ValueError, "capacity: expected None with transport='collective'",
                    lambda: buf.dispatch(x, idx, w, capacity=64))
        try:
            import cupy
            n += expect(TypeError, "x: expected torch tensors, the framework of the group",
                        lambda: buf.dispatch(cupy.asarray(x.view(torch.int16)).view(_cupy_bf16()),
                                             cupy.asarray(idx), cupy.asarray(w)))
        except ImportError:
            pass
        data = inputs("random", E, K, H, "bf16", 64, SEED + 5)
        g = [t.to(DEV) if t is not None else None for t in data[RANK]]
        first = None
        for i in range(300):  # back to back, still exact afterwards
            res = buf.dispatch(*g[:3])
            out = buf.combine(expert_output(res.recv_x, None, RANK), res.handle)
            first = out.clone() if first is None else first
        assert torch.equal(bits(out), bits(first)), "rounds drifted"
        check_round(buf, data, E, H, "bf16")
        n += 300
    return n


def suite_rounds() -> int:
    H, E, K = 7168, 256, 8
    with ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=128, num_sms=24) as buf:
        data = inputs("random", E, K, H, "bf16", 128, SEED)
        g = [t.to(DEV) if t is not None else None for t in data[RANK]]
        first = None
        for i in range(1000):
            res = buf.dispatch(*g)
            out = buf.combine(expert_output(res.recv_x, None, RANK), res.handle)
            if i % 250 == 0 or i == 999:
                if first is None:
                    first = out.clone()
                assert torch.equal(bits(out), bits(first)), f"round {i} drifted"
        # a decode loop: non-blocking, into the same outputs (the one-pass checks), 1000 times
        res = buf.dispatch(*g, capacity=WORLD * 128)
        out = buf.combine(expert_output(res.recv_x, None, RANK), res.handle)
        for i in range(1000):
            assert buf.dispatch(*g, capacity=WORLD * 128, out=res) is res
            assert buf.combine(expert_output(res.recv_x, None, RANK), res.handle, out=out) is out
            if i % 250 == 0 or i == 999:
                assert torch.equal(bits(out), bits(first)), f"round {i} into out= differs from default mode"
        check_round(buf, data, E, H, "bf16")
    return 2000


def suite_graph() -> int:
    """Non-blocking dispatch + expert + combine captured once in a CUDA graph, replayed on
    fresh inputs copied into the captured tensors; every replay checked."""
    H, E, K, T = 2048, 64, 8, 128
    with ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=T, num_sms=8) as buf:
        first = inputs("full", E, K, H, "bf16", T, SEED)[RANK]
        x, idx, w = (t.to(DEV) for t in first[:3])
        side = torch.cuda.Stream(DEV)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up outside the capture, as torch asks
            res = buf.dispatch(x, idx, w, capacity=WORLD * T)
            buf.combine(expert_output(res.recv_x, None, RANK), res.handle)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            res = buf.dispatch(x, idx, w, capacity=WORLD * T)
            out = buf.combine(expert_output(res.recv_x, None, RANK), res.handle)
        for replay in range(6):
            data = inputs("full" if replay % 2 else "masked", E, K, H, "bf16", T, SEED + 1 + replay)
            for s_ in range(WORLD):  # every rank has T tokens: the captured shapes are fixed
                xs, ids, ws, sc = data[s_]
                if xs.shape[0] < T:
                    pad = T - xs.shape[0]
                    data[s_] = (torch.cat([xs, torch.zeros(pad, H, dtype=xs.dtype)]),
                                torch.cat([ids, torch.full((pad, K), -1, dtype=ids.dtype)]),
                                torch.cat([ws, torch.zeros(pad, K)]), sc)
            x.copy_(data[RANK][0]); idx.copy_(data[RANK][1]); w.copy_(data[RANK][2])
            poison()
            graph.replay()
            torch.cuda.synchronize()
            refs = [dispatch_reference([d[0] for d in data], [d[1] for d in data], [d[2] for d in data], None, r,
                                       WORLD, E) for r in range(WORLD)]
            n = refs[RANK]["x"].shape[0]
            assert int(res.handle.recv_offsets[WORLD]) == n, f"replay {replay}: count"
            assert torch.equal(bits(res.recv_x[:n].cpu()), bits(refs[RANK]["x"])), f"replay {replay}: recv_x"
            assert torch.equal(res.recv_topk_idx[:n].cpu(), refs[RANK]["idx"]), f"replay {replay}: idx"
            assert res.tokens_per_expert.cpu().tolist() == refs[RANK]["tokens_per_expert"]
            want = combine_reference(T, H, refs, [expert_output(r["x"], None, j) for j, r in enumerate(refs)], RANK)
            got = out.float().cpu()
            assert bool(((got - want).abs() <= want.abs() * 2.0 ** -7 + 1e-30).all()), f"replay {replay}: combine"
        res = buf.dispatch(x, idx, w)  # eager default mode still works after the replays
        buf.combine(expert_output(res.recv_x, None, RANK), res.handle)
        torch.cuda.synchronize()
    return 6


def expect(exc_type, needle, fn):
    try:
        fn()
    except exc_type as e:
        assert needle in str(e), f"{needle!r} not in {e!r}"
        return 1
    raise AssertionError(f"expected {exc_type.__name__} with {needle!r}")


def suite_errors() -> int:
    H, E, K = 2048, 64, 2
    n = 0
    with ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=64, num_sms=4, timeout_s=10) as buf, \
            ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=64, num_sms=4, timeout_s=10) as other:
        x = torch.randn(32, H, device=DEV).bfloat16()
        idx = torch.randint(0, E, (32, K), device=DEV)
        w = torch.rand(32, K, device=DEV)
        n += expect(TypeError, "x: expected dtype bf16, got float32", lambda: buf.dispatch(x.float(), idx, w))
        n += expect(ValueError, "x: expected shape [T, 2048]", lambda: buf.dispatch(x[:, :1024], idx, w))
        n += expect(ValueError, "topk_idx: expected shape [32, 2]", lambda: buf.dispatch(x, idx[:, :1], w))
        n += expect(TypeError, "topk_idx: expected dtype int64, got int32", lambda: buf.dispatch(x, idx.int(), w))
        n += expect(ValueError, "x: expected a tensor on cuda", lambda: buf.dispatch(x.cpu(), idx, w))
        n += expect(ValueError, "contiguous", lambda: buf.dispatch(x, idx.t().contiguous().t(), w))
        n += expect(ValueError, "max_tokens_per_rank=64", lambda: buf.dispatch(
            torch.randn(65, H, device=DEV).bfloat16(), idx.repeat(3, 1)[:65], w.repeat(3, 1)[:65]))
        bad = idx.clone()
        if RANK == 1:  # one rank passes a bad id: every rank raises, naming it
            bad[5, 1] = E
        needle = f"got {E} at [5, 1]" if RANK == 1 else "rank 1 passed an id outside that range at [5, 1]"
        n += expect(ValueError, needle, lambda: buf.dispatch(x, bad, w))
        buf.dispatch(x, bad, w, capacity=64 * WORLD)  # non-blocking: the device records it
        torch.cuda.synchronize()
        n += expect(ValueError, "rank 1 passed an id outside that range at [5, 1]", buf.raise_pending)
        res = buf.dispatch(x, idx, w, capacity=4)  # too small for what arrives
        torch.cuda.synchronize()
        assert int(res.handle.recv_offsets[WORLD]) > 4 and res.recv_x.shape[0] == 4
        n += expect(ValueError, "capacity: expected at least", buf.raise_pending)
        buf.raise_pending()  # reported once
        n += expect(ValueError, "scales: expected None", lambda: buf.dispatch(x, idx, w, scales=w))
        res = buf.dispatch(x, idx, w)  # the group still works after all that
        y = expert_output(res.recv_x, None, RANK)
        n += expect(ValueError, "handle: expected a handle from this Buffer", lambda: other.combine(y, res.handle))
        n += expect(ValueError, "y: expected shape", lambda: buf.combine(y[:-1] if y.shape[0] else
                                                                         torch.empty(1, H, device=DEV).bfloat16(), res.handle))
        try:
            import cupy
            n += expect(TypeError, "topk_idx: expected a torch tensor", lambda: buf.dispatch(x, cupy.asarray(idx), w))
        except ImportError:
            pass
        buf.combine(y, res.handle)
        kept = buf.dispatch(x, idx, w, capacity=64 * WORLD)  # out= takes only a result of the same shapes
        n += expect(ValueError, "out: expected the result of a non-blocking dispatch, got one of a default-mode",
                    lambda: buf.dispatch(x, idx, w, capacity=64 * WORLD, out=res))
        n += expect(ValueError, "out: expected a result as dispatch returned it", lambda: buf.dispatch(
            x, idx, w, capacity=64 * WORLD, out=kept._replace(recv_x=kept.recv_x.clone())))
        n += expect(ValueError, "out: expected a result with (capacity, layout, pad_multiple) = (64, 'token', 1), "
                    f"got ({64 * WORLD}, 'token', 1)", lambda: buf.dispatch(x, idx, w, capacity=64, out=kept))
        n += expect(ValueError, "out: expected the result of a dispatch of 31 torch tokens, got one of 32",
                    lambda: buf.dispatch(x[:31], idx[:31], w[:31], capacity=64 * WORLD, out=kept))
        n += expect(ValueError, "out: expected a handle from this Buffer",
                    lambda: other.dispatch(x, idx, w, capacity=64 * WORLD, out=kept))
        y = expert_output(kept.recv_x, None, RANK)
        n += expect(ValueError, f"out: expected shape [32, {H}], got [31, {H}]", lambda: buf.combine(
            y, kept.handle, out=torch.empty(31, H, device=DEV).bfloat16()))
        n += expect(ValueError, "out: expected a 16-byte aligned address", lambda: buf.combine(
            y, kept.handle, out=torch.empty(32 * H + 1, device=DEV).bfloat16()[1:].view(32, H)))
        buf.combine(y, kept.handle)
        torch.cuda.synchronize()
    return n


def suite_timeout() -> int:
    # warm: the kernels are fetched (collectively) before rank 1 stops answering
    with ep_jit.Buffer(dist.group.WORLD, 2048, 8, 2, max_tokens_per_rank=16, num_sms=3, timeout_s=3,
                       warm=True) as buf:
        x = torch.randn(8, 2048, device=DEV).bfloat16()
        idx = torch.randint(0, 8, (8, 2), device=DEV)
        w = torch.rand(8, 2, device=DEV)
        if RANK == 0:
            t0 = time.time()
            expect(PeerTimeout, "rank 1 (global rank 1) did not respond within 3 s in count exchange",
                   lambda: buf.dispatch(x, idx, w))
            assert time.time() - t0 < 10
            assert buf.closed  # freed when the timeout fired
        dist.barrier()
        buf.close(wait_for_peers=False)  # rank 1 frees without waiting too; rank 0's is a no-op
        assert buf.closed
    return 1


def suite_collective_timeout() -> int:
    """transport='collective': rank 0 dispatches alone, its all_gather never completes, and
    the host's wait gives up. The stuck NCCL kernel stays on rank 0's stream, so the process
    leaves without tearing the group down."""
    side = dist.new_group(backend="gloo")  # a barrier that does not queue behind the stuck stream
    buf = ep_jit.Buffer(dist.group.WORLD, 2048, 8, 2, 16, num_sms=3, transport="collective", timeout_s=3)
    x = torch.randn(8, 2048, device=DEV).bfloat16()
    idx = torch.randint(0, 8, (8, 2), device=DEV)
    w = torch.rand(8, 2, device=DEV)
    res = buf.dispatch(x, idx, w)  # both ranks first: the group works
    buf.combine(res.recv_x, res.handle)
    torch.cuda.synchronize()
    if RANK == 0:
        t0 = time.time()
        expect(PeerTimeout, "count exchange: the group's all_gather did not finish within 3 s",
               lambda: buf.dispatch(x, idx, w))
        assert time.time() - t0 < 10
        assert buf.closed
        expect(EPJitError, "Buffer: it is closed", lambda: buf.dispatch(x, idx, w))
    dist.barrier(group=side)
    print("OK collective_timeout 2", flush=True)
    os._exit(0)


def suite_cupy() -> int:
    import cupy
    H, E, K = 2048, 64, 8
    with ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=128, num_sms=8) as buf:
        data = inputs("masked", E, K, H, "bf16", 128, SEED + 7)
        x, idx, w, _ = data[RANK]
        cx = cupy.asarray(x.view(torch.int16).numpy()).view(_cupy_bf16())
        res = buf.dispatch(cx, cupy.asarray(idx.numpy()), cupy.asarray(w.numpy()))
        assert type(res.recv_x).__module__.startswith("cupy")
        ref = dispatch_reference([d[0] for d in data], [d[1] for d in data], [d[2] for d in data], None, RANK, WORLD, E)
        got = torch.from_numpy(cupy.asnumpy(res.recv_x.view(cupy.int16)))
        assert torch.equal(got, bits(ref["x"])) and torch.equal(torch.from_numpy(cupy.asnumpy(res.recv_topk_idx)), ref["idx"])
        y = cupy.asarray(bits(expert_output(ref["x"], None, RANK)).numpy()).view(_cupy_bf16())
        out = buf.combine(y, res.handle)
        cupy.cuda.get_current_stream().synchronize()
        refs = [dispatch_reference([d[0] for d in data], [d[1] for d in data], [d[2] for d in data], None, r, WORLD, E)
                for r in range(WORLD)]
        want = combine_reference(x.shape[0], H, refs, [expert_output(r["x"], None, i) for i, r in enumerate(refs)], RANK)
        got = torch.from_numpy(cupy.asnumpy(out.view(cupy.int16))).view(torch.bfloat16).float()
        assert bool(((got - want).abs() <= want.abs() * 2.0 ** -7 + 1e-30).all())
    return 2


def _run_round(buf, g, rank_y, capacity=None, combines=1):
    """dispatch + `combines` combines of y = rank_y(recv_x) on the current stream; synchronised."""
    res = buf.dispatch(*g, capacity=capacity)
    y = rank_y(res.recv_x)
    outs = [buf.combine(y, res.handle) for _ in range(combines)]
    torch.cuda.synchronize()
    return res, outs


def _kept_sum(data, E, capacity, sign):
    """What this rank's combine must return when receiver r keeps only its first `capacity`
    rows (all, for None) and sends back sign * x for each: fp32 sums in rank order, as bf16."""
    refs = [dispatch_reference([d[0] for d in data], [d[1] for d in data], [d[2] for d in data], None, r, WORLD, E)
            for r in range(WORLD)]
    T, H = data[RANK][0].shape
    out = torch.zeros(T, H)
    lost = 0
    for r, ref in enumerate(refs):
        for j, (s, t) in enumerate(ref["origin"]):
            if s != RANK:
                continue
            if capacity is None or j < capacity:
                out[t] += sign * ref["x"][j].float()
            else:
                lost += 1
    n_here = refs[RANK]["x"].shape[0]
    return out.to(torch.bfloat16), lost, n_here


def pending_messages(buf) -> list[str]:
    """Every error raise_pending() has to report, one per call, until it has none."""
    found = []
    for _ in range(4):
        try:
            buf.raise_pending()
            return found
        except ValueError as e:
            found.append(str(e))
    raise AssertionError(f"raise_pending kept raising: {found}")


def suite_capacity_drop() -> int:
    """A round that sends +x back, then one with a capacity that drops rows and sends -x back:
    every token gets exactly its kept contributions (never the stale +x), and every rank
    that lost rows, as receiver or as source, is told."""
    H, E, K, T = 2048, 4 * WORLD, 2, 64
    n = 0
    with ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=T, num_sms=8) as buf:
        for i, capacity in enumerate([4, 0, 1, 37, 3 * T, 4, 9]):
            data = inputs("masked" if i % 2 else "random", E, K, H, "bf16", T, SEED + 31 * i)
            if i < 2:  # the 64-token case first
                data = inputs("full", E, K, H, "bf16", T, SEED + 31 * i)
            g = [t.to(DEV) if t is not None else None for t in data[RANK][:3]]
            _, (plus,) = _run_round(buf, g, lambda rx: rx.clone())
            want, _, _ = _kept_sum(data, E, None, 1.0)
            assert torch.equal(bits(plus.cpu()), bits(want)), f"capacity {capacity}: the +x round differs"
            poison()
            res, (minus,) = _run_round(buf, g, lambda rx: -rx, capacity=capacity)
            want, lost, n_here = _kept_sum(data, E, capacity, -1.0)
            got = minus.cpu()
            bad = int((bits(got) != bits(want)).any(dim=1).sum())
            assert bad == 0, f"capacity {capacity}: {bad} of {got.shape[0]} tokens differ from their kept contributions"
            messages = pending_messages(buf)
            want_msgs = []
            if n_here > capacity:
                want_msgs.append(f"capacity: expected at least {n_here} rows")
            if lost:
                want_msgs.append(f"{lost} rows (token layout) or pairs (expert layout) of this rank's tokens were "
                                 "dropped there")
            assert len(messages) == len(want_msgs) and all(w in m for w, m in zip(want_msgs, messages)), \
                f"capacity {capacity}: raise_pending said {messages}, expected {want_msgs}"
            check_round(buf, data, E, H, "bf16")  # the next default round is exact
            n += 3
    return n


def suite_wrap() -> int:
    """Sequences and the host ticket preset just below 2^31 and 2^32, then 40 rounds back to
    back (two combines on each handle, both modes) with rank 0 much slower: all exact."""
    H, E, K, T = 2048, 4 * WORLD, 2, 32
    datas = [inputs(kind, E, K, H, "bf16", T, SEED + j) for j, kind in enumerate(("random", "masked"))]
    wants = [_kept_sum(d, E, None, 1.0)[0] for d in datas]
    n = 0
    for start in (2**31 - 20, 2**32 - 20):
        with ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=T, num_sms=4, timeout_s=30) as buf:
            buf._transport.preset_counters(start, start)
            for i in range(40):
                data, want = datas[i % 2], wants[i % 2]
                g = [t.to(DEV) for t in data[RANK][:3]]
                if RANK == 0:
                    time.sleep(0.01)
                    torch.cuda._sleep(2_000_000)
                _, outs = _run_round(buf, g, lambda rx: rx.clone(), capacity=None if i % 3 else WORLD * T,
                                     combines=2)
                for c, out in enumerate(outs):
                    assert torch.equal(bits(out.cpu()), bits(want)), f"start {start}, round {i}, combine {c} differs"
                n += 2
            if start > 2**31:
                assert buf._transport._tickets < 40, f"the ticket did not wrap: {buf._transport._tickets}"
    return n


def suite_init_race() -> int:
    """Rank 0's stream is busy when it sets up its symmetric buffer (after the kernels are
    loaded, which waits for the device); the others dispatch at once."""
    H, E, K = 2048, 4 * WORLD, 2
    data = inputs("random", E, K, H, "bf16", 64, SEED)
    if RANK == 0:
        setup = ep_jit.symmetric.SymmetricBuffer.__init__

        def busy_then_setup(self, *args, **kwargs):
            torch.cuda._sleep(4_000_000_000)  # about 2 s on the current stream
            setup(self, *args, **kwargs)
        ep_jit.symmetric.SymmetricBuffer.__init__ = busy_then_setup
    with ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=64, num_sms=4, timeout_s=20) as buf:
        check_round(buf, data, E, H, "bf16")
    return 1


def suite_staggered() -> int:
    """Staggered starts and a small timeout_s: each rank ends correct or with PeerTimeout, never
    with a fault (no rank frees memory a peer still uses); a new Buffer then works."""
    H, E, K, T = 2048, 4 * WORLD, 2, 64
    data = inputs("random", E, K, H, "bf16", T, SEED)
    buf = ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=T, num_sms=4, timeout_s=2)
    dist.barrier()
    time.sleep(1.5 * RANK)
    g = [t.to(DEV) for t in data[RANK][:3]]
    outcome = "correct"
    try:
        _, (out,) = _run_round(buf, g, lambda rx: rx.clone())
        buf.raise_pending()  # a combine that timed out says so here
        assert torch.equal(bits(out.cpu()), bits(_kept_sum(data, E, None, 1.0)[0])), "combine differs"
    except PeerTimeout:
        outcome = "PeerTimeout"
    print(f"rank {RANK}: {outcome}", flush=True)
    torch.cuda.synchronize()  # a fault would surface here, sticky, and fail what follows
    buf.close(wait_for_peers=False)  # the group's last operation did not complete everywhere
    dist.barrier()
    with ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=T, num_sms=4, timeout_s=30) as fresh:
        check_round(fresh, data, E, H, "bf16")
    return 2


def suite_alignment() -> int:
    """Misaligned x, y and scales raise ValueError before any launch; the next round is exact."""
    H, E, K, T = 2048, 4 * WORLD, 2, 32
    n = 0
    for dtype in ("bf16", "fp8_e4m3"):
        data = inputs("random", E, K, H, dtype, T, SEED + n)
        with ep_jit.Buffer(dist.group.WORLD, H, E, K, max_tokens_per_rank=T, dtype=dtype, num_sms=4) as buf:
            x, idx, w, sc = (t.to(DEV) if t is not None else None for t in data[RANK])
            raw = torch.empty(x.numel() * x.element_size() + 64, dtype=torch.uint8, device=DEV)
            off = 2 if dtype == "bf16" else 1
            bad_x = raw[off:off + x.numel() * x.element_size()].view(x.dtype).view(x.shape)
            bad_x.copy_(x)
            n += expect(ValueError, f"x: expected a 16-byte aligned address, got one with address % 16 = {off}",
                        lambda: buf.dispatch(bad_x, idx, w, scales=sc))
            if sc is not None:
                rs = torch.empty(sc.numel() + 8, dtype=torch.float32, device=DEV)
                bad_sc = rs[1:1 + sc.numel()].view(sc.shape)
                bad_sc.copy_(sc)
                n += expect(ValueError, "scales: expected a 16-byte aligned address, got one with address % 16 = 4",
                            lambda: buf.dispatch(x, idx, w, scales=bad_sc))
            res = buf.dispatch(x, idx, w, scales=sc)
            y = expert_output(res.recv_x, res.recv_scales, RANK)
            ry = torch.empty(y.numel() + 8, dtype=torch.bfloat16, device=DEV)
            bad_y = ry[1:1 + y.numel()].view(y.shape)
            bad_y.copy_(y)
            if y.shape[0]:
                n += expect(ValueError, "y: expected a 16-byte aligned address, got one with address % 16 = 2",
                            lambda: buf.combine(bad_y, res.handle))
            buf.combine(y, res.handle)
            check_round(buf, data, E, H, dtype)
            n += 1
    return n


def suite_commless() -> int:
    """No process group: a GroupInfo and an all_gather callable, through the reference checks."""
    H, E, K = 2048, 8 * WORLD, 2

    def gather(obj):
        out = [None] * WORLD
        dist.all_gather_object(out, obj)
        return out

    info = ep_jit.GroupInfo(members=list(range(WORLD)), rank=RANK)
    n = 0
    with ep_jit.Buffer(info, H, E, K, max_tokens_per_rank=128, num_sms=8, device=DEV.index, all_gather=gather) as buf:
        for i, kind in enumerate(("random", "masked", "zero_on_one")):
            data = inputs(kind, E, K, H, "bf16", 128, SEED + i)
            check_round(buf, data, E, H, "bf16")
            check_round(buf, data, E, H, "bf16", capacity=WORLD * 128)
            n += 2
    return n


def _cupy_bf16():
    import ml_dtypes
    return ml_dtypes.bfloat16


def main(suites: dict) -> None:
    """Run the suite named on the command line from `suites` (a worker module's globals)."""
    # a rank stuck past the harness's patience prints where every thread is, then exits
    faulthandler.dump_traceback_later(int(os.environ.get("EP_TEST_HANG_S", "840")), exit=True)
    torch.cuda.set_device(DEV)
    # NCCL refuses two ranks on one GPU; ep_jit's NVLink transport needs the group only
    # for its object all-gather, which gloo does as well.
    sharing = WORLD > torch.cuda.device_count()
    dist.init_process_group("gloo" if sharing else "nccl", device_id=None if sharing else DEV)
    suite = sys.argv[1]
    try:
        count = suites[f"suite_{suite}"]()
        dist.barrier()
        print(f"OK {suite} {count}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(globals())
