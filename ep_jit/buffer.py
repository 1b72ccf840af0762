"""ep_jit.Buffer: expert-parallel dispatch and combine for one EP group and model shape.

Every operation is collective: all members call dispatch/combine in the same order.
Each operation runs entirely on one stream, the one `frameworks.resolve_stream`
returns. The Buffer checks every argument before any launch; a transport
(ep_jit/transports/) moves the tokens.
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable

from cuda.bindings import driver

from . import autograd
from .autograd import needs_grad
from .errors import PeerTimeout
from .frameworks import Adapter, TensorView, adapter_for, bind_group, framework_of, resolve_stream
from .kernels.constants import MAX_LOCAL_EXPERTS, MAX_RANKS, SCALE_BLOCK
from .runtime import check, device_arch, device_attribute, use_device
from .spec import canonical_dtype
from .transports import DispatchResult, Handle, transport_class
from .transports.base import Operation, Setup

__all__ = ["Buffer", "DispatchResult", "Handle", "PeerTimeout"]


def _event_done(event: Any) -> bool:
    (err,) = driver.cuEventQuery(event)
    if err == driver.CUresult.CUDA_ERROR_NOT_READY:
        return False
    check((err,), "cuEventQuery")
    check(driver.cuEventDestroy(event), "cuEventDestroy")
    return True


# Operation((adapter, stream, foreign)) without the Python frame of a NamedTuple's __new__
_operation: Callable[[tuple], Operation] = functools.partial(tuple.__new__, Operation)
MAX_CAPACITY = 2**31 - 1  # rows are counted in int32 on the device
_ids = itertools.count(1)


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


class Buffer:
    def __init__(self, group: Any, hidden: int, num_experts: int, topk: int, max_tokens_per_rank: int,
                 dtype: str = "bf16", num_sms: int = 24, *, transport: str = "nvlink", device: int | None = None,
                 all_gather: Callable[[Any], list] | None = None, timeout_s: float = 60.0,
                 warm: bool = False) -> None:
        """`group`: a torch or paddle process group, or a GroupInfo (then pass `device` and,
        for more than one member, `all_gather(obj) -> list` in group-rank order).

        `transport`: "nvlink" (every member in this NVLink domain, verified; TopologyError
        otherwise) or "collective" (the group framework's all_to_all; any topology, needs a
        torch or paddle group and that framework's tensors). `timeout_s`: how long a rank
        waits for its peers before PeerTimeout (with "collective", for the count exchange;
        the group's own timeout governs its collectives).

        No kernel is compiled or loaded here: each is fetched (memory, disk, then NVRTC;
        collectively, through ep_jit.warm) by the first operation that needs it. `warm=True`
        fetches every kernel a Buffer can ask for now, as `warm()` does later."""
        transport_type = transport_class(transport)
        bound = bind_group(group, device, all_gather)
        self.group, R = bound.info, bound.info.size
        self.hidden, self.num_experts, self.topk, self.transport = hidden, num_experts, topk, transport
        self.max_tokens = _positive("max_tokens_per_rank", max_tokens_per_rank)
        self.dtype = canonical_dtype(dtype)
        _positive("num_experts", num_experts)  # the rest of the shape is checked by KernelSpec
        _positive("num_sms", num_sms)
        if R > MAX_RANKS or num_experts // R > MAX_LOCAL_EXPERTS:
            raise ValueError(f"group: expected at most {MAX_RANKS} ranks and {MAX_LOCAL_EXPERTS} experts per rank, "
                             f"got {R} ranks and {num_experts} experts")
        self.device = bound.device
        self._check_same_everywhere(bound.gather, dict(members=list(self.group.members), hidden=hidden,
                                                       num_experts=num_experts, topk=topk, dtype=self.dtype,
                                                       max_tokens_per_rank=self.max_tokens, num_sms=num_sms,
                                                       transport=transport))
        transport_type.check_setup(group, R, num_sms)  # after the gather: every member refuses alike
        use_device(self.device)
        sm_count = device_attribute(self.device, driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        self.num_sms = num_sms
        if num_sms > sm_count:
            raise ValueError(f"num_sms: expected at most the device's {sm_count} SMs, got {num_sms}")
        self.id = next(_ids)
        self._transport = transport_type(Setup(bound, hidden, num_experts, topk, self.dtype, self.max_tokens,
                                               num_sms, timeout_s, device_arch(self.device)))
        self._retained: list[tuple[Any, list]] = []
        if warm:
            self.warm()

    def warm(self) -> None:
        """Fetch every kernel this Buffer can launch (every layout, backward and dtype path),
        in one collective round: call it on every member."""
        self._transport.kernels.warm()

    @property
    def first_fetch_s(self) -> dict[str, float]:
        """Seconds the first fetch of each kernel template took, by template."""
        return dict(self._transport.kernels.first_fetch_s)

    @property
    def closed(self) -> bool:
        return self._transport.closed

    # ---- checks ---------------------------------------------------------------

    def _check_same_everywhere(self, gather: Callable[[Any], list], config: dict) -> None:
        """Every member must build the Buffer with the same arguments: the symmetric
        buffers' layout and the kernels depend on them. Raises on every rank alike."""
        everyone = gather(config)
        differ = sorted({k for other in everyone for k in config if other.get(k) != config[k]})
        if differ:
            ranks = [r for r, other in enumerate(everyone) if other != everyone[0]]
            raise ValueError(f"group: expected every member to pass the same {', '.join(differ)}; ranks {ranks} "
                             f"differ from rank 0 ({ {k: everyone[0][k] for k in differ} } vs "
                             f"{ {k: everyone[r][k] for k in differ for r in ranks[:1]} })")

    def _tensor(self, name: str, t: Any, dtype: str, shape: tuple, adapter: Adapter,
                vectors: bool = False) -> TensorView:
        """The view of `t` once every check passes. `vectors`: a row tensor the kernels
        move in 16-byte vectors; it must be 16-byte aligned."""
        if framework_of(t) != adapter.name:
            raise TypeError(f"{name}: expected a {adapter.name} tensor like x, got "
                            f"{type(t).__module__}.{type(t).__name__}")
        return self._check_view(name, adapter.describe(t), dtype, shape, vectors)

    def _check_view(self, name: str, v: TensorView, dtype: str, shape: tuple, vectors: bool = False) -> TensorView:
        if v.fits(self.device, dtype, shape, vectors):
            return v  # the common case: one test
        if v.device != self.device:
            raise ValueError(f"{name}: expected a tensor on cuda:{self.device}, got device {v.device}")
        if v.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype}, got {v.dtype}")
        if v.shape != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(v.shape)}")
        if not v.contiguous:
            raise ValueError(f"{name}: expected a contiguous tensor, got strides that are not row-major")
        raise ValueError(f"{name}: expected a 16-byte aligned address, got one with address % 16 = {v.ptr % 16}")

    def raise_pending(self) -> None:
        """Raise what earlier non-blocking dispatches found on the device: an expert id
        outside [-1, E) on some rank, or more rows than the capacity (those rows were
        dropped). Local, not collective: synchronise the stream first."""
        self._transport.raise_pending()

    # ---- dispatch ---------------------------------------------------------------

    def dispatch(self, x: Any, topk_idx: Any, topk_weights: Any, scales: Any = None, stream: Any = None,
                 capacity: int | None = None, *, layout: str = "token", pad_multiple: int | None = None,
                 out: DispatchResult | None = None) -> DispatchResult:
        """Send every token to the ranks that hold its experts.

        `layout="token"` (default): one row per (token, receiving rank), ordered by (source
        rank, source token); recv_topk_idx / recv_topk_weights say which local experts it is for.
        `layout="expert"`: one row per (token, local expert) pair, grouped by local expert for a
        grouped GEMM: expert e's rows fill [off_e, off_e + n_e) with off_0 = 0 and
        off_{e+1} = ceil((off_e + n_e) / pad_multiple) * pad_multiple, ordered by (source rank,
        source token, k) within a segment; every other row is zero with weight 0.
        `recv_weights [rows]` holds each row's weight, `expert_offsets [E/R + 1]` the segment
        starts (also `handle.expert_offsets_list` in default mode), `tokens_per_expert` the real
        counts. pad_multiple (default 1) is a runtime value: any P compiles nothing new.

        Default mode: the host waits for the count exchange only and returns exact-size outputs.
        Expert ids outside [-1, E) on any rank are found during the count exchange: every
        rank raises ValueError naming the rank and position, and no token moves.
        `capacity=N` (nvlink transport): never synchronises; outputs have N rows (token layout:
        rows past the count are zero, with ids -1 and weights 0; expert layout: rows past the
        last segment are zero) and the count is `handle.recv_offsets[R]` on the device.
        Sequence numbers live on the device, so dispatch and combine can be captured in a CUDA
        graph and replayed. The device records bad ids (they are skipped) and rows past the
        capacity (dropped): bad ids are raised by the next default-mode dispatch or by
        `raise_pending()`, dropped rows by `raise_pending()` alone.

        `out`: the result of an earlier non-blocking dispatch of this Buffer with the same
        number of tokens, capacity, layout and pad_multiple, not recorded for autograd. This
        dispatch overwrites its tensors and handle (after the work queued before it on the
        stream) and returns it, so a decode loop allocates nothing; its previous contents and
        handle are gone, so combine it first. On the current stream with inputs of the shapes
        `out` was made for, its checks take one pass (so do combine's, into its `out`).

        Differentiable when x (bf16) or topk_weights requires grad: see ep_jit/autograd.py.
        """
        if out is not None and self._dispatch_again(x, topk_idx, topk_weights, scales, stream, capacity, layout,
                                                    pad_multiple, out):
            return out
        if layout not in ("token", "expert"):
            raise ValueError(f"layout: expected 'token' or 'expert', got {layout!r}")
        if layout == "token" and pad_multiple is not None:
            raise ValueError(f"pad_multiple: expected None with layout='token', got {pad_multiple!r}")
        if layout == "expert":
            self._require("expert layout", "layout")
            pad_multiple = 1 if pad_multiple is None else _positive("pad_multiple", pad_multiple)
        grad = needs_grad(x, topk_weights)
        if out is not None:
            self._check_out_result(out, grad, capacity, layout, pad_multiple)
        if not grad:
            return self.dispatch_raw(x, topk_idx, topk_weights, scales, stream, capacity, layout, pad_multiple, out)
        self._require("autograd", "x")
        if self.dtype == "fp8_e4m3" and needs_grad(x):
            raise ValueError("x: fp8 dispatch has no gradient with respect to x; expected an fp8 x that does not "
                             "require grad (the weights may)")
        return autograd.dispatch(self, x, topk_idx, topk_weights, scales, stream, capacity, layout, pad_multiple)

    def dispatch_raw(self, x: Any, topk_idx: Any, topk_weights: Any, scales: Any, stream: Any,
                     capacity: int | None, layout: str, pad_multiple: int | None,
                     out: DispatchResult | None = None) -> DispatchResult:
        """dispatch without autograd (its checks are dispatch's)."""
        self._transport.check_error()
        adapter = adapter_for(x)
        xv = adapter.describe(x)
        shape = xv.shape
        if len(shape) != 2 or shape[1] != self.hidden:
            raise ValueError(f"x: expected shape [T, {self.hidden}], got {list(shape)}")
        T, H, K = shape[0], self.hidden, self.topk
        if T > self.max_tokens:
            raise ValueError(f"x: expected at most max_tokens_per_rank={self.max_tokens} tokens, got {T}")
        self._check_view("x", xv, self.dtype, (T, H), vectors=True)
        idx = self._tensor("topk_idx", topk_idx, "int64", (T, K), adapter)
        weights = self._tensor("topk_weights", topk_weights, "float32", (T, K), adapter)
        sv = None
        if self.dtype == "fp8_e4m3":
            if scales is None:
                raise ValueError(f"scales: expected float32 [T, {H // SCALE_BLOCK}] for fp8 dispatch, got None")
            sv = self._tensor("scales", scales, "float32", (T, H // SCALE_BLOCK), adapter, vectors=True)
        elif scales is not None:
            raise ValueError("scales: expected None for a bf16 Buffer, got a tensor")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or
                                     not 0 <= capacity <= MAX_CAPACITY):
            raise ValueError(f"capacity: expected an int in [0, {MAX_CAPACITY}] or None, got {capacity!r}")
        if out is not None and (out.handle.num_tokens, out.handle.framework) != (T, adapter.name):
            raise ValueError(f"out: expected the result of a dispatch of {T} {adapter.name} tokens, got one of "
                             f"{out.handle.num_tokens} {out.handle.framework} tokens")
        op = self._operation(stream, adapter)
        self._transport.check_operation(op, capacity)
        use_device(self.device)
        result, keep = self._transport.dispatch(op, xv, idx, weights, sv, capacity,
                                                pad_multiple if layout == "expert" else None, out)
        result.handle.buffer_id = self.id
        if op.foreign_stream is not None or self._retained:
            self._retain(op.foreign_stream, [x, topk_idx, topk_weights, scales, *keep])
        return result

    def _dispatch_again(self, x: Any, topk_idx: Any, topk_weights: Any, scales: Any, stream: Any,
                        capacity: Any, layout: Any, pad_multiple: Any, out: Any) -> bool:
        """A decode loop's dispatch into `out` on the current stream, with inputs of the shapes it
        was made for: checked in one pass and launched. False, with nothing done, for anything
        else; dispatch then checks everything as usual, and raises or runs (so every error comes
        from one place, and this path accepts nothing that one would refuse)."""
        h = out.handle if type(out) is DispatchResult else None
        if type(h) is not Handle or h.buffer_id != self.id or h.num_recv is not None or h.recorded or \
                stream is not None or self._retained or type(capacity) is not int or capacity != h.capacity or \
                layout != h.layout:
            return False
        if pad_multiple is None:
            same_pad = layout == "token" or h.pad_multiple == 1
        else:
            same_pad = layout == "expert" and type(pad_multiple) is int and pad_multiple == h.pad_multiple
        if not same_pad or framework_of(x) != h.framework or needs_grad(x, topk_weights):
            return False
        adapter, T, H, K, dev = adapter_for(x), h.num_tokens, self.hidden, self.topk, self.device
        x_ptr = adapter.address_if(x, dev, self.dtype, (T, H), True)
        idx_ptr = adapter.address_if(topk_idx, dev, "int64", (T, K), False)
        weights_ptr = adapter.address_if(topk_weights, dev, "float32", (T, K), False)
        fp8 = self.dtype == "fp8_e4m3"
        scales_ptr = adapter.address_if(scales, dev, "float32", (T, H // SCALE_BLOCK), True) if fp8 else 0
        if not (x_ptr and idx_ptr and weights_ptr) or (not scales_ptr if fp8 else scales is not None):
            return False
        self._transport.check_error()  # what the full path would raise first, all else being well
        use_device(dev)
        return self._transport.dispatch_again(adapter, resolve_stream(None, adapter, dev), out, x_ptr, idx_ptr,
                                              weights_ptr, scales_ptr)

    def _check_out_result(self, out: Any, grad: bool, capacity: int | None, layout: str,
                          pad_multiple: int | None) -> None:
        """`out` of dispatch: a result this dispatch may overwrite (the rest, with the tokens)."""
        if not isinstance(out, DispatchResult):
            raise TypeError(f"out: expected a DispatchResult of this Buffer, got {type(out).__name__}")
        self._check_owner(out.handle, "out")
        if grad:
            raise ValueError("out: expected inputs that do not require grad; a dispatch into out= is not recorded "
                             "for autograd")
        h = out.handle
        if capacity is None:
            raise ValueError("out: expected capacity=N with out= (outputs of a fixed size), got capacity=None")
        if h.num_recv is not None:
            raise ValueError("out: expected the result of a non-blocking dispatch, got one of a default-mode dispatch")
        if h.recorded:
            raise ValueError("out: expected a result whose handle autograd does not hold (a backward pass will read "
                             "it), got one recorded by a dispatch or combine")
        want, got = (capacity, layout, pad_multiple or 1), (h.capacity, h.layout, h.pad_multiple)
        if want != got:
            raise ValueError(f"out: expected a result with (capacity, layout, pad_multiple) = {want}, got {got}")

    def _operation(self, stream: Any, adapter: Adapter) -> Operation:
        """The operation's stream, and the same handle again if it is not the framework's
        current stream (allocations must then be tied to it)."""
        s = resolve_stream(stream, adapter, self.device)
        return _operation((adapter, s, None if stream is None or s == adapter.current_stream(self.device) else s))

    def _retain(self, foreign: int | None, tensors: list) -> None:
        """On a stream other than the framework's current one, the framework's allocator
        could hand these tensors' memory out again while the kernels still use it (Paddle
        has no record_stream). Hold them until an event recorded after the kernels fires."""
        if self._retained:
            self._retained = [(ev, refs) for ev, refs in self._retained if not _event_done(ev)]
        if foreign is not None:
            event = check(driver.cuEventCreate(driver.CUevent_flags.CU_EVENT_DISABLE_TIMING), "cuEventCreate")
            check(driver.cuEventRecord(event, foreign), "cuEventRecord")
            self._retained.append((event, tensors))

    # ---- combine ----------------------------------------------------------------

    def combine(self, y: Any, handle: Handle, stream: Any = None, *, out: Any = None) -> Any:
        """Bring expert outputs back, as bf16 [T, hidden], accumulated in fp32 in a fixed order.
        Token layout: out[t] = sum over receiving ranks of their row for t. Expert layout:
        out[t] = sum_k w[t, k] * y[row(t, k)] (each rank sums its pairs of t in k order and
        rounds once to bf16; the source sums the ranks in rank order). Differentiable when y,
        or the expert layout's weights, require grad. `out`: a bf16 [T, hidden] tensor to write
        and return instead of a new one (not recorded for autograd)."""
        if out is not None and self._combine_again(y, handle, stream, out):
            return out
        self._check_handle(handle, "handle")
        weights = handle.weights_node if handle.layout == "expert" else None
        if needs_grad(y, weights):
            if out is not None:
                raise ValueError("out: expected y (and the routed weights) not to require grad; a combine into "
                                 "out= is not recorded for autograd")
            return autograd.combine(self, y, handle, stream)
        return self._combine(y, handle, stream, True, None, out)[0]

    def _combine_again(self, y: Any, handle: Any, stream: Any, out: Any) -> bool:
        """combine into `out` on the current stream, checked in one pass and launched; False,
        with nothing done, unless every check passes (as _dispatch_again)."""
        if type(handle) is not Handle or handle.buffer_id != self.id or stream is not None or self._retained:
            return False
        if framework_of(y) != handle.framework or \
                needs_grad(y, handle.weights_node if handle.layout == "expert" else None):
            return False
        adapter, H, dev = adapter_for(y), self.hidden, self.device
        y_ptr = adapter.address_if(y, dev, "bf16", (handle.capacity, H), True)
        out_ptr = adapter.address_if(out, dev, "bf16", (handle.num_tokens, H), True)
        if not (y_ptr and out_ptr):
            return False
        self._transport.check_error()
        use_device(dev)
        return self._transport.combine_again(adapter, resolve_stream(None, adapter, dev), handle, y_ptr, out_ptr)

    def _check_handle(self, handle: Any, name: str) -> None:
        self._transport.check_error()
        self._check_owner(handle, name)

    def _check_owner(self, handle: Any, name: str) -> None:
        if not isinstance(handle, Handle) or handle.buffer_id != self.id:
            raise ValueError(f"{name}: expected a handle from this Buffer (id {self.id}), got "
                             f"{getattr(handle, 'buffer_id', type(handle).__name__)}")

    def _adapter(self, name: str, t: Any, handle: Handle) -> Adapter:
        adapter = adapter_for(t)
        if adapter.name != handle.framework:
            raise TypeError(f"{name}: expected a {handle.framework} tensor like the dispatch inputs, got {adapter.name}")
        return adapter

    def _require(self, feature: str, argument: str) -> None:
        """Raise before any launch if this Buffer's transport lacks `feature`."""
        if feature not in self._transport.features:
            raise ValueError(f"{argument}: transport={self.transport!r} does not support the {feature} yet; "
                             "use transport='nvlink' (every member in one NVLink domain) for it")

    def combine_raw(self, y: Any, handle: Handle, stream: Any, weights: bool, scalars: Any) -> tuple[Any, Any]:
        """combine without autograd. `weights` (expert layout): apply the pairs' weights, else 1.
        `scalars`: per-pair fp32 values to bring home with the rows ([rows] in the expert layout,
        [rows, K] in the token layout, entries of other ranks' experts ignored); their sum per
        source pair comes back as the second result, [T, K] (else None). `y` None (with
        scalars): only the scalars move, and the first result is None."""
        self._check_handle(handle, "handle")
        if y is None and scalars is None:
            raise ValueError("y: expected a tensor, or scalars to bring home alone, got neither")
        return self._combine(y, handle, stream, weights, scalars, None)

    def _combine(self, y: Any, handle: Handle, stream: Any, weights: bool, scalars: Any,
                 out: Any) -> tuple[Any, Any]:
        """combine_raw once the handle is checked; into `out` when given."""
        adapter = self._adapter("y" if y is not None else "scalars", y if y is not None else scalars, handle)
        yv = sv = None
        if y is not None:
            yv = self._tensor("y", y, "bf16", (handle.capacity, self.hidden), adapter, vectors=True)
        if scalars is not None:
            self._require("autograd", "scalars")
            shape = (handle.capacity,) if handle.layout == "expert" else (handle.capacity, self.topk)
            sv = self._tensor("scalars", scalars, "float32", shape, adapter)
        if out is not None:
            self._tensor("out", out, "bf16", (handle.num_tokens, self.hidden), adapter, vectors=True)
        op = self._operation(stream, adapter)
        use_device(self.device)
        result, scalars_out, keep = self._transport.combine(op, yv, handle, handle.capacity, weights, sv, out)
        if op.foreign_stream is not None or self._retained:
            self._retain(op.foreign_stream, [y, scalars, out, handle, *keep])
        return result, scalars_out

    def restage(self, g: Any, handle: Handle, stream: Any = None) -> Any:
        """Move bf16 rows g [T, hidden] (one per source token, such as combine's output
        gradient) to where `handle`'s dispatch put the tokens: [rows, hidden], each pair's row
        in the expert layout, zero elsewhere. Collective; reuses the dispatch's layout (no count
        exchange)."""
        self._check_handle(handle, "handle")
        self._require("autograd", "g")
        adapter = self._adapter("g", g, handle)
        gv = self._tensor("g", g, "bf16", (handle.num_tokens, self.hidden), adapter, vectors=True)
        op = self._operation(stream, adapter)
        use_device(self.device)
        out, keep = self._transport.restage(op, gv, handle)
        if op.foreign_stream is not None or self._retained:
            self._retain(op.foreign_stream, [g, handle, *keep])
        return out

    # ---- teardown ---------------------------------------------------------------

    def close(self, wait_for_peers: bool = True) -> None:
        """Free what the Buffer holds. Collective by default: a peer may still be reading this
        rank's memory until it has finished its last operation. `wait_for_peers=False` (for a
        group that is already broken; also what a PeerTimeout and garbage collection do) frees
        what only this rank uses and keeps the buffer its peers can reach until process exit."""
        self._transport.close(wait_for_peers)

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
