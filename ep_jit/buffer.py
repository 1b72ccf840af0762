"""ep_jit.Buffer: expert-parallel dispatch and combine for one EP group and model shape.

Every operation is collective: all members call dispatch/combine in the same order.
Each operation runs entirely on one stream, the one `frameworks.resolve_stream`
returns. The Buffer checks every argument before any launch; a transport
(ep_jit/transports/) moves the tokens.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

from cuda.bindings import driver

from .errors import PeerTimeout
from .frameworks import Adapter, TensorView, adapter_for, bind_group, framework_of, resolve_stream, view
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


_ids = itertools.count(1)


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


class Buffer:
    def __init__(self, group: Any, hidden: int, num_experts: int, topk: int, max_tokens_per_rank: int,
                 dtype: str = "bf16", num_sms: int = 24, *, transport: str = "nvlink", device: int | None = None,
                 all_gather: Callable[[Any], list] | None = None, timeout_s: float = 60.0) -> None:
        """`group`: a torch or paddle process group, or a GroupInfo (then pass `device` and,
        for more than one member, `all_gather(obj) -> list` in group-rank order).

        `transport`: "nvlink" (every member in this NVLink domain, verified; TopologyError
        otherwise) or "collective" (the group framework's all_to_all; any topology, needs a
        torch or paddle group and that framework's tensors). `timeout_s`: how long a rank
        waits for its peers before PeerTimeout (with "collective", for the count exchange;
        the group's own timeout governs its collectives)."""
        transport_type = transport_class(transport)
        bound = bind_group(group, device, all_gather)
        self.group, R = bound.info, bound.info.size
        self.hidden, self.num_experts, self.topk, self.transport = hidden, num_experts, topk, transport
        self.max_tokens = _positive("max_tokens_per_rank", max_tokens_per_rank)
        self.dtype = canonical_dtype(dtype)
        _positive("num_experts", num_experts)  # the rest of the shape is checked by KernelSpec
        _positive("num_sms", num_sms)
        transport_type.check_setup(group, R, num_sms)
        if R > MAX_RANKS or num_experts // R > MAX_LOCAL_EXPERTS:
            raise ValueError(f"group: expected at most {MAX_RANKS} ranks and {MAX_LOCAL_EXPERTS} experts per rank, "
                             f"got {R} ranks and {num_experts} experts")
        self.device = bound.device
        self._check_same_everywhere(bound.gather, dict(members=list(self.group.members), hidden=hidden,
                                                       num_experts=num_experts, topk=topk, dtype=self.dtype,
                                                       max_tokens_per_rank=self.max_tokens, num_sms=num_sms,
                                                       transport=transport))
        use_device(self.device)
        sm_count = device_attribute(self.device, driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        self.num_sms = num_sms
        if num_sms > sm_count:
            raise ValueError(f"num_sms: expected at most the device's {sm_count} SMs, got {num_sms}")
        self.id = next(_ids)
        self._transport = transport_type(Setup(bound, hidden, num_experts, topk, self.dtype, self.max_tokens,
                                               num_sms, timeout_s, device_arch(self.device)))
        self._retained: list[tuple[Any, list]] = []

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

    def _tensor(self, name: str, t: Any, dtype: str, shape: tuple, framework: str, vectors: bool = False,
                adapter: Adapter | None = None) -> TensorView:
        """The view of `t` once every check passes. `vectors`: a row tensor the kernels
        move in 16-byte vectors; it must be 16-byte aligned."""
        if framework_of(t) != framework:
            raise TypeError(f"{name}: expected a {framework} tensor like x, got {type(t).__module__}.{type(t).__name__}")
        v = view(t, adapter)
        if v.device != self.device:
            raise ValueError(f"{name}: expected a tensor on cuda:{self.device}, got device {v.device}")
        if v.dtype != dtype:
            raise TypeError(f"{name}: expected dtype {dtype}, got {v.dtype}")
        if v.shape != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(v.shape)}")
        if not v.contiguous:
            raise ValueError(f"{name}: expected a contiguous tensor, got strides that are not row-major")
        if vectors and v.ptr % 16:
            raise ValueError(f"{name}: expected a 16-byte aligned address, got one with address % 16 = {v.ptr % 16}")
        return v

    def raise_pending(self) -> None:
        """Raise what earlier non-blocking dispatches found on the device: an expert id
        outside [-1, E) on some rank, or more rows than the capacity (those rows were
        dropped). Local, not collective: synchronise the stream first."""
        self._transport.raise_pending()

    # ---- dispatch ---------------------------------------------------------------

    def dispatch(self, x: Any, topk_idx: Any, topk_weights: Any, scales: Any = None, stream: Any = None,
                 capacity: int | None = None) -> DispatchResult:
        """Send every token to the ranks that hold its experts.

        Default: the host waits for the count exchange only and returns exact-size outputs.
        Expert ids outside [-1, E) on any rank are found during the count exchange: every
        rank raises ValueError naming the rank and position, and no token moves.
        `capacity=N` (nvlink transport): never synchronises; outputs have N rows (rows past
        the count are marked empty: ids -1, weights 0) and the count is
        `handle.recv_offsets[R]` on the device. Sequence numbers live on the device, so
        dispatch and combine can be captured in a CUDA graph and replayed. The device
        records bad ids (they are skipped) and rows past the capacity (dropped;
        recv_offsets[R] still holds the full count); the next default-mode dispatch or
        `raise_pending()` raises them.
        """
        self._transport.check_error()
        adapter = adapter_for(x)
        fw = adapter.name
        shape = adapter.shape(x)
        if len(shape) != 2 or shape[1] != self.hidden:
            raise ValueError(f"x: expected shape [T, {self.hidden}], got {list(shape)}")
        T, H, K = shape[0], self.hidden, self.topk
        if T > self.max_tokens:
            raise ValueError(f"x: expected at most max_tokens_per_rank={self.max_tokens} tokens, got {T}")
        xv = self._tensor("x", x, self.dtype, (T, H), fw, vectors=True, adapter=adapter)
        idx = self._tensor("topk_idx", topk_idx, "int64", (T, K), fw, adapter=adapter)
        weights = self._tensor("topk_weights", topk_weights, "float32", (T, K), fw, adapter=adapter)
        sv = None
        if self.dtype == "fp8_e4m3":
            if scales is None:
                raise ValueError(f"scales: expected float32 [T, {H // SCALE_BLOCK}] for fp8 dispatch, got None")
            sv = self._tensor("scales", scales, "float32", (T, H // SCALE_BLOCK), fw, vectors=True, adapter=adapter)
        elif scales is not None:
            raise ValueError("scales: expected None for a bf16 Buffer, got a tensor")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
            raise ValueError(f"capacity: expected a non-negative int or None, got {capacity!r}")
        op = self._operation(stream, adapter)
        self._transport.check_operation(op, capacity)
        use_device(self.device)
        result, keep = self._transport.dispatch(op, xv, idx, weights, sv, capacity)
        result.handle.buffer_id = self.id
        self._retain(op.foreign_stream, [x, topk_idx, topk_weights, scales, *keep])
        return result

    def _operation(self, stream: Any, adapter: Adapter) -> Operation:
        """The operation's stream, and the same handle again if it is not the framework's
        current stream (allocations must then be tied to it)."""
        s = resolve_stream(stream, adapter, self.device)
        return Operation(adapter, s, None if stream is None or s == adapter.current_stream(self.device) else s)

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

    def combine(self, y: Any, handle: Handle, stream: Any = None) -> Any:
        """Bring expert outputs back: out[t] = sum over receiving ranks of their row for t,
        accumulated in fp32, returned as bf16 [T, hidden]."""
        self._transport.check_error()
        if not isinstance(handle, Handle) or handle.buffer_id != self.id:
            raise ValueError(f"handle: expected a handle from this Buffer (id {self.id}), got "
                             f"{getattr(handle, 'buffer_id', type(handle).__name__)}")
        adapter = adapter_for(y)
        if adapter.name != handle.framework:
            raise TypeError(f"y: expected a {handle.framework} tensor like the dispatch inputs, got {adapter.name}")
        rows = handle.num_recv if handle.num_recv is not None else handle.capacity
        yv = self._tensor("y", y, "bf16", (rows, self.hidden), adapter.name, vectors=True, adapter=adapter)
        op = self._operation(stream, adapter)
        use_device(self.device)
        out, keep = self._transport.combine(op, yv, handle, rows)
        self._retain(op.foreign_stream, [y, handle.token_slot, handle.recv_offsets, handle.transport, *keep])
        return out

    # ---- teardown ---------------------------------------------------------------

    def close(self, wait_for_peers: bool = True) -> None:
        """Free what the Buffer holds (also done at exit, and at once when a peer times
        out). Collective by default: a peer may still be reading this rank's memory until
        it has finished its last operation. `wait_for_peers=False` frees without waiting,
        for a group that is already broken."""
        self._transport.close(wait_for_peers)

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
