"""ep_jit.Buffer: intra-node expert-parallel dispatch and combine over NVLink.

One Buffer per EP group and model shape. Every operation is collective: all members
call dispatch/combine in the same order. Each operation runs entirely on one stream,
the one `frameworks.resolve_stream` returns.
"""

from __future__ import annotations

import ctypes
import itertools
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from cuda.bindings import driver

from .errors import EPJitError
from .frameworks import Adapter, adapter_for, group_device, object_all_gather, resolve_stream
from .group import GroupInfo
from .jit import get_kernel
from .kernels import MAX_LOCAL_EXPERTS, MAX_RANKS, SIGNATURES, Mailbox, Status, buffer_specs
from .runtime import Module, check, device_arch, device_attribute, quiesce, use_device
from .spec import canonical_dtype
from .symmetric import SymmetricBuffer, plan_layout

PHASES = {1: "dispatch staging (waiting for peers to finish reading the previous stage)",
          2: "count exchange", 3: "combine push (waiting for peers to finish the previous combine)",
          4: "combine reduce (waiting for peers' expert outputs)"}
LAYOUT_THREADS, COPY_THREADS, NOTIFY_THREADS = 256, 512, 128


def _event_done(event: Any) -> bool:
    (err,) = driver.cuEventQuery(event)
    if err == driver.CUresult.CUDA_ERROR_NOT_READY:
        return False
    check((err,), "cuEventQuery")
    check(driver.cuEventDestroy(event), "cuEventDestroy")
    return True


def _free_buffer(device: int, workspace: Any, mailbox: int) -> None:
    if not quiesce(device):
        return
    driver.cuMemFree(workspace)
    driver.cuMemFreeHost(mailbox)


class PeerTimeout(EPJitError):
    """A peer did not reach a phase in time; the Buffer cannot be used any more."""


@dataclass
class Handle:
    """What combine needs to know about one dispatch."""

    buffer_id: int
    framework: str
    num_tokens: int
    token_slot: Any            # [T, R] int32: slot of token t at rank r, or -1
    is_token_in_rank: Any      # [T, R] bool
    recv_offsets: Any          # [R + 1] int32: first received row of each source; [R] is the total
    num_recv: int | None       # received rows (None in non-blocking mode: read recv_offsets[R])
    capacity: int              # rows of the receive tensors
    recv_from: list[int] | None
    tokens_per_expert_list: list[int] | None


class DispatchResult(NamedTuple):
    recv_x: Any
    recv_topk_idx: Any
    recv_topk_weights: Any
    recv_scales: Any
    tokens_per_expert: Any
    handle: Handle


_ids = itertools.count(1)


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


