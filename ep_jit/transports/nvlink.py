"""The NVLink transport: every rank's symmetric buffer is open in every peer, senders
stage their tokens, receivers pull them, and combine pushes expert outputs back.

Flags with the group tag and device-side sequence numbers order the phases; a wait
that times out is reported in the status words and raised on the host as PeerTimeout.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any, Callable

from cuda.bindings import driver

from ..errors import EPJitError, PeerTimeout
from ..group import GroupInfo
from ..kernels import NUM_FLAG_KINDS, Mailbox, Status
from ..runtime import Module, check, device_attribute, mapped_host_memory, quiesce, setup_stream, use_device
from ..symmetric import SymmetricBuffer, plan_layout
from . import COPY_THREADS, DispatchResult, Handle, Operation, bad_topk_message, next_ticket, wait_for_ticket

PHASES = {1: "dispatch staging (waiting for peers to finish reading the previous stage)",
          2: "count exchange", 3: "combine push (waiting for peers to finish the previous combine)",
          4: "combine reduce (waiting for peers' expert outputs)", 5: "dispatch pull (waiting for peers' tokens)"}


def _free(device: int, workspace: Any, mailbox: int) -> None:
    if not quiesce(device):
        return
    driver.cuMemFree(workspace)
    driver.cuMemFreeHost(mailbox)


class NVLinkTransport:
    def __init__(self, group: GroupInfo, modules: dict[str, Module], *, device: int, hidden: int, num_experts: int,
                 topk: int, dtype: str, max_tokens: int, num_sms: int, timeout_s: float,
                 gather: Callable[[Any], list]) -> None:
        R = group.size
        self.group, self.modules, self.device = group, modules, device
        self.hidden, self.num_experts, self.topk, self.dtype = hidden, num_experts, topk, dtype
        self.num_sms, self.timeout_s, self.timeout_ns = num_sms, timeout_s, int(timeout_s * 1e9)
        self.layout, size = plan_layout(num_ranks=R, num_experts=num_experts, hidden=hidden, topk=topk,
                                        max_tokens=max_tokens, elem_size=1 if dtype == "fp8_e4m3" else 2)
        self._check_resident(modules["combine"][0], device, num_sms)
        self._gather = gather
        self.sym = SymmetricBuffer(group, self.layout, size, device, gather)
        # int32 words: [0, 8) block counters (pull, combine, combine's token queue, layout,
        # staging), [8, 12) status, [12, 14) sequences, [14, 16) padding, then tokens per rank [R]
        # and per expert [E]
        ws_bytes = 4 * (16 + R + num_experts)
        self._workspace = check(driver.cuMemAlloc(ws_bytes), "cuMemAlloc(workspace)")
        with setup_stream("workspace") as stream:
            check(driver.cuMemsetD8Async(self._workspace, 0, ws_bytes, stream), "cuMemsetD8Async(workspace)")
        ws = int(self._workspace)
        self._counters, self._status_words, self._seqs = ws, ws + 32, ws + 48
        self._tokens_per_rank, self._tokens_per_expert = ws + 64, ws + 64 + 4 * R
        self._host_mailbox, self._mailbox_dev = mapped_host_memory(ctypes.sizeof(Mailbox), "mailbox")
        self.mailbox = Mailbox.from_address(self._host_mailbox)
        self._status = Status(self._status_words, self._mailbox_dev + Mailbox.status.offset)
        self._finalizer = weakref.finalize(self, _free, device, self._workspace, self._host_mailbox)
        self._tickets = 0  # host-side id of each default-mode dispatch, echoed by the count exchange
        self._stale_status: set[int] = set()  # device status words to clear on the next operation's stream
        self.closed = False

    @staticmethod
    def _check_resident(combine: Any, device: int, num_sms: int) -> None:
        """Combine's reducing warps wait for chunks that other blocks push, so all of its
        num_sms blocks must be resident at once: within what the device guarantees."""
        per_sm = check(driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(combine.function, COPY_THREADS, 0),
                       "cuOccupancyMaxActiveBlocksPerMultiprocessor")
        sms = device_attribute(device, driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        if num_sms > per_sm * sms:
            raise ValueError(f"num_sms: expected at most {per_sm * sms} (combine's blocks must all be resident at "
                             f"once), got {num_sms}")
    # ---- errors -----------------------------------------------------------------

    def check_error(self) -> None:
        """Raise if a kernel gave up waiting for a peer."""
        if self.closed:
            raise EPJitError("Buffer: it is closed")
        error = self.mailbox.status[0]
        if error:
            phase, peer = error >> 16, (error & 0xFFFF) - 1
            self.close(wait_for_peers=False)  # the group is broken: free what no peer can reach
            raise PeerTimeout(f"rank {peer} (global rank {self.group.members[peer]}) did not respond within "
                              f"{self.timeout_s:g} s in {PHASES.get(phase, phase)}; this Buffer is unusable")

    def raise_pending(self) -> None:
        self.check_error()
        overflow, lost = self.mailbox.status[2], self.mailbox.status[3]
        if self.mailbox.bad_source:
            self._raise_bad_topk(None, None)
        if overflow:
            self._clear_status(2)
            raise ValueError(f"capacity: expected at least {overflow} rows for an earlier non-blocking dispatch; "
                             "the rows past the capacity were dropped")
        if lost:
            self._clear_status(3)
            raise ValueError(f"capacity: a peer's capacity was too small for an earlier non-blocking dispatch: "
                             f"{lost} rows of this rank's tokens were dropped there, and combine's output holds "
                             "only the contributions that were kept")

    def _raise_bad_topk(self, op: Operation | None, topk_idx: Any) -> None:
        source, flat = self.mailbox.bad_source - 1, self.mailbox.bad_index - 1
        self.mailbox.bad_source = self.mailbox.bad_index = 0
        self._clear_status(1)
        value = None
        if source == self.group.rank and topk_idx is not None:
            check(driver.cuCtxSynchronize(), "cuCtxSynchronize")
            found = ctypes.c_int64()
            check(driver.cuMemcpyDtoH(ctypes.addressof(found), op.adapter.pointer(topk_idx) + 8 * flat, 8),
                  "cuMemcpyDtoH(topk_idx)")
            value = found.value
        message = bad_topk_message(source, flat, self.topk, self.num_experts, value)
        raise ValueError(message + ("" if topk_idx is not None else " (found by an earlier non-blocking dispatch)"))

    def _clear_status(self, word: int) -> None:
        """Clear the host copy now and the device copy first thing on the next operation's
        stream, so it is ordered before that operation's kernels."""
        self.mailbox.status[word] = 0
        self._stale_status.add(word)

    def _begin(self, op: Operation) -> None:
        for word in self._stale_status:
            check(driver.cuMemsetD32Async(self._status_words + 4 * word, 0, 1, op.stream), "cuMemsetD32Async(status)")
        self._stale_status.clear()

    def check_operation(self, op: Operation, capacity: int | None) -> None:
        """Any framework's tensors and both modes work here."""

    # ---- dispatch ---------------------------------------------------------------

    def dispatch(self, op: Operation, x: Any, topk_idx: Any, topk_weights: Any, scales: Any, num_tokens: int,
                 capacity: int | None) -> tuple[DispatchResult, list]:
        T, H, K, R = num_tokens, self.hidden, self.topk, self.group.size
        fp8, s, dev = scales is not None, op.stream, self.device
        self._begin(op)
        ticket = 0
        if capacity is None:
            ticket = self._tickets = next_ticket(self._tickets)
        token_slot = op.empty((T, R), "int32", dev)
        in_rank = op.empty((T, R), "bool", dev)
        recv_offsets = op.empty((R + 1,), "int32", dev)
        expert_counts = op.empty((self.num_experts // R,), "int32", dev)
        p = op.adapter.pointer
        L, peers, status, rank, timeout = self.layout, self.sym.peer_table, self._status, self.group.rank, self.timeout_ns
        send, pull = self.modules["dispatch"][0], self.modules["dispatch"][1]
        # R layout blocks (the last also exchanges the counts) beside the staging blocks, within num_sms
        send.launch(self.num_sms, COPY_THREADS, s, p(x), p(scales) if fp8 else 0, p(topk_idx),
                    p(topk_weights), T, p(in_rank), p(token_slot), self._tokens_per_rank, self._tokens_per_expert,
                    peers, L, rank, self._seqs, ticket, timeout, status, p(recv_offsets), p(expert_counts),
                    self._mailbox_dev, self._counters + 12)

        num_recv = recv_from = per_expert = None
        if capacity is None:
            self._wait_for_counts(ticket)
            if self.mailbox.bad_source:  # every rank learns it here; release the stage, then raise
                pull.launch(self.num_sms, COPY_THREADS, s, 0, 0, 0, 0, -1, p(recv_offsets), peers, L, rank,
                            self._seqs, timeout, status, self._counters)
                self._raise_bad_topk(op, topk_idx)
            num_recv = capacity = self.mailbox.recv_total
        recv_x = op.empty((capacity, H), self.dtype, dev)
        recv_idx = op.empty((capacity, K), "int64", dev)
        recv_w = op.empty((capacity, K), "float32", dev)
        recv_scales = op.empty((capacity, H // 128), "float32", dev) if fp8 else None
        pull.launch(self.num_sms, COPY_THREADS, s, p(recv_x), p(recv_scales) if fp8 else 0, p(recv_idx), p(recv_w),
                    capacity, p(recv_offsets), peers, L, rank, self._seqs, timeout, status, self._counters)
        if num_recv is not None:  # the rest of the counts, read once the pull is on its way
            recv_from = list(self.mailbox.recv_from[:R])
            per_expert = list(self.mailbox.tokens_per_expert[: self.num_experts // R])
        handle = Handle(0, op.adapter.name, T, token_slot, in_rank, recv_offsets, num_recv, capacity, recv_from,
                        per_expert)
        keep = [token_slot, in_rank, recv_offsets, expert_counts, recv_x, recv_idx, recv_w, recv_scales]
        return DispatchResult(recv_x, recv_idx, recv_w, recv_scales, expert_counts, handle), keep

    def _wait_for_counts(self, ticket: int) -> None:
        """Wait on mapped host memory until the count exchange of `ticket` has landed. The
        device gives up on its own after timeout_s per wait (two: the previous stage, then
        the counts), counted from when the send kernel starts; this is the backstop."""
        def poll() -> None:
            if self.mailbox.status[0]:
                self.check_error()
        limit = 2 * self.timeout_s + 1.0
        if not wait_for_ticket(self._host_mailbox, ticket, limit, poll,
                               started=self._host_mailbox + Mailbox.started_ticket.offset):
            self.close(wait_for_peers=False)
            raise PeerTimeout(f"count exchange: no answer from the device within {limit:g} s of its start")
        self.check_error()

    # ---- combine ----------------------------------------------------------------

    def combine(self, op: Operation, y: Any, handle: Handle, rows: int) -> tuple[Any, list]:
        self._begin(op)
        out = op.empty((handle.num_tokens, self.hidden), "bf16", self.device)
        p, s = op.adapter.pointer, op.stream
        L, peers, status, rank, timeout = self.layout, self.sym.peer_table, self._status, self.group.rank, self.timeout_ns
        # one block per SM of num_sms, all resident at once (checked at set-up)
        self.modules["combine"][0].launch(self.num_sms, COPY_THREADS, s, p(y), rows, p(handle.recv_offsets), p(out),
                                          p(handle.token_slot), handle.num_tokens, peers, L, rank, self._seqs,
                                          timeout, status, self._counters + 4)
        return out, [out]

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
            check(driver.cuMemcpyHtoDAsync(self._seqs, seqs, ctypes.sizeof(seqs), stream), "cuMemcpyHtoDAsync(seqs)")
            self.sym.post_own_flags(tuple(range(NUM_FLAG_KINDS)), seq, stream)
        self._tickets = ticket
        self._gather(None)
