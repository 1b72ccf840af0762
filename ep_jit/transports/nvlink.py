"""The NVLink transport: every rank's symmetric buffer is open in every peer, senders
stage their tokens, receivers pull them, and combine pushes expert outputs back.

Flags with the group tag and device-side sequence numbers order the phases; a wait
that times out is reported in the status words and raised on the host as PeerTimeout.
"""

from __future__ import annotations

import ctypes
import operator
import weakref
from dataclasses import dataclass
from typing import Any

from cuda.bindings import driver

from ..errors import EPJitError, PeerTimeout
from ..frameworks import Adapter
from ..config import fused_dispatch_tokens
from ..kernels.args import CombineArgs, DispatchArgs, Mailbox, Peers, PullArgs, SendArgs, Workspace
from ..kernels.constants import NUM_FLAG_KINDS, PHASES, PULL_PHASE, SCALE_BLOCK, SEND_PHASE
from ..runtime import LoadedKernel, check, device_attribute, mapped_host_memory, quiesce, setup_stream, use_device
from ..symmetric import SymmetricBuffer, plan_layout
from .base import (ITEM_SIZES, ArrayLayout, Arrays, DispatchResult, Handle, Operation, Setup, Kernels,
                   bad_topk_message, next_ticket, wait_for_ticket)


@dataclass(slots=True)
class PairLayout:
    """The NVLink transport's part of a handle: where each received token row came from and,
    in the expert layout, where each of its pairs went (in the handle's arrays), and the
    kernels' arguments, packed once: a restage, a dispatch into the same outputs and every
    combine of the handle change only their own tensors."""

    expert_offsets: Any    # [E/R + 1] int32: segment starts (expert layout)
    expert_counts: Any     # [E/R] int32: pairs per local expert
    token_rows: int        # received token rows (default mode), else the most that can arrive
    args: DispatchArgs     # the dispatch's
    outputs: list[int]     # the addresses of its result's WRITTEN tensors
    combine_args: CombineArgs | None = None  # made at the first combine


def _written(expert: bool, fp8: bool) -> operator.itemgetter:
    names = (["recv_x", "recv_scales", "tokens_per_expert", "recv_weights", "expert_offsets"] if expert else
             ["recv_x", "recv_topk_idx", "recv_topk_weights", "recv_scales", "tokens_per_expert"])
    if not fp8:
        names.remove("recv_scales")
    return operator.itemgetter(*(DispatchResult._fields.index(name) for name in names))


# The tensors of a result that the kernels write, by (expert layout, fp8): what out= must still hold.
WRITTEN = {(expert, fp8): _written(expert, fp8) for expert in (False, True) for fp8 in (False, True)}


