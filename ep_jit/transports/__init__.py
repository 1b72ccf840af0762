"""How a Buffer moves tokens. Each transport implements dispatch and combine for one
kind of group; the Buffer checks every argument before a transport sees it.

- nvlink: symmetric memory inside one NVLink domain (verified, never assumed).
- collective: the group framework's all_to_all (NCCL), for groups that span domains.
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from ..frameworks import Adapter

COPY_THREADS, LAYOUT_THREADS = 512, 256


class Operation(NamedTuple):
    """One dispatch or combine: the tensors' adapter, the stream every step runs on, and
    that stream again if it is not the framework's current one (else None)."""

    adapter: Adapter
    stream: int
    foreign_stream: int | None

    def empty(self, shape: tuple, dtype: str, device: int) -> Any:
        return self.adapter.empty(shape, dtype, device, self.foreign_stream)


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
    send_offsets: Any = None   # collective: [R + 1] int32, first sent row of each destination
    sent_to: list[int] | None = None  # collective: rows sent to each destination


class DispatchResult(NamedTuple):
    recv_x: Any
    recv_topk_idx: Any
    recv_topk_weights: Any
    recv_scales: Any
    tokens_per_expert: Any
    handle: Handle


def bad_topk_message(source: int, flat: int, topk: int, num_experts: int, value: int | None) -> str:
    """The error every rank raises when rank `source` passed an expert id outside [-1, E)."""
    where = f"[{flat // topk}, {flat % topk}]"
    if value is not None:
        return f"topk_idx: expected ids in [-1, {num_experts}), got {value} at {where}; no token was moved"
    return (f"topk_idx: expected ids in [-1, {num_experts}), but rank {source} passed an id outside that range at "
            f"{where} of its topk_idx; no token of this dispatch was moved")


def next_ticket(ticket: int) -> int:
    """The ticket after `ticket`, as the uint32 the kernels echo: 1 .. 2^32 - 1, then 1 again
    (0 means "no ticket")."""
    return ticket % 0xFFFFFFFF + 1


def wait_for_ticket(address: int, ticket: int, timeout_s: float, poll: Callable[[], None],
                    started: int | None = None) -> bool:
    """Spin until the uint32 at `address` (mapped host memory a kernel writes last) equals
    `ticket`, calling `poll` on the way; False when `timeout_s` passes first. With
    `started`, the uint32 there that the kernel writes when it begins, the time counts
    from then: work queued ahead of it on the stream is not the peers' delay."""
    word = ctypes.c_uint32.from_address(address)
    begun = ctypes.c_uint32.from_address(started) if started is not None else None
    deadline = time.monotonic() + timeout_s if begun is None else None
    spins = 0
    while word.value != ticket:
        poll()
        spins += 1
        if deadline is None and begun.value == ticket:
            deadline = time.monotonic() + timeout_s
        if spins > 10000:  # past ~10 ms: check the clock and stop burning the core
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(20e-6)
    return True
