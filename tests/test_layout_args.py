"""The expert layout's and autograd's host side without a GPU: argument checks before any
launch, the transports' features, lazy fetching of kernels, the segment offsets, and the
NVRTC compile of the kernels' layout paths at their extremes."""

import pytest
import torch

from ep_jit.buffer import Buffer
from ep_jit.compiler import compile_source, render
from ep_jit.spec import KernelSpec
from ep_jit.transports import TRANSPORTS, buffer_specs
from ep_jit.transports import base
from ep_jit.transports.collective import CollectiveTransport
from ep_jit.transports.nvlink import WRITTEN, NVLinkTransport, segment_offsets


def _buffer(transport: str) -> Buffer:
    """A Buffer as far as the checks go: its transport's class stands in for the transport."""
    buf = Buffer.__new__(Buffer)
    buf.transport, buf._transport = transport, TRANSPORTS[transport]
    return buf


@pytest.mark.parametrize("kwargs, error, needle", [
    (dict(layout="expert_major"), ValueError, "layout: expected 'token' or 'expert', got 'expert_major'"),
    (dict(pad_multiple=16), ValueError, "pad_multiple: expected None with layout='token', got 16"),
    (dict(layout="expert", pad_multiple=0), ValueError, "pad_multiple: expected a positive int, got 0"),
    (dict(layout="expert", pad_multiple=True), ValueError, "pad_multiple: expected a positive int, got True"),
])
def test_layout_arguments_are_checked_first(kwargs, error, needle):
    x = torch.zeros(4, 8)
    with pytest.raises(error, match=needle):
        _buffer("nvlink").dispatch(x, None, None, **kwargs)


def test_collective_transport_names_what_it_lacks():
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="layout: transport='collective' does not support the expert layout yet"):
        _buffer("collective").dispatch(x, None, None, layout="expert", pad_multiple=16)
    with pytest.raises(ValueError, match="x: transport='collective' does not support the autograd yet"):
        _buffer("collective").dispatch(x.requires_grad_(), None, None)
    assert NVLinkTransport.features == {"expert layout", "autograd"} and not CollectiveTransport.features


def test_fp8_dispatch_has_no_gradient_for_x():
    buf = _buffer("nvlink")
    buf.dtype = "fp8_e4m3"
    with pytest.raises(ValueError, match="x: fp8 dispatch has no gradient with respect to x"):
        buf.dispatch(torch.zeros(4, 8, requires_grad=True), None, None)


def test_segment_offsets_round_each_segment_up():
    assert segment_offsets([3, 0, 17, 1], 16) == [0, 16, 16, 48, 64]
    assert segment_offsets([3, 0, 17, 1], 1) == [0, 3, 3, 20, 21]
    assert segment_offsets([], 128) == [0]


def test_kernels_are_fetched_at_first_use_and_warm_fetches_the_rest(monkeypatch):
    fetched = []

    class Binary:
        def __init__(self, spec):
            self.spec, self.cubin, self.key = spec, b"", "0" * 64

        def symbol(self, name):
            return name

    class Library:
        def __init__(self, *args):
            pass

        def kernel(self, symbol, declaration):
            return symbol

    def warm(specs, info, all_gather):
        fetched.append([s.template for s in specs])
        return [Binary(s) for s in specs]

    monkeypatch.setattr(base, "warm", warm)
    monkeypatch.setattr(base, "Library", Library)
    bound = type("Bound", (), {"info": type("Info", (), {"size": 2, "member_hash": "ab" * 32})(), "device": 0,
                               "gather": None})()
    setup = base.Setup(bound, 2048, 8, 2, "bf16", 128, 8, 1.0, "sm_90a")
    kernels = base.Kernels(setup, NVLinkTransport.templates)
    assert fetched == [] and kernels.fetched == ()
    assert kernels.dispatch == "dispatch"  # binary.symbol(name), here the name
    assert kernels.dispatch == "dispatch" and fetched == [["dispatch"]]  # once per template
    kernels.warm()
    kernels.warm()
    assert fetched == [["dispatch"], ["combine"]] and kernels.fetched == ("dispatch", "combine")
    with pytest.raises(AttributeError, match="no kernel 'sum'"):
        kernels.sum


def test_warming_covers_every_template_a_buffer_can_fetch():
    specs = buffer_specs(hidden=2048, num_experts=8, topk=2, dtype="bf16", members=[0, 1], arch="sm_90a")
    assert {s.template for s in specs} == {t for cls in TRANSPORTS.values() for t in cls.templates}


