"""The collective transport: tokens move through the group framework's all_to_all (NCCL
on GPUs), so it serves groups whose members do not share one NVLink domain.

dispatch: layout kernel -> all_gather of every member's counts -> count kernel (offsets,
tokens per expert, and the counts in mapped host memory, where the host reads the split
sizes of the all_to_all without synchronising the stream) -> pack kernel -> all_to_all
of the rows straight into recv_x, and of their metadata -> unpack kernel (metadata).
combine: all_to_all of the expert outputs back -> sum kernel. Each step runs on the
operation's stream; the framework orders its collective after the work queued there.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass
from typing import Any

from cuda.bindings import driver

from ..errors import EPJitError, PeerTimeout
from ..frameworks import Adapter, framework_of
from ..kernels.args import CountArgs, LayoutArgs, PackArgs, Status, SumArgs, UnpackArgs, meta_row_bytes
from ..kernels.constants import SCALE_BLOCK, STATUS_WORDS
from ..runtime import check, mapped_host_memory, quiesce
from .base import (ArrayLayout, Arrays, DispatchResult, Handle, Operation, Setup, Kernels, bad_topk_message,
                   next_ticket, wait_for_ticket)


def _free_host(device: int, host: int) -> None:
    if quiesce(device):
        driver.cuMemFreeHost(host)


@dataclass
class Sent:
    """The collective transport's part of a handle (send_offsets, where each destination's
    rows went, is in the handle's arrays)."""

    sent_to: list[int]     # rows sent to each destination


