"""The one-pass checks of a decode loop's dispatch into out= and combine into out= (CPU
tensors, a recording transport): they launch with the inputs' addresses when everything is
as the result was made for, and hand anything else, untouched, to the full checks."""

import itertools
from types import SimpleNamespace

import pytest
import torch

from ep_jit import buffer
from ep_jit.buffer import Buffer
from ep_jit.frameworks import torch as torch_adapter
from ep_jit.transports.base import DispatchResult, Handle

T, H, K, CAPACITY, STREAM = 3, 256, 2, 5, 1234


class Recorder:
    """A transport that records what the Buffer asks it to repeat."""

    def __init__(self):
        self.calls = []

    def check_error(self):
        pass

    def dispatch_again(self, adapter, stream, out, x, topk_idx, topk_weights, scales):
        self.calls.append(("dispatch", stream, out, x, topk_idx, topk_weights, scales))
        return True

    def combine_again(self, adapter, stream, handle, y, out):
        self.calls.append(("combine", stream, handle, y, out))
        return True


@pytest.fixture(autouse=True)
def no_driver(monkeypatch):
    """The current stream and context without a GPU."""
    monkeypatch.setattr(torch_adapter, "_raw_stream", lambda device: STREAM)
    monkeypatch.setattr(buffer, "use_device", lambda device: None)


def _buffer(dtype="bf16"):
    buf = Buffer.__new__(Buffer)
    buf.id, buf.hidden, buf.topk, buf.dtype, buf.device, buf.max_tokens = 7, H, K, dtype, -1, 16  # CPU: device -1
    buf._retained, buf._transport = [], Recorder()
    return buf


def _result(layout="token", pad_multiple=1, **handle):
    fields = dict(buffer_id=7, framework="torch", num_tokens=T, arrays=None, num_recv=None, capacity=CAPACITY,
                  recv_from=None, tokens_per_expert_list=None, layout=layout, pad_multiple=pad_multiple)
    h = Handle(**{**fields, **handle})
    return DispatchResult(torch.randn(CAPACITY, H).bfloat16(), None, torch.rand(CAPACITY, K), None, None, h)


def _inputs():
    return dict(x=torch.randn(T, H).bfloat16(), topk_idx=torch.randint(0, 8, (T, K)), topk_weights=torch.rand(T, K))


def _misaligned(shape):
    return torch.randn(shape[0] * shape[1] + 1).bfloat16()[1:].view(shape)


def test_a_repeat_launches_with_the_inputs_addresses():
    buf, out, inputs = _buffer(), _result(), _inputs()
    assert buf.dispatch(**inputs, capacity=CAPACITY, out=out) is out
    assert buf._transport.calls == [("dispatch", STREAM, out, inputs["x"].data_ptr(), inputs["topk_idx"].data_ptr(),
                                     inputs["topk_weights"].data_ptr(), 0)]
    y, o = torch.randn(CAPACITY, H).bfloat16(), torch.empty(T, H, dtype=torch.bfloat16)
    assert buf.combine(y, out.handle, out=o) is o
    assert buf._transport.calls[1] == ("combine", STREAM, out.handle, y.data_ptr(), o.data_ptr())