def segment_offsets(per_expert: list[int], pad_multiple: int) -> list[int]:
    """off_0 = 0, off_{e+1} = ceil((off_e + n_e) / P) * P: the expert layout's segment starts."""
    offsets = [0]
    for n in per_expert:
        offsets.append(-(-(offsets[-1] + n) // pad_multiple) * pad_multiple)
    return offsets


def _free(device: int, workspace: Any, mailbox: int) -> None:
    if not quiesce(device):
        return
    driver.cuMemFree(workspace)
    driver.cuMemFreeHost(mailbox)


class NVLinkTransport:
    templates = ("dispatch", "combine")
    features = frozenset({"expert layout", "autograd"})

    @staticmethod
    def check_setup(group: Any, size: int, num_sms: int) -> None:
        if num_sms < size + 1:  # the send kernel: R layout blocks beside the staging ones
            raise ValueError(f"num_sms: expected at least {size + 1} for the NVLink transport over {size} ranks, "
                             f"got {num_sms}")

    def __init__(self, setup: Setup) -> None:
        bound = setup.bound
        self.group, self.device, self._gather = bound.info, bound.device, bound.gather
        self.hidden, self.num_experts, self.topk, self.dtype = setup.hidden, setup.num_experts, setup.topk, setup.dtype
        self.num_sms, self.timeout_s = setup.num_sms, setup.timeout_s
        self.kernels = Kernels(setup, self.templates)  # fetched at first use
        self._resident: set[str] = set()  # kernels whose blocks were checked to fit at once
        self._fused_tokens = fused_dispatch_tokens() or -1  # 0: never, not even for T = 0
        self._layouts: dict[tuple[int, bool], ArrayLayout] = {}  # (T, expert layout): at most 2 per T
        self._max_tokens = setup.max_tokens
        self.layout, size = plan_layout(num_ranks=self.group.size, num_experts=self.num_experts, hidden=self.hidden,
                                        topk=self.topk, max_tokens=setup.max_tokens,
                                        elem_size=ITEM_SIZES[self.dtype])
        self.sym = SymmetricBuffer(self.group, self.layout, size, self.device, self._gather)
        self._workspace = check(driver.cuMemAlloc(ctypes.sizeof(Workspace)), "cuMemAlloc(workspace)")
        with setup_stream("workspace") as stream:
            check(driver.cuMemsetD8Async(self._workspace, 0, ctypes.sizeof(Workspace), stream),
                  "cuMemsetD8Async(workspace)")
        self._host_mailbox, mailbox_dev = mapped_host_memory(ctypes.sizeof(Mailbox), "mailbox")
        self.mailbox = Mailbox.from_address(self._host_mailbox)
        self._status = self.mailbox.status  # the status words' view, read by every operation
        self._finalizer = weakref.finalize(self, _free, self.device, self._workspace, self._host_mailbox)
        # what every kernel shares, set once; each operation fills in only its tensors
        peers = Peers(bases=self.sym.peer_table, layout=self.layout, ws=int(self._workspace), mailbox=mailbox_dev,
                      timeout_ns=int(setup.timeout_s * 1e9), rank=self.group.rank)
        # templates of every operation's arguments
        self._dispatch = DispatchArgs(send=SendArgs(peers=peers), pull=PullArgs(peers=peers))
        self._combine = CombineArgs(peers=peers)
        self._tickets = 0  # host-side id of each default-mode dispatch, echoed by the count exchange
        self._stale_status: set[int] = set()  # device status words to clear on the next operation's stream
        self._unraised_nonblocking = False
        self.closed = False

    def _resident_kernel(self, name: str) -> LoadedKernel:
        """Kernel `name`, whose blocks wait for flags that other blocks of the same grid post
        (combine; the fused dispatch), so all num_sms of them must be resident at once:
        checked against what the device guarantees at its first use."""
        kernel = getattr(self.kernels, name)
        if name not in self._resident:
            per_sm = check(driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(kernel.function,
                                                                              kernel.declaration.block, 0),
                           "cuOccupancyMaxActiveBlocksPerMultiprocessor")
            sms = device_attribute(self.device, driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            if self.num_sms > per_sm * sms:
                raise ValueError(f"num_sms: expected at most {per_sm * sms} ({name}'s blocks must all be resident at "
                                 f"once), got {self.num_sms}")
            self._resident.add(name)
        return kernel

    # ---- errors -----------------------------------------------------------------

    def check_error(self) -> None:
        """Raise if a kernel gave up waiting for a peer."""
        if self.closed:
            raise EPJitError("Buffer: it is closed")
        error = self._status[0]
        if error:
            phase, peer = error >> 16, (error & 0xFFFF) - 1
            self.close(wait_for_peers=False)  # the group is broken: free what no peer can reach
            raise PeerTimeout(f"rank {peer} (global rank {self.group.members[peer]}) did not respond within "
                              f"{self.timeout_s:g} s in {PHASES.get(phase, phase)}; this Buffer is unusable")

    def raise_pending(self) -> None:
        self.check_error()
        overflow, lost = self._status[2], self._status[3]
        if self.mailbox.bad_source:
            self._raise_bad_topk(None)
        if overflow:
            self._clear_status(2)
            raise ValueError(f"capacity: expected at least {overflow} rows for an earlier non-blocking dispatch; "
                             "the rows past the capacity were dropped")
        if lost:
            self._clear_status(3)
            raise ValueError(f"capacity: a peer's capacity was too small for an earlier non-blocking dispatch: "
                             f"{lost} rows (token layout) or pairs (expert layout) of this rank's tokens were "
                             "dropped there, and combine's output holds only the contributions that were kept")

    def _raise_bad_topk(self, topk_idx: Any) -> None:
        """`topk_idx`: this default-mode dispatch's ids, or None when the report may come
        from an earlier non-blocking dispatch (the device keeps it until it is raised)."""
        source, flat = self.mailbox.bad_source - 1, self.mailbox.bad_index - 1
        self.mailbox.bad_source = self.mailbox.bad_index = 0
        self._clear_status(1)
        if self._unraised_nonblocking:
            topk_idx, self._unraised_nonblocking = None, False
        value = None
        if source == self.group.rank and topk_idx is not None and flat < topk_idx.shape[0] * self.topk:
            check(driver.cuCtxSynchronize(), "cuCtxSynchronize")
            found = ctypes.c_int64()
            check(driver.cuMemcpyDtoH(ctypes.addressof(found), topk_idx.ptr + 8 * flat, 8),
                  "cuMemcpyDtoH(topk_idx)")
            value = found.value
        message = bad_topk_message(source, flat, self.topk, self.num_experts, value)
        raise ValueError(message + ("" if topk_idx is not None else " (found by an earlier non-blocking dispatch)"))

    def _clear_status(self, word: int) -> None:
        """Clear the host copy now and the device copy first thing on the next operation's
        stream, so it is ordered before that operation's kernels."""
        self._status[word] = 0
        self._stale_status.add(word)

    def _begin(self, stream: int) -> None:
        for word in self._stale_status:
            check(driver.cuMemsetD32Async(int(self._workspace) + Workspace.status.offset + 4 * word, 0, 1, stream),
                  "cuMemsetD32Async(status)")
        self._stale_status.clear()

    def check_operation(self, op: Operation, capacity: int | None) -> None:
        """Any framework's tensors and both modes work here."""

    # ---- dispatch ---------------------------------------------------------------

    def dispatch(self, op: Operation, x: Any, topk_idx: Any, topk_weights: Any, scales: Any,
                 capacity: int | None, pad_multiple: int | None = None, out: DispatchResult | None = None
                 ) -> tuple[DispatchResult, list]:
        if out is not None:
            if not self.dispatch_again(op.adapter, op.stream, out, x.ptr, topk_idx.ptr, topk_weights.ptr,
                                       scales.ptr if scales is not None else 0):
                raise ValueError("out: expected a result as dispatch returned it; some of its tensors are not the "
                                 "ones its handle writes (replaced since?)")
            return out, [out.handle.arrays.storage, *out]  # held while the kernels write them (a foreign stream)
        (T, H), K, R, local = x.shape, self.topk, self.group.size, self.num_experts // self.group.size
        fp8, dev, expert = scales is not None, self.device, pad_multiple is not None
        # non-blocking and few tokens: send and pull in one launch, once the outputs exist
        fused = capacity is not None and T <= self._fused_tokens
        self._begin(op.stream)
        if capacity is None:
            self._tickets = next_ticket(self._tickets)
        else:
            self._unraised_nonblocking = True  # a bad id it finds is raised later, maybe by a default dispatch
        args = DispatchArgs.from_buffer_copy(self._dispatch)
        a, pull = args.send, args.pull
        a.ticket = self._tickets if capacity is None else 0
        arrays = Arrays(op, dev, self._layouts.get((T, expert)) or self._array_layout(T, expert))
        ptr = arrays.ptr
        expert_counts = op.empty((local,), "int32", dev)
        expert_offsets = op.empty((local + 1,), "int32", dev) if expert else None
        self._set_inputs(a, x.ptr, topk_idx.ptr, topk_weights.ptr, scales.ptr if fp8 else 0)
        a.is_token_in_rank, a.token_slot, a.num_tokens = ptr["is_token_in_rank"], ptr["token_slot"], T
        a.recv_offsets, a.sent_counts = ptr["recv_offsets"], ptr["sent_counts"]
        a.local_expert_counts = op.ptr(expert_counts)
        a.expert_offsets, a.expert_base = op.ptr(expert_offsets), ptr.get("expert_base", 0)
        a.pad_multiple = pad_multiple or 0
        if not fused:  # R layout blocks (the last also exchanges the counts) beside the staging blocks
            self._launch_dispatch(op.stream, args, SEND_PHASE)

        num_recv = recv_from = per_expert = offsets_list = None
        pull.recv_offsets = a.recv_offsets
        pull.expert_base, pull.expert_offsets, pull.expert_counts = a.expert_base, a.expert_offsets, a.local_expert_counts
        pull.recv_token, pull.pair_rows = ptr["recv_token"], ptr.get("pair_rows", 0)
        if capacity is None:
            self._wait_for_counts(a.ticket)
            if self.mailbox.bad_source:  # every rank learns it here, so every rank raises
                # an abandoning pull (capacity -1) on every rank still releases the peers' stages
                # and advances the dispatch sequence, so the group stays usable
                pull.recv_x = pull.recv_scales = pull.recv_idx = pull.recv_weights = pull.recv_token = 0
                pull.pair_rows, pull.capacity, pull.token_rows = 0, -1, 0
                self._launch_dispatch(op.stream, args, PULL_PHASE)
                self._raise_bad_topk(topk_idx)
            num_recv = self.mailbox.recv_total
            per_expert = list(self.mailbox.tokens_per_expert[:local])
            offsets_list = segment_offsets(per_expert, pad_multiple) if expert else None
            capacity = offsets_list[-1] if expert else num_recv
        token_rows = num_recv if num_recv is not None else R * self._max_tokens
        recv_x = op.empty((capacity, H), self.dtype, dev)
        recv_idx = None if expert else op.empty((capacity, K), "int64", dev)
        recv_w = op.empty((capacity,) if expert else (capacity, K), "float32", dev)
        recv_scales = op.empty((capacity, H // SCALE_BLOCK), "float32", dev) if fp8 else None
        pull.recv_x, pull.recv_scales, pull.recv_idx = op.ptr(recv_x), op.ptr(recv_scales), op.ptr(recv_idx)
        pull.recv_weights, pull.capacity, pull.token_rows = op.ptr(recv_w), capacity, token_rows
        self._launch_dispatch(op.stream, args, SEND_PHASE | PULL_PHASE if fused else PULL_PHASE)
        if num_recv is not None:  # the rest of the counts, read once the pull is on its way
            recv_from = list(self.mailbox.recv_from[:R])
        pairs = PairLayout(expert_offsets, expert_counts, token_rows, args, [])
        handle = Handle(0, op.adapter.name, T, arrays, num_recv, capacity, recv_from, per_expert, transport=pairs,
                        layout="expert" if expert else "token", pad_multiple=pad_multiple or 1,
                        recv_topk_idx=recv_idx, recv_weights=recv_w if expert else None,
                        expert_offsets_list=offsets_list)
        keep = [arrays.storage, expert_counts, expert_offsets, recv_x, recv_idx, recv_w, recv_scales]
        if expert:
            result = DispatchResult(recv_x, None, None, recv_scales, expert_counts, handle, recv_w, expert_offsets)
        else:
            result = DispatchResult(recv_x, recv_idx, recv_w, recv_scales, expert_counts, handle)
        pairs.outputs = list(map(op.adapter.pointer, WRITTEN[expert, fp8](result)))
        return result, keep

    def dispatch_again(self, adapter: Adapter, stream: int, out: DispatchResult, x: int, topk_idx: int,
                       topk_weights: int, scales: int) -> bool:
        """A non-blocking dispatch of the inputs at these addresses (checked by the Buffer) into
        `out`'s outputs and arrays, whose arguments hold all but the inputs already. False, with
        nothing launched, if `out`'s tensors are no longer the ones its handle writes."""
        h = out.handle
        pairs: PairLayout = h.transport
        if list(map(adapter.pointer, WRITTEN[h.layout == "expert", self.dtype == "fp8_e4m3"](out))) != pairs.outputs:
            return False
        args = pairs.args
        self._begin(stream)
        self._unraised_nonblocking = True  # a bad id it finds is raised later, maybe by a default dispatch
        self._set_inputs(args.send, x, topk_idx, topk_weights, scales)
        if h.num_tokens <= self._fused_tokens:  # non-blocking and few tokens: send and pull in one launch
            self._launch_dispatch(stream, args, SEND_PHASE | PULL_PHASE)
        else:
            self._launch_dispatch(stream, args, SEND_PHASE)
            self._launch_dispatch(stream, args, PULL_PHASE)
        return True

    @staticmethod
    def _set_inputs(a: SendArgs, x: int, topk_idx: int, topk_weights: int, scales: int) -> None:
        a.x, a.scales, a.topk_idx, a.topk_weights = x, scales, topk_idx, topk_weights

    def _array_layout(self, T: int, expert: bool) -> ArrayLayout:
        """The kernels' own arrays of a dispatch of T tokens; token rows: the most that can
        arrive (the received count in default mode is known only after the send phase)."""
        R, K, most = self.group.size, self.topk, self.group.size * self._max_tokens
        parts = {"token_slot": ((T, R), "int32"), "is_token_in_rank": ((T, R), "bool"),
                 "recv_offsets": ((R + 1,), "int32"), "sent_counts": ((R,), "int32"), "recv_token": ((most,), "int32")}
        if expert:
            parts.update(pair_rows=((most, K), "int32"), expert_base=((R, self.num_experts // R), "int32"))
        layout = self._layouts[(T, expert)] = ArrayLayout.of(parts)
        return layout

    def restage(self, op: Operation, g: Any, handle: Handle) -> tuple[Any, list]:
        """Move bf16 rows g [T, H] (a gradient of combine's output) to where dispatch put the
        tokens of `handle`, along its saved layout: no count exchange. Rows outside the
        layout are zero."""
        self._begin(op.stream)
        args = DispatchArgs.from_buffer_copy(handle.transport.args)  # the dispatch's layout, other rows
        a, pull = args.send, args.pull
        a.ticket, a.restage, a.pad_multiple = 0, 1, 0
        a.x, a.scales, a.topk_idx, a.topk_weights = g.ptr, 0, 0, 0
        out = op.empty((handle.capacity, self.hidden), "bf16", self.device)  # before any launch
        self._launch_dispatch(op.stream, args, SEND_PHASE)
        pull.restage, pull.recv_x, pull.recv_scales, pull.recv_idx, pull.recv_weights = 1, op.ptr(out), 0, 0, 0
        self._launch_dispatch(op.stream, args, PULL_PHASE)
        return out, [out]

    def _launch_dispatch(self, stream: int, args: DispatchArgs, phases: int) -> None:
        """dispatch_kernel for `phases` with `args` as they are now (the launch copies them)."""
        args.phases = phases
        both = phases == SEND_PHASE | PULL_PHASE  # then its blocks wait for each other
        kernel = self._resident_kernel("dispatch") if both else self.kernels.dispatch
        kernel.launch(stream, self.num_sms, args)

    def _wait_for_counts(self, ticket: int) -> None:
        """Wait on mapped host memory until the count exchange of `ticket` has landed. The
        device gives up on its own after timeout_s per wait (two: the previous stage, then
        the counts), counted from when the send kernel starts; this is the backstop."""
        def poll() -> None:
            if self._status[0]:
                self.check_error()
        limit = 2 * self.timeout_s + 1.0
        if not wait_for_ticket(self._host_mailbox, ticket, limit, poll,
                               started=self._host_mailbox + Mailbox.started_ticket.offset):
            self.close(wait_for_peers=False)
            raise PeerTimeout(f"count exchange: no answer from the device within {limit:g} s of its start")
        self.check_error()

    # ---- combine ----------------------------------------------------------------

    def combine(self, op: Operation, y: Any, handle: Handle, rows: int, weights: bool = True,
                scalars: Any = None, out: Any = None) -> tuple[Any, Any, list]:
        """out [T, H] bf16 (into `out` when given; None without y); with `scalars` (per-pair fp32
        values: [rows] in the expert layout, [rows, K] in the token layout) also their sum over
        ranks per source pair, [T, K]. `weights`: expert layout, apply the pairs' weights (else 1)."""
        combine = self._resident_kernel("combine")  # before any allocation: it may refuse num_sms
        expert = handle.layout == "expert"
        keep = []
        if out is None and y is not None:
            out = op.empty((handle.num_tokens, self.hidden), "bf16", self.device)
            keep.append(out)
        scalars_out = None
        if scalars is not None:
            scalars_out = op.empty((handle.num_tokens, self.topk), "float32", self.device)
            keep.append(scalars_out)
        self._launch_combine(combine, op.stream, handle, rows, y is not None, 0 if y is None else y.ptr, op.ptr(out),
                             op.ptr(handle.recv_weights) if expert and weights else 0,
                             scalars.ptr if scalars is not None else 0,
                             op.ptr(handle.recv_topk_idx) if scalars is not None and not expert else 0,
                             op.ptr(scalars_out))
        return out, scalars_out, keep

    def combine_again(self, adapter: Adapter, stream: int, handle: Handle, y: int, out: int) -> bool:
        """combine of the bf16 rows at `y` into `out` (addresses checked by the Buffer), the
        expert layout's weights applied: the common case of combine, once the handle has run one."""
        if handle.transport.combine_args is None:
            return False
        weights = adapter.pointer(handle.recv_weights) if handle.layout == "expert" else 0
        self._launch_combine(self.kernels.combine, stream, handle, handle.capacity, True, y, out, weights, 0, 0, 0)
        return True

    def _launch_combine(self, combine: LoadedKernel, stream: int, handle: Handle, rows: int, with_rows: bool, y: int,
                        out: int, pair_weights: int, scalars: int, recv_idx: int, scalars_out: int) -> None:
        """combine_kernel over `handle` with these addresses (without rows: the scalars alone; y
        may be 0 with rows, for a capacity of 0)."""
        self._begin(stream)
        a = handle.transport.combine_args or self._combine_args(handle, rows)
        a.y, a.out, a.with_rows, a.pair_weights = y, out, int(with_rows), pair_weights
        a.scalars, a.recv_idx, a.scalars_out = scalars, recv_idx, scalars_out
        # one block per SM of num_sms, all resident at once (checked at the first combine)
        combine.launch(stream, self.num_sms, a)

    def _combine_args(self, handle: Handle, rows: int) -> CombineArgs:
        """The combine arguments every combine of `handle` shares, made at its first combine."""
        pairs: PairLayout = handle.transport
        ptr = handle.arrays.ptr
        a = pairs.combine_args = CombineArgs.from_buffer_copy(self._combine)
        a.recv_offsets, a.token_slot, a.sent_counts = ptr["recv_offsets"], ptr["token_slot"], ptr["sent_counts"]
        a.num_rows = pairs.token_rows if handle.layout == "expert" else rows
        a.num_tokens, a.pair_rows = handle.num_tokens, ptr.get("pair_rows", 0)
        return a

    # ---- teardown ---------------------------------------------------------------

    def close(self, wait_for_peers: bool = True) -> None:
        """Collective by default: a peer may still be reading this rank's memory until it
        has finished its last operation. Without waiting, this rank's exported buffer is
        kept until process exit, and only what no peer can reach is freed."""
        if not self._finalizer.alive:
            return
        self.closed = True
        if wait_for_peers:
            use_device(self.device)
            check(driver.cuCtxSynchronize(), "cuCtxSynchronize")
            self._gather(None)  # barrier: every member has finished its last operation
            self.sym.close()
        else:
            self.sym.abandon()
        self._finalizer()

    def preset_counters(self, seq: int, ticket: int) -> None:
        """Test hook, collective: go on as if `seq` dispatches and combines had completed
        and `ticket` had been the last ticket (to run the wrap-around of both)."""
        use_device(self.device)
        check(driver.cuCtxSynchronize(), "cuCtxSynchronize")
        self._gather(None)
        seqs = (ctypes.c_uint32 * 2)(seq, seq)
        with setup_stream("preset") as stream:
            check(driver.cuMemcpyHtoDAsync(int(self._workspace) + Workspace.seqs.offset, seqs, ctypes.sizeof(seqs),
                                           stream), "cuMemcpyHtoDAsync(seqs)")
            self.sym.post_own_flags(tuple(range(NUM_FLAG_KINDS)), seq, stream)
        self._tickets = ticket
        self._gather(None)
