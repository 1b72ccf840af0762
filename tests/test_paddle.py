"""Paddle on the CPU build: groups over gloo, the torch proxy, and the adapter's tensor and
stream paths (a CPU build has no CUDA streams, so streams are stand-ins)."""

import subprocess
import sys
import textwrap

import pytest

from helpers import REPO
from ep_jit import member_hash

paddle = pytest.importorskip("paddle")

from ep_jit.frameworks import adapter_for, resolve_stream  # noqa: E402
from ep_jit.frameworks.paddle import PaddleAdapter, stream_handle_of  # noqa: E402


def test_adapter_reads_tensor_facts():
    a = PaddleAdapter()
    t = paddle.arange(12, dtype="int64").reshape([3, 4])
    assert adapter_for(t).name == "paddle"
    assert a.shape(t) == (3, 4) and a.dtype(t) == "int64" and a.device(t) == -1 and a.is_contiguous(t)
    assert a.pointer(t[1:]) == a.pointer(t) + 4 * 8  # data_ptr includes a view's offset
    assert not a.is_contiguous(t.transpose([1, 0]))
    assert a.dtype(paddle.ones([2], dtype="bfloat16")) == "bf16"
    assert a.dtype(paddle.ones([2], dtype="float32")) == "float32"
    if hasattr(paddle, "float8_e4m3fn"):  # Paddle 3.x
        assert a.dtype(paddle.ones([2], dtype="float32").astype("float8_e4m3fn")) == "fp8_e4m3"


class PaddleStream30:
    """Stand-in for a Paddle 3.0-3.2 stream: the handle sits on stream_base."""
    __module__ = "paddle.device"

    def __init__(self, handle):
        self.stream_base = type("StreamBase", (), {"cuda_stream": handle})()


class PaddleStream33(PaddleStream30):
    """Stand-in for Paddle 3.3+: __cuda_stream__ is preferred."""

    def __cuda_stream__(self):
        return (0, self.stream_base.cuda_stream + 1)


def test_stream_handles_by_capability():
    assert stream_handle_of(PaddleStream30(1234)) == 1234
    assert stream_handle_of(PaddleStream33(1234)) == 1235
    assert stream_handle_of(PaddleStream30(0)) == 0  # the legacy default stream is a valid handle
    assert stream_handle_of(object()) is None


def test_resolve_stream_accepts_paddle_streams_and_handles():
    a = PaddleAdapter()
    assert resolve_stream(PaddleStream30(77), a, 0) == 77
    assert resolve_stream(PaddleStream33(77), a, 0) == 78
    assert resolve_stream(0, a, 0) == 0
    assert resolve_stream(5, a, 0) == 5
    with pytest.raises(TypeError, match="stream: expected a stream object"):
        resolve_stream("fast", a, 0)
    with pytest.raises(TypeError, match="got a bool"):
        resolve_stream(True, a, 0)
    with pytest.raises(ValueError, match="stream: expected a non-negative handle, got -3"):
        resolve_stream(-3, a, 0)


@pytest.mark.skipif(not hasattr(paddle, "enable_compat"), reason="this Paddle has no torch proxy")
def test_torch_proxy_routes_to_paddle():
    code = textwrap.dedent("""
        import paddle
        paddle.enable_compat()
        import torch                         # this is Paddle now
        from ep_jit.frameworks import adapter_for, paddle_torch_proxy_active
        x = torch.ones([2, 3])
        assert paddle_torch_proxy_active()
        assert adapter_for(x).name == "paddle", adapter_for(x).name
        try:
            import ep_jit.frameworks.torch
        except ImportError as e:
            assert "proxy" in str(e)
        else:
            raise AssertionError("the torch adapter accepted Paddle's proxy")
        print("PROXY OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert "PROXY OK" in out.stdout, out.stderr[-3000:]


WORKER = textwrap.dedent("""
    from ep_jit import GroupInfo  # before paddle: Paddle 2.6's CPU wheel breaks Python's zlib on import
    from ep_jit.frameworks import object_all_gather
    import paddle, paddle.distributed as dist
    from ep_jit.frameworks.paddle import PaddleAdapter
    dist.init_parallel_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    members = list(range(1, world))[::-1]                    # every rank but 0, given in reverse
    sub = dist.new_group(members, backend="gloo")           # paddle keeps a group's ranks ascending
    single = dist.new_group([0], backend="gloo")            # the same calls on every rank, as paddle wants
    if rank in members:
        g = GroupInfo.from_paddle(sub)
        assert list(g.members) == list(sub.ranks)
        gathered = object_all_gather(sub, g.size)({"rank": rank})
        out = paddle.full([2 * g.size], -7, dtype="int32")           # the collective transport's all_gather
        PaddleAdapter().all_gather(sub, out, paddle.to_tensor([rank, 10 * rank], dtype="int32"), None)
        print("TENSORS", ",".join(str(v) for v in out.tolist()))
        print("SUB", g.member_hash, g.rank, ",".join(str(m) for m in g.members))
        print("GATHER", ",".join(str(d["rank"]) for d in gathered))
    else:
        try:
            GroupInfo.from_paddle(sub)
        except ValueError as e:
            print("OUTSIDER", "not a member" in str(e))
        mine = GroupInfo.from_paddle(single)
        print("SINGLE", mine.member_hash, mine.rank, single.rank)
    dist.barrier()
""")


@pytest.mark.parametrize("world", [3])  # 4 CPU gloo processes time out on 2-core machines
def test_paddle_gloo_groups(world):
    from helpers import spawn_ranks
    from test_group import _lines, _paddle_env
    outs = spawn_ranks(WORKER, world, _paddle_env(world))
    members = list(range(1, world))  # group.ranks comes back ascending
    for r, out in enumerate(outs):
        if r == 0:
            assert "OUTSIDER True" in out
            (single,) = [l.split() for l in out.splitlines() if l.startswith("SINGLE ")]
            assert single[1:3] == [member_hash([0]), "0"]  # GroupInfo's rank is 0 ...
            assert single[3] == "-1"  # ... though paddle reports -1 for a single-member group
            continue
        (h, grank), = _lines(out, "SUB")
        assert h == member_hash(members) and grank == members.index(r)
        gather = next(l for l in out.splitlines() if l.startswith("GATHER ")).split()[1]
        assert gather == ",".join(str(m) for m in members)  # group-rank order, nothing appended twice
        tensors = next(l for l in out.splitlines() if l.startswith("TENSORS ")).split()[1]
        assert tensors == ",".join(f"{m},{10 * m}" for m in members)
