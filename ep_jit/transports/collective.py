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
from typing import Any

from cuda.bindings import driver

from ..errors import EPJitError, PeerTimeout
from ..group import GroupInfo
from ..kernels import Status, meta_row_bytes
from ..runtime import Module, check, mapped_host_memory, quiesce
from . import (COPY_THREADS, LAYOUT_THREADS, DispatchResult, Handle, Operation, bad_topk_message, next_ticket,
               wait_for_ticket)

STATUS_WORDS = 4  # the layout kernel's status words end every counts row


def _free_host(device: int, host: int) -> None:
    if quiesce(device):
        driver.cuMemFreeHost(host)


def collective_framework(group: Any) -> str:
    """The framework whose collectives serve `group`; checked before any CUDA call."""
    module = type(group).__module__.split(".")[0]
    if module not in ("torch", "paddle"):
        raise TypeError(f"group: expected a torch or paddle process group for transport='collective' (its "
                        f"all_to_all moves the tokens), got {type(group).__name__}")
    return module


class CollectiveTransport:
    def __init__(self, group: GroupInfo, modules: dict[str, Module], *, framework_group: Any, device: int,
                 hidden: int, num_experts: int, topk: int, dtype: str, num_sms: int, timeout_s: float) -> None:
        self.framework, self.framework_group = collective_framework(framework_group), framework_group
        self.group, self.modules, self.device = group, modules, device
        self.hidden, self.num_experts, self.topk, self.dtype, self.num_sms = hidden, num_experts, topk, dtype, num_sms
        self.timeout_s = timeout_s
        self.meta_bytes = meta_row_bytes(hidden, topk, dtype)
        self.counts_len = group.size + num_experts + STATUS_WORDS
        # mapped host memory: [0] the ticket of the last count kernel, from [4] every member's counts row
        self._host, self._host_dev = mapped_host_memory(4 * (4 + group.size * self.counts_len), "counts")
        self._finalizer = weakref.finalize(self, _free_host, device, self._host)
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

    # ---- dispatch ---------------------------------------------------------------

    def dispatch(self, op: Operation, x: Any, topk_idx: Any, topk_weights: Any, scales: Any, num_tokens: int,
                 capacity: int | None) -> tuple[DispatchResult, list]:
        T, H, K, R, E = num_tokens, self.hidden, self.topk, self.group.size, self.num_experts
        a, s, dev, rank = op.adapter, op.stream, self.device, self.group.rank
        p, fp8 = a.pointer, scales is not None
        layout, count, pack, unpack = self.modules["layout"][0], *self.modules["collective"][:3]

        # counts row: tokens per destination [R], pairs per expert [E], status words [4]
        counts = op.empty((self.counts_len,), "int32", dev)
        token_slot, in_rank = op.empty((T, R), "int32", dev), op.empty((T, R), "bool", dev)
        status = p(counts) + 4 * (R + E)
        check(driver.cuMemsetD32Async(status, 0, STATUS_WORDS, s), "cuMemsetD32Async(status)")
        layout.launch(R, LAYOUT_THREADS, s, p(topk_idx), T, p(in_rank), p(token_slot), p(counts), p(counts) + 4 * R,
                      Status(status, status))
        gathered = op.empty((R * self.counts_len,), "int32", dev)
        a.all_gather(self.framework_group, gathered, counts, op.foreign_stream)
        send_offsets, recv_offsets = op.empty((R + 1,), "int32", dev), op.empty((R + 1,), "int32", dev)
        expert_counts = op.empty((E // R,), "int32", dev)
        self._tickets = next_ticket(self._tickets)
        count.launch(1, COPY_THREADS, s, p(gathered), rank, p(send_offsets), p(recv_offsets), p(expert_counts),
                     self._host_dev, self._tickets)
        rows = self._read_counts(self._tickets)

        bad = [(src, row[R + E + 1] - 1) for src, row in enumerate(rows) if row[R + E + 1]]
        if bad:  # every rank has every row, so all raise alike and no token moves
            raise ValueError(bad_topk_message(*bad[0], K, E, None))
        sent_to, recv_from = rows[rank][:R], [row[rank] for row in rows]
        S, N = sum(sent_to), sum(recv_from)

        send_x, send_meta = op.empty((S, H), self.dtype, dev), op.empty((S, self.meta_bytes), "uint8", dev)
        pack.launch(self.num_sms, COPY_THREADS, s, p(x), p(scales) if fp8 else 0, p(topk_idx), p(topk_weights),
                    p(token_slot), T, p(send_offsets), p(send_x), p(send_meta))
        recv_x, recv_meta = op.empty((N, H), self.dtype, dev), op.empty((N, self.meta_bytes), "uint8", dev)
        a.all_to_all(self.framework_group, recv_x, send_x, recv_from, sent_to, op.foreign_stream)
        a.all_to_all(self.framework_group, recv_meta, send_meta, recv_from, sent_to, op.foreign_stream)
        recv_idx, recv_w = op.empty((N, K), "int64", dev), op.empty((N, K), "float32", dev)
        recv_scales = op.empty((N, H // 128), "float32", dev) if fp8 else None
        unpack.launch(self.num_sms, COPY_THREADS, s, p(recv_meta), N, p(recv_scales) if fp8 else 0, p(recv_idx),
                      p(recv_w))
        per_expert = [sum(row[R + rank * (E // R) + e] for row in rows) for e in range(E // R)]
        handle = Handle(0, a.name, T, token_slot, in_rank, recv_offsets, N, N, recv_from, per_expert,
                        send_offsets=send_offsets, sent_to=sent_to)
        keep = [counts, gathered, send_x, send_meta, recv_meta, token_slot, in_rank, send_offsets, recv_offsets,
                expert_counts, recv_x, recv_idx, recv_w, recv_scales]
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

    def combine(self, op: Operation, y: Any, handle: Handle, rows: int) -> tuple[Any, list]:
        p, s = op.adapter.pointer, op.stream
        back = op.empty((sum(handle.sent_to), self.hidden), "bf16", self.device)
        op.adapter.all_to_all(self.framework_group, back, y, handle.sent_to, handle.recv_from, op.foreign_stream)
        out = op.empty((handle.num_tokens, self.hidden), "bf16", self.device)
        self.modules["collective"][3].launch(self.num_sms, COPY_THREADS, s, p(back), p(handle.token_slot),
                                             handle.num_tokens, p(handle.send_offsets), p(out))
        return out, [back, out]

    def close(self, wait_for_peers: bool = True) -> None:
        """Local: no peer ever touches this rank's memory."""
        self.closed = True
        self._finalizer()