class Buffer:
    def __init__(self, group: Any, hidden: int, num_experts: int, topk: int, max_tokens_per_rank: int,
                 dtype: str = "bf16", num_sms: int = 24, *, device: int | None = None,
                 all_gather: Callable[[Any], list] | None = None, timeout_s: float = 60.0) -> None:
        """`group`: a torch or paddle process group, or a GroupInfo (then pass `device` and,
        for more than one member, `all_gather(obj) -> list` in group-rank order)."""
        self.group = GroupInfo.resolve(group)
        R = self.group.size
        self.hidden, self.num_experts, self.topk = hidden, num_experts, topk
        self.max_tokens = _positive("max_tokens_per_rank", max_tokens_per_rank)
        self.dtype = canonical_dtype(dtype)
        _positive("num_experts", num_experts)  # the rest of the shape is checked by KernelSpec
        if R > MAX_RANKS or num_experts // R > MAX_LOCAL_EXPERTS:
            raise ValueError(f"group: expected at most {MAX_RANKS} ranks and {MAX_LOCAL_EXPERTS} experts per rank, "
                             f"got {R} ranks and {num_experts} experts")
        self.device = device if device is not None else group_device(group)
        if self.device is None:
            raise ValueError("device: expected the CUDA device ordinal when group is a GroupInfo, got None")
        gather = all_gather or object_all_gather(group, R)
        if gather is None:
            if R > 1:
                raise ValueError("all_gather: expected a callable when group is a GroupInfo of more than one member")
            gather = lambda obj: [obj]  # noqa: E731
        self._check_same_everywhere(gather, dict(members=list(self.group.members), hidden=hidden,
                                                 num_experts=num_experts, topk=topk, dtype=self.dtype,
                                                 max_tokens_per_rank=self.max_tokens, num_sms=num_sms))
        use_device(self.device)
        sm_count = device_attribute(self.device, driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        self.num_sms = _positive("num_sms", num_sms)
        if num_sms > sm_count:
            raise ValueError(f"num_sms: expected at most the device's {sm_count} SMs, got {num_sms}")
        self.timeout_ns = int(timeout_s * 1e9)
        self.timeout_s = timeout_s
        self.id = next(_ids)

        # every kernel this Buffer will launch: compiled or loaded now, never on a later call
        specs = buffer_specs(hidden=hidden, num_experts=num_experts, topk=topk, dtype=self.dtype,
                             members=self.group.members, arch=device_arch(self.device))
        self.modules = {s.template: Module(get_kernel(s), self.device, SIGNATURES[s.template]) for s in specs}

        elem = 1 if self.dtype == "fp8_e4m3" else 2
        self.layout, size = plan_layout(num_ranks=R, num_experts=num_experts, hidden=hidden, topk=topk,
                                        max_tokens=self.max_tokens, elem_size=elem)
        self._gather = gather
        self.sym = SymmetricBuffer(self.group, size, self.device, gather)
        # counters[4], status[4], sequences[2] + pad, tokens per rank, tokens per expert
        ws_bytes = 4 * (12 + R + num_experts)
        self._workspace = check(driver.cuMemAlloc(ws_bytes), "cuMemAlloc(workspace)")
        check(driver.cuMemsetD8(self._workspace, 0, ws_bytes), "cuMemsetD8(workspace)")
        ws = int(self._workspace)
        self._counters, self._status_words, self._seqs = ws, ws + 16, ws + 32
        self._tokens_per_rank, self._tokens_per_expert = ws + 48, ws + 48 + 4 * R
        self._host_mailbox = check(driver.cuMemHostAlloc(ctypes.sizeof(Mailbox), driver.CU_MEMHOSTALLOC_DEVICEMAP |
                                                         driver.CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc(mailbox)")
        ctypes.memset(self._host_mailbox, 0, ctypes.sizeof(Mailbox))
        self.mailbox = Mailbox.from_address(self._host_mailbox)
        self._mailbox_dev = int(check(driver.cuMemHostGetDevicePointer(self._host_mailbox, 0),
                                      "cuMemHostGetDevicePointer"))
        self._status = Status(self._status_words, self._mailbox_dev + Mailbox.status.offset)
        self._finalizer = weakref.finalize(self, _free_buffer, self.device, self._workspace, self._host_mailbox)
        self._retained: list[tuple[Any, list]] = []
        self._tickets = 0  # host-side id of each default-mode dispatch, echoed by the count exchange
        self.closed = False

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

    def _check_error(self) -> None:
        """Raise if a kernel gave up waiting for a peer."""
        if self.closed:
            raise EPJitError("Buffer: it is closed")
        error = self.mailbox.status[0]
        if error:
            phase, peer = error >> 16, (error & 0xFFFF) - 1
            self.close(wait_for_peers=False)  # the group is broken: free everything now
            raise PeerTimeout(f"rank {peer} (global rank {self.group.members[peer]}) did not respond within "
                              f"{self.timeout_s:g} s in {PHASES.get(phase, phase)}; this Buffer is unusable")

    def raise_pending(self) -> None:
        """Raise what earlier non-blocking dispatches found on the device: an expert id
        outside [-1, E) on some rank, or more rows than the capacity (those rows were
        dropped). Local, not collective: synchronise the stream first."""
        self._check_error()
        overflow = self.mailbox.status[2]
        if self.mailbox.bad_source:
            self._raise_bad_topk(None, None)
        if overflow:
            self._clear_status(2)
            raise ValueError(f"capacity: expected at least {overflow} rows for an earlier non-blocking dispatch; "
                             "the rows past the capacity were dropped")

    def _raise_bad_topk(self, adapter: Adapter | None, topk_idx: Any) -> None:
        """A rank passed an expert id outside [-1, E): every rank raises, naming it."""
        source, flat = self.mailbox.bad_source - 1, self.mailbox.bad_index - 1
        self.mailbox.bad_source = self.mailbox.bad_index = 0
        self._clear_status(1)
        where = f"[{flat // self.topk}, {flat % self.topk}]"
        if source == self.group.rank and topk_idx is not None:
            check(driver.cuCtxSynchronize(), "cuCtxSynchronize")
            value = ctypes.c_int64()
            check(driver.cuMemcpyDtoH(ctypes.addressof(value), adapter.pointer(topk_idx) + 8 * flat, 8),
                  "cuMemcpyDtoH(topk_idx)")
            raise ValueError(f"topk_idx: expected ids in [-1, {self.num_experts}), got {value.value} at {where}; "
                             "no token was moved")
        raise ValueError(f"topk_idx: expected ids in [-1, {self.num_experts}), but rank {source} passed an id outside "
                         f"that range at {where} of its topk_idx; no token of this dispatch was moved" +
                         ("" if topk_idx is not None else " (found by an earlier non-blocking dispatch)"))

    def _clear_status(self, word: int) -> None:
        self.mailbox.status[word] = 0
        check(driver.cuMemsetD32(self._status_words + 4 * word, 0, 1), "cuMemsetD32(status)")

    def _tensor(self, adapter: Adapter, name: str, t: Any, dtype: str, shape: tuple, framework: str) -> None:
        if type(t).__module__.split(".")[0] != framework:
            raise TypeError(f"{name}: expected a {framework} tensor like x, got {type(t).__module__}.{type(t).__name__}")
        if adapter.device(t) != self.device:
            raise ValueError(f"{name}: expected a tensor on cuda:{self.device}, got device {adapter.device(t)}")
        if adapter.dtype(t) != dtype:
            raise TypeError(f"{name}: expected dtype {dtype}, got {adapter.dtype(t)}")
        if adapter.shape(t) != shape:
            raise ValueError(f"{name}: expected shape {list(shape)}, got {list(adapter.shape(t))}")
        if not adapter.is_contiguous(t):
            raise ValueError(f"{name}: expected a contiguous tensor, got strides that are not row-major")

    # ---- dispatch ---------------------------------------------------------------

    def dispatch(self, x: Any, topk_idx: Any, topk_weights: Any, scales: Any = None, stream: Any = None,
                 capacity: int | None = None) -> DispatchResult:
        """Send every token to the ranks that hold its experts.

        Default: the host waits for the count exchange only and returns exact-size outputs.
        Expert ids outside [-1, E) on any rank are found during the count exchange: every
        rank raises ValueError naming the rank and position, and no token moves.
        In non-blocking mode the device records such ids (they are skipped) and rows past
        the capacity (dropped; recv_offsets[R] still holds the full count); the next
        default-mode dispatch or `raise_pending()` raises them.
        `capacity=N`: never synchronises; outputs have N rows (rows past the count are
        marked empty: ids -1, weights 0) and the count is `handle.recv_offsets[R]` on the
        device. Sequence numbers live on the device, so dispatch and combine can be
        captured in a CUDA graph and replayed.
        """
        self._check_error()
        adapter = adapter_for(x)
        fw = adapter.name
        shape = adapter.shape(x)
        if len(shape) != 2 or shape[1] != self.hidden:
            raise ValueError(f"x: expected shape [T, {self.hidden}], got {list(shape)}")
        T, H, K, R = shape[0], self.hidden, self.topk, self.group.size
        if T > self.max_tokens:
            raise ValueError(f"x: expected at most max_tokens_per_rank={self.max_tokens} tokens, got {T}")
        self._tensor(adapter, "x", x, self.dtype, (T, H), fw)
        self._tensor(adapter, "topk_idx", topk_idx, "int64", (T, K), fw)
        self._tensor(adapter, "topk_weights", topk_weights, "float32", (T, K), fw)
        fp8 = self.dtype == "fp8_e4m3"
        if fp8:
            if scales is None:
                raise ValueError(f"scales: expected float32 [T, {H // 128}] for fp8 dispatch, got None")
            self._tensor(adapter, "scales", scales, "float32", (T, H // 128), fw)
        elif scales is not None:
            raise ValueError("scales: expected None for a bf16 Buffer, got a tensor")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0):
            raise ValueError(f"capacity: expected a non-negative int or None, got {capacity!r}")
        s, alloc = self._stream(stream, adapter)
        use_device(self.device)

        self._tickets += 1
        ticket = self._tickets if capacity is None else 0
        token_slot = adapter.empty((T, R), "int32", self.device, alloc)
        in_rank = adapter.empty((T, R), "bool", self.device, alloc)
        recv_offsets = adapter.empty((R + 1,), "int32", self.device, alloc)
        expert_counts = adapter.empty((self.num_experts // R,), "int32", self.device, alloc)
        p = adapter.pointer
        L, peers, status, rank, timeout = self.layout, self.sym.peer_table, self._status, self.group.rank, self.timeout_ns
        layout, notify, dispatch = self.modules["layout"], self.modules["notify"], self.modules["dispatch"]
        layout[0].launch(R, LAYOUT_THREADS, s, p(topk_idx), T, p(in_rank), p(token_slot), self._tokens_per_rank,
                         self._tokens_per_expert, status)
        dispatch[0].launch(self.num_sms, COPY_THREADS, s, p(x), p(scales) if fp8 else 0, p(topk_idx), p(topk_weights),
                           p(token_slot), T, peers, L, rank, self._seqs, timeout, status)
        notify[0].launch(1, NOTIFY_THREADS, s, self._tokens_per_rank, self._tokens_per_expert, peers, L, rank,
                         self._seqs, ticket, timeout, status, p(recv_offsets), p(expert_counts), self._mailbox_dev)

        num_recv = recv_from = per_expert = None
        if capacity is None:
            self._wait_for_counts(ticket)
            if self.mailbox.bad_source:  # every rank learns it here; release the stage, then raise
                dispatch[1].launch(self.num_sms, COPY_THREADS, s, 0, 0, 0, 0, -1, p(recv_offsets), peers, L, rank,
                                   self._seqs, status, self._counters)
                self._raise_bad_topk(adapter, topk_idx)
            num_recv = capacity = self.mailbox.recv_total
            recv_from = list(self.mailbox.recv_from[:R])
            per_expert = list(self.mailbox.tokens_per_expert[: self.num_experts // R])
        recv_x = adapter.empty((capacity, H), self.dtype, self.device, alloc)
        recv_idx = adapter.empty((capacity, K), "int64", self.device, alloc)
        recv_w = adapter.empty((capacity, K), "float32", self.device, alloc)
        recv_scales = adapter.empty((capacity, H // 128), "float32", self.device, alloc) if fp8 else None
        dispatch[1].launch(self.num_sms, COPY_THREADS, s, p(recv_x), p(recv_scales) if fp8 else 0, p(recv_idx),
                           p(recv_w), capacity, p(recv_offsets), peers, L, rank, self._seqs, status, self._counters)
        handle = Handle(self.id, fw, T, token_slot, in_rank, recv_offsets, num_recv, capacity, recv_from, per_expert)
        self._retain(alloc, [x, topk_idx, topk_weights, scales, token_slot, in_rank, recv_offsets, expert_counts,
                                  recv_x, recv_idx, recv_w, recv_scales])
        return DispatchResult(recv_x, recv_idx, recv_w, recv_scales, expert_counts, handle)

    def _stream(self, stream: Any, adapter: Adapter) -> tuple[int, int | None]:
        """The operation's stream, and the same handle again if it is not the framework's
        current stream (allocations must then be tied to it), else None."""
        s = resolve_stream(stream, adapter, self.device)
        return s, (None if stream is None or s == adapter.current_stream(self.device) else s)

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

    def _wait_for_counts(self, ticket: int) -> None:
        """Spin on mapped host memory until the count exchange of `ticket` has landed."""
        deadline = time.monotonic() + self.timeout_s + 1.0
        spins = 0
        while ctypes.c_int.from_address(self._host_mailbox).value != ticket:
            if self.mailbox.status[0]:
                self._check_error()
            spins += 1
            if spins > 10000:
                if time.monotonic() > deadline:
                    self.close(wait_for_peers=False)
                    raise PeerTimeout(f"count exchange: no answer from the device within {self.timeout_s + 1:g} s")
                time.sleep(20e-6)
        self._check_error()

    # ---- combine ----------------------------------------------------------------

    def combine(self, y: Any, handle: Handle, stream: Any = None) -> Any:
        """Bring expert outputs back: out[t] = sum over receiving ranks of their row for t,
        accumulated in fp32, returned as bf16 [T, hidden]."""
        self._check_error()
        if not isinstance(handle, Handle) or handle.buffer_id != self.id:
            raise ValueError(f"handle: expected a handle from this Buffer (id {self.id}), got "
                             f"{getattr(handle, 'buffer_id', type(handle).__name__)}")
        adapter = adapter_for(y)
        if adapter.name != handle.framework:
            raise TypeError(f"y: expected a {handle.framework} tensor like the dispatch inputs, got {adapter.name}")
        rows = handle.num_recv if handle.num_recv is not None else handle.capacity
        self._tensor(adapter, "y", y, "bf16", (rows, self.hidden), adapter.name)
        s, alloc = self._stream(stream, adapter)
        use_device(self.device)
        out = adapter.empty((handle.num_tokens, self.hidden), "bf16", self.device, alloc)
        p = adapter.pointer
        L, peers, status, rank, timeout = self.layout, self.sym.peer_table, self._status, self.group.rank, self.timeout_ns
        push, reduce = self.modules["combine"][0], self.modules["combine"][1]
        push.launch(self.num_sms, COPY_THREADS, s, p(y), rows, p(handle.recv_offsets), peers, L, rank, self._seqs,
                    timeout, status, self._counters + 4)
        reduce.launch(self.num_sms, COPY_THREADS, s, p(out), p(handle.token_slot), handle.num_tokens, peers, L, rank,
                      self._seqs, timeout, status, self._counters + 8)
        self._retain(alloc, [y, out, handle.token_slot, handle.recv_offsets])
        return out

    # ---- teardown ---------------------------------------------------------------

    def close(self, wait_for_peers: bool = True) -> None:
        """Free the symmetric buffer and the workspaces (also done at exit, and at once when
        a peer times out). Collective by default: a peer may still be reading this rank's
        memory until it has finished its last operation. `wait_for_peers=False` frees
        without waiting, for a group that is already broken."""
        if not self._finalizer.alive:
            return
        self.closed = True
        if wait_for_peers:
            use_device(self.device)
            check(driver.cuCtxSynchronize(), "cuCtxSynchronize")
            self._gather(None)  # barrier: every member has finished its last operation
        self.sym.close()
        self._finalizer()

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