class CollectiveTransport:
    templates = ("layout", "collective")
    features: frozenset[str] = frozenset()  # the expert layout and autograd need kernels of their own here

    @staticmethod
    def check_setup(group: Any, size: int, num_sms: int) -> None:
        if framework_of(group) not in ("torch", "paddle"):
            raise TypeError(f"group: expected a torch or paddle process group for transport='collective' (its "
                            f"all_to_all moves the tokens), got {type(group).__name__}")

    def __init__(self, setup: Setup) -> None:
        bound = setup.bound
        self.framework, self.framework_group = bound.framework, bound.group
        self.group, self.device = bound.info, bound.device
        self.hidden, self.num_experts, self.topk, self.dtype = setup.hidden, setup.num_experts, setup.topk, setup.dtype
        self.num_sms, self.timeout_s = setup.num_sms, setup.timeout_s
        self.kernels = Kernels(setup, self.templates)
        self.meta_bytes = meta_row_bytes(self.hidden, self.topk, self.dtype)
        self.counts_len = self.group.size + self.num_experts + STATUS_WORDS
        # mapped host memory: [0] the ticket of the last count kernel, from [4] every member's counts row
        self._host, self._host_dev = mapped_host_memory(4 * (4 + self.group.size * self.counts_len), "counts")
        self._finalizer = weakref.finalize(self, _free_host, self.device, self._host)
        self._tickets = 0
        self.closed = False

    def check_error(self) -> None:
        if self.closed:
            raise EPJitError("Buffer: it is closed")

    def raise_pending(self) -> None:
        self.check_error()  # every dispatch of this transport raises its own errors

    def check_operation(self, op: Operation, capacity: int | None) -> None:
        if op.adapter.name != self.framework:
            raise TypeError(f"x: expected {self.framework} tensors, the framework of the group whose all_to_all "
                            f"moves them (transport='collective'), got {op.adapter.name} tensors")
        if capacity is not None:
            raise ValueError(f"capacity: expected None with transport='collective' (the all_to_all needs the split "
                             f"sizes on the host, so it always waits for the counts), got {capacity}")
        op.adapter.check_collective_stream(op.foreign_stream)  # before anything is queued

    # ---- dispatch ---------------------------------------------------------------

    def dispatch(self, op: Operation, x: Any, topk_idx: Any, topk_weights: Any, scales: Any,
                 capacity: int | None, pad_multiple: int | None = None, out: DispatchResult | None = None
                 ) -> tuple[DispatchResult, list]:
        # out= needs a capacity, which check_operation refused: every result is new here
        (T, H), K, R, E = x.shape, self.topk, self.group.size, self.num_experts
        a, s, dev, rank, k = op.adapter, op.stream, self.device, self.group.rank, self.kernels

        # counts row: tokens per destination [R], pairs per expert [E], status words
        arrays = Arrays(op, dev, ArrayLayout.of({
            "counts": ((self.counts_len,), "int32"), "token_slot": ((T, R), "int32"),
            "is_token_in_rank": ((T, R), "bool"), "send_offsets": ((R + 1,), "int32"),
            "recv_offsets": ((R + 1,), "int32")}))
        ptr = arrays.ptr
        status = ptr["counts"] + 4 * (R + E)
        check(driver.cuMemsetD32Async(status, 0, STATUS_WORDS, s), "cuMemsetD32Async(status)")
        k.layout.launch(s, R, LayoutArgs(topk_idx=topk_idx.ptr, is_token_in_rank=ptr["is_token_in_rank"],
                                         token_slot=ptr["token_slot"], tokens_per_rank=ptr["counts"],
                                         tokens_per_expert=ptr["counts"] + 4 * R, status=Status(status, status),
                                         num_tokens=T))
        gathered = op.empty((R * self.counts_len,), "int32", dev)
        a.all_gather(self.framework_group, gathered, arrays["counts"], op.foreign_stream)
        expert_counts = op.empty((E // R,), "int32", dev)
        self._tickets = next_ticket(self._tickets)
        k.count.launch(s, 1, CountArgs(gathered=op.ptr(gathered), send_offsets=ptr["send_offsets"],
                                       recv_offsets=ptr["recv_offsets"], local_expert_counts=op.ptr(expert_counts),
                                       host=self._host_dev, rank=rank, ticket=self._tickets))
        rows = self._read_counts(self._tickets)

        bad = [(src, row[R + E + 1] - 1) for src, row in enumerate(rows) if row[R + E + 1]]
        if bad:  # every rank has every row, so all raise alike and no token moves
            raise ValueError(bad_topk_message(*bad[0], K, E, None))
        sent_to, recv_from = rows[rank][:R], [row[rank] for row in rows]
        S, N = sum(sent_to), sum(recv_from)

        send_x, send_meta = op.empty((S, H), self.dtype, dev), op.empty((S, self.meta_bytes), "uint8", dev)
        k.pack.launch(s, self.num_sms, PackArgs(x=x.ptr, scales=scales.ptr if scales is not None else 0, topk_idx=topk_idx.ptr,
                                                topk_weights=topk_weights.ptr, token_slot=ptr["token_slot"],
                                                send_offsets=ptr["send_offsets"], send_x=op.ptr(send_x),
                                                send_meta=op.ptr(send_meta), num_tokens=T))
        recv_x, recv_meta = op.empty((N, H), self.dtype, dev), op.empty((N, self.meta_bytes), "uint8", dev)
        a.all_to_all(self.framework_group, recv_x, send_x, recv_from, sent_to, op.foreign_stream)
        a.all_to_all(self.framework_group, recv_meta, send_meta, recv_from, sent_to, op.foreign_stream)
        recv_idx, recv_w = op.empty((N, K), "int64", dev), op.empty((N, K), "float32", dev)
        recv_scales = op.empty((N, H // SCALE_BLOCK), "float32", dev) if scales is not None else None
        k.unpack.launch(s, self.num_sms, UnpackArgs(recv_meta=op.ptr(recv_meta), recv_scales=op.ptr(recv_scales),
                                                    recv_idx=op.ptr(recv_idx), recv_weights=op.ptr(recv_w),
                                                    num_rows=N))
        per_expert = [sum(row[R + rank * (E // R) + e] for row in rows) for e in range(E // R)]
        handle = Handle(0, a.name, T, arrays, N, N, recv_from, per_expert, transport=Sent(sent_to))
        keep = [arrays.storage, gathered, send_x, send_meta, recv_meta, expert_counts, recv_x, recv_idx, recv_w,
                recv_scales]
        return DispatchResult(recv_x, recv_idx, recv_w, recv_scales, expert_counts, handle), keep

    def _read_counts(self, ticket: int) -> list[list[int]]:
        """Every member's counts row, once the count kernel of `ticket` has written them to
        mapped host memory: the split sizes the all_to_all needs."""
        if not wait_for_ticket(self._host, ticket, self.timeout_s, lambda: None):
            self.closed = True
            self._finalizer.detach()  # the stuck kernels may still write it: never free it under them
            raise PeerTimeout(f"count exchange: the group's all_gather did not finish within {self.timeout_s:g} s; "
                              "this Buffer is unusable")
        n = self.counts_len
        flat = (ctypes.c_int * (self.group.size * n)).from_address(self._host + 16)
        return [list(flat[r * n:(r + 1) * n]) for r in range(self.group.size)]

    # ---- combine ----------------------------------------------------------------

    def combine(self, op: Operation, y: Any, handle: Handle, rows: int, weights: bool = True,
                scalars: Any = None, out: Any = None) -> tuple[Any, Any, list]:
        sent: Sent = handle.transport
        back = op.empty((sum(sent.sent_to), self.hidden), "bf16", self.device)
        op.adapter.all_to_all(self.framework_group, back, y.tensor, sent.sent_to, handle.recv_from, op.foreign_stream)
        if out is None:
            out = op.empty((handle.num_tokens, self.hidden), "bf16", self.device)
        self.kernels.sum.launch(op.stream, self.num_sms, SumArgs(
            returned=op.ptr(back), token_slot=handle.arrays.ptr["token_slot"],
            send_offsets=handle.arrays.ptr["send_offsets"],
            out=op.ptr(out), num_tokens=handle.num_tokens))
        return out, None, [back, out]

    def dispatch_again(self, adapter: Adapter, stream: int, out: DispatchResult, x: int, topk_idx: int,
                       topk_weights: int, scales: int) -> bool:
        return False  # unreachable: out= needs a non-blocking result, and every result here waited for the counts

    def combine_again(self, adapter: Adapter, stream: int, handle: Handle, y: int, out: int) -> bool:
        return False  # the all_to_all takes y's tensor, not its address: the full path

    def restage(self, op: Operation, g: Any, handle: Handle) -> tuple[Any, list]:
        raise AssertionError("unreachable: the Buffer checks `features` first")

    def close(self, wait_for_peers: bool = True) -> None:
        """Local: no peer ever touches this rank's memory."""
        self.closed = True
        self._finalizer()