@pytest.mark.parametrize("template", ["dispatch", "combine"])
@pytest.mark.parametrize("shape", [(2048, 1024, 1, 8, "bf16"), (2048, 64, 64, 1, "bf16"), (7168, 256, 8, 8, "fp8_e4m3")])
def test_layout_paths_compile_at_their_extremes(template, shape):
    """Most local experts (the pair ranking's shared memory), most ranks at top-1, fp8 top-8."""
    compile_source(render(KernelSpec(template, *shape, "ab" * 32, "sm_90a")), "test")


@pytest.mark.parametrize("kwargs, error, needle", [
    (dict(out=("not", "a result")), TypeError, "out: expected a DispatchResult of this Buffer, got tuple"),
])
def test_dispatch_out_is_checked_first(kwargs, error, needle):
    x = torch.zeros(4, 8)
    with pytest.raises(error, match=needle):
        _buffer("nvlink").dispatch(x, None, None, capacity=4, **kwargs)


def _owning_buffer():
    """A Buffer as far as the checks of out= go, and a handle of its own."""
    buf = _buffer("nvlink")
    buf.id, buf._transport, buf._retained = 7, NVLinkTransport.__new__(NVLinkTransport), []
    buf._transport.closed = False
    buf._transport._status = [0]  # no error reported
    return buf, base.Handle(7, "torch", 4, None, None, 4, None, None)


def test_out_is_never_recorded_for_autograd():
    buf, handle = _owning_buffer()
    result = base.DispatchResult(None, None, None, None, None, handle)
    x = torch.zeros(4, 8, requires_grad=True)
    with pytest.raises(ValueError, match="out: expected inputs that do not require grad"):
        buf.dispatch(x, None, None, capacity=4, out=result)
    with pytest.raises(ValueError, match="out: expected y .* not to require grad"):
        buf.combine(x, handle, out=torch.zeros(4, 8))
    handle.recorded = True  # held by autograd: a backward pass will read it
    with pytest.raises(ValueError, match="out: expected a result whose handle autograd does not hold"):
        buf.dispatch(torch.zeros(4, 8), None, None, capacity=4, out=result)


@pytest.mark.parametrize("capacity, num_recv, needle", [
    (None, None, "out: expected capacity=N with out= .*, got capacity=None"),
    (4, 4, "out: expected the result of a non-blocking dispatch, got one of a default-mode dispatch"),
    (8, None, r"out: expected a result with \(capacity, layout, pad_multiple\) = \(8, 'token', 1\), "
              r"got \(4, 'token', 1\)"),
])
def test_out_must_be_a_nonblocking_result_of_the_same_shapes(capacity, num_recv, needle):
    buf, handle = _owning_buffer()
    handle.num_recv = num_recv
    with pytest.raises(ValueError, match=needle):
        buf.dispatch(torch.zeros(4, 8), None, None, capacity=capacity,
                     out=base.DispatchResult(None, None, None, None, None, handle))


def test_out_whose_tensors_were_replaced_is_refused_before_any_launch():
    from types import SimpleNamespace

    from ep_jit.frameworks.torch import TorchAdapter
    from ep_jit.kernels.args import DispatchArgs

    launched = []
    kernel = SimpleNamespace(launch=lambda stream, grid, args: launched.append(args.phases))
    tensors = [torch.zeros(4, 8), torch.zeros(4, 2, dtype=torch.int64), torch.zeros(4, 2), torch.zeros(2)]
    args, pairs = DispatchArgs(), SimpleNamespace()
    handle = base.Handle(7, "torch", 4, SimpleNamespace(storage=None), None, 4, None, None, transport=pairs)
    result = base.DispatchResult(*tensors[:3], None, tensors[3], handle)
    pairs.args, pairs.outputs = args, [t.data_ptr() for t in WRITTEN[False, False](result)]
    transport = NVLinkTransport.__new__(NVLinkTransport)
    transport.kernels, transport._resident, transport._stale_status, transport.num_sms = \
        SimpleNamespace(dispatch=kernel), {"dispatch"}, set(), 4
    transport.dtype, transport._fused_tokens = "bf16", 8
    op, inputs = base.Operation(TorchAdapter(), 0, None), [SimpleNamespace(ptr=16)] * 3
    replaced = result._replace(recv_x=tensors[0].clone())
    assert not transport.dispatch_again(op.adapter, 0, replaced, 16, 16, 16, 0)  # the repeat path: not launched
    with pytest.raises(ValueError, match="out: expected a result as dispatch returned it"):  # the full path
        transport.dispatch(op, *inputs, None, 4, None, replaced)
    assert launched == []
    assert transport.dispatch_again(op.adapter, 0, result, 16, 16, 16, 0)
    assert launched == [3] and args.send.x == 16  # both phases in one launch, the new inputs