def test_fp8_repeats_need_their_scales():
    buf, out, inputs = _buffer("fp8_e4m3"), _result(), _inputs()
    inputs["x"] = inputs["x"].to(torch.float8_e4m3fn)
    assert not buf._dispatch_again(**inputs, scales=None, stream=None, capacity=CAPACITY, layout="token",
                                   pad_multiple=None, out=out)
    scales = torch.rand(T, H // 128)
    assert buf._dispatch_again(**inputs, scales=scales, stream=None, capacity=CAPACITY, layout="token",
                               pad_multiple=None, out=out)
    assert buf._transport.calls[0][-1] == scales.data_ptr()


@pytest.mark.parametrize("layout, handle_pad, pad_multiple, repeats", [
    ("expert", 16, 16, True), ("expert", 16, None, False), ("expert", 16, 8, False), ("expert", 1, None, True),
    ("expert", 1, True, False), ("token", 1, 1, False), ("token", 1, None, True)])
def test_the_padding_must_be_the_results(layout, handle_pad, pad_multiple, repeats):
    buf = _buffer()
    assert buf._dispatch_again(**_inputs(), scales=None, stream=None, capacity=CAPACITY, layout=layout,
                               pad_multiple=pad_multiple, out=_result(layout, handle_pad)) is repeats


# each: what differs from the result's own dispatch -> the full checks take it
DISPATCH_MISMATCHES = {
    "x dtype": lambda a, r, b: a.update(x=a["x"].float()),
    "x tokens": lambda a, r, b: a.update(x=torch.randn(T + 1, H).bfloat16()),
    "x not contiguous": lambda a, r, b: a.update(x=torch.randn(T, 2 * H).bfloat16()[:, :H]),
    "x misaligned": lambda a, r, b: a.update(x=_misaligned((T, H))),
    "x not a tensor": lambda a, r, b: a.update(x=a["x"].float().numpy()),
    "topk_idx dtype": lambda a, r, b: a.update(topk_idx=a["topk_idx"].int()),
    "weights need grad": lambda a, r, b: a["topk_weights"].requires_grad_(),
    "scales for bf16": lambda a, r, b: a.update(scales=torch.rand(T, H // 128)),
    "a stream": lambda a, r, b: a.update(stream=STREAM),
    "other capacity": lambda a, r, b: a.update(capacity=CAPACITY - 1),
    "no capacity": lambda a, r, b: a.update(capacity=None),
    "capacity a bool": lambda a, r, b: (a.update(capacity=True), r.handle.__setattr__("capacity", 1)),
    "other layout": lambda a, r, b: a.update(layout="expert"),
    "another Buffer's": lambda a, r, b: r.handle.__setattr__("buffer_id", 8),
    "recorded": lambda a, r, b: r.handle.__setattr__("recorded", True),
    "default mode": lambda a, r, b: r.handle.__setattr__("num_recv", 4),
    "tensors held for a stream": lambda a, r, b: b._retained.append(None),
}


@pytest.mark.parametrize("mismatch", DISPATCH_MISMATCHES)
def test_dispatch_mismatches_take_the_full_checks(mismatch):
    buf, out = _buffer(), _result()
    args = dict(_inputs(), scales=None, stream=None, capacity=CAPACITY, layout="token", pad_multiple=None)
    DISPATCH_MISMATCHES[mismatch](args, out, buf)
    assert buf._dispatch_again(**args, out=out) is False and buf._transport.calls == []


def test_out_must_be_a_result_with_a_real_handle():
    buf, result = _buffer(), _result()
    lookalike = result._replace(handle=SimpleNamespace(**vars(result.handle)))
    for out in (tuple(result), lookalike, result._replace(handle=object())):
        assert not buf._dispatch_again(**_inputs(), scales=None, stream=None, capacity=CAPACITY, layout="token",
                                       pad_multiple=None, out=out)


class FullPath(Recorder):
    """A transport that also records the full path's calls."""

    features = frozenset({"expert layout", "autograd"})

    def check_operation(self, op, capacity):
        pass

    def dispatch(self, op, x, topk_idx, topk_weights, scales, capacity, pad_multiple, out):
        self.calls.append(("dispatch", op.stream, out, x.ptr, topk_idx.ptr, topk_weights.ptr,
                           0 if scales is None else scales.ptr))
        return out, []

    def combine(self, op, y, handle, rows, weights, scalars, out):
        self.calls.append(("combine", op.stream, handle, y.ptr, out))
        return out, None, []


def _both_paths(dtype):
    """A Buffer that takes the one pass, and one whose one pass always declines."""
    fast, full = _buffer(dtype), _buffer(dtype)
    fast._transport, full._transport = FullPath(), FullPath()
    full._dispatch_again = full._combine_again = lambda *args: False
    return fast, full


@pytest.mark.parametrize("dtype", ["bf16", "fp8_e4m3"])
def test_what_the_one_pass_launches_the_full_checks_accept_alike(dtype):
    """Over combinations of layouts, paddings, capacities and scales: every dispatch the one
    pass launches, the full checks accept too, and hand the transport the same stream and
    addresses."""
    accepted = []
    for (layout, handle_pad), pad_multiple, capacity, scales_cols, asked in itertools.product(
            (("token", 1), ("expert", 1), ("expert", 16)), (None, 1, 16, True, 0), (CAPACITY, CAPACITY - 1, None),
            (None, H // 128, H // 64), ("token", "expert")):
        fast, full = _both_paths(dtype)
        out, inputs = _result(layout, handle_pad), _inputs()
        if dtype == "fp8_e4m3":
            inputs["x"] = inputs["x"].to(torch.float8_e4m3fn)
        call = dict(inputs, scales=None if scales_cols is None else torch.rand(T, scales_cols), capacity=capacity,
                    layout=asked, pad_multiple=pad_multiple, out=out)
        if not fast._dispatch_again(**call, stream=None):
            continue
        accepted.append((layout, handle_pad, pad_multiple, asked, capacity, scales_cols))
        assert full.dispatch(**call) is out
        assert fast._transport.calls == full._transport.calls
    scales_cols = H // 128 if dtype == "fp8_e4m3" else None
    assert accepted == [("token", 1, None, "token", CAPACITY, scales_cols), ("expert", 1, None, "expert", CAPACITY,
                        scales_cols), ("expert", 1, 1, "expert", CAPACITY, scales_cols),
                        ("expert", 16, 16, "expert", CAPACITY, scales_cols)]


def test_what_the_one_pass_combines_the_full_checks_accept_alike():
    """Over layouts, weights that need grad or not, and y / out of other shapes and dtypes:
    every combine the one pass launches, the full checks accept too, alike."""
    accepted = []
    ys = {"y": lambda: torch.randn(CAPACITY, H).bfloat16(), "y f32": lambda: torch.randn(CAPACITY, H),
          "y rows": lambda: torch.randn(CAPACITY + 1, H).bfloat16()}
    outs = {"out": lambda: torch.empty(T, H, dtype=torch.bfloat16), "out f32": lambda: torch.empty(T, H),
            "out misaligned": lambda: _misaligned((T, H))}
    for layout, grad, y_kind, out_kind in itertools.product(("token", "expert"), (False, True), ys, outs):
        fast, full = _both_paths("bf16")
        handle = _result(layout).handle
        handle.weights_node = torch.rand(CAPACITY, requires_grad=grad)
        y, out = ys[y_kind](), outs[out_kind]()
        if fast._combine_again(y, handle, None, out) is not True:
            continue
        accepted.append((layout, grad, y_kind, out_kind))
        assert full.combine(y, handle, out=out) is out
        assert fast._transport.calls == [("combine", STREAM, handle, y.data_ptr(), out.data_ptr())]
        assert full._transport.calls == [("combine", STREAM, handle, y.data_ptr(), out)]
    assert accepted == [("token", False, "y", "out"), ("token", True, "y", "out"), ("expert", False, "y", "out")]


COMBINE_MISMATCHES = {
    "y rows": lambda c, h, b: c.update(y=torch.randn(CAPACITY + 1, H).bfloat16()),
    "y dtype": lambda c, h, b: c.update(y=c["y"].float()),
    "y needs grad": lambda c, h, b: c["y"].requires_grad_(),
    "y misaligned": lambda c, h, b: c.update(y=_misaligned((CAPACITY, H))),
    "out shape": lambda c, h, b: c.update(out=torch.empty(T, H + 8, dtype=torch.bfloat16)),
    "out dtype": lambda c, h, b: c.update(out=torch.empty(T, H)),
    "a stream": lambda c, h, b: c.update(stream=STREAM),
    "another Buffer's": lambda c, h, b: h.__setattr__("buffer_id", 8),
    "routed weights need grad": lambda c, h, b: (h.__setattr__("layout", "expert"),
                                                 h.__setattr__("weights_node", torch.rand(2, requires_grad=True))),
    "tensors held for a stream": lambda c, h, b: b._retained.append(None),
}


@pytest.mark.parametrize("mismatch", COMBINE_MISMATCHES)
def test_combine_mismatches_take_the_full_checks(mismatch):
    buf, handle = _buffer(), _result().handle
    args = dict(y=torch.randn(CAPACITY, H).bfloat16(), stream=None, out=torch.empty(T, H, dtype=torch.bfloat16))
    COMBINE_MISMATCHES[mismatch](args, handle, buf)
    assert buf._combine_again(handle=handle, **args) is False and buf._transport.calls == []
    assert not buf._combine_again(args["y"], object(), None, args["out"])  # not a handle
