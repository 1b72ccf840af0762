"""Symmetric memory: one cuMemAlloc buffer per rank, opened by every peer through CUDA
IPC, plus a device-side table of the peers' base addresses.

The byte layout (kernels.SymLayout) is the same on every rank.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any, Callable

from cuda.bindings import driver

from .group import GroupInfo
from .kernels import COMBINE_CHUNK_ROWS, NUM_FLAG_KINDS, SymLayout
from .runtime import check, quiesce, use_device
from .topology import Endpoint, local_endpoint, verify_nvlink_domain

ALIGN = 256


def plan_layout(*, num_ranks: int, num_experts: int, hidden: int, topk: int, max_tokens: int,
                elem_size: int) -> tuple[SymLayout, int]:
    """Offsets of each region, and the total size in bytes."""
    sizes = [
        ("flags", NUM_FLAG_KINDS * num_ranks * 8),
        ("counts", num_ranks * (2 + num_experts // num_ranks) * 4),
        ("send_index", num_ranks * max_tokens * 4),
        ("stage_x", max_tokens * hidden * elem_size),
        ("stage_scales", max_tokens * (hidden // 128) * 4 if elem_size == 1 else 0),
        ("stage_idx", max_tokens * topk * 8),
        ("stage_weights", max_tokens * topk * 4),
        ("combine", num_ranks * max_tokens * hidden * 2),
        ("combine_ready", num_ranks * -(-max_tokens // COMBINE_CHUNK_ROWS) * 8),
    ]
    layout, offset = SymLayout(), 0
    for name, size in sizes:
        setattr(layout, name, offset)
        offset += (size + ALIGN - 1) // ALIGN * ALIGN
    layout.max_tokens = max_tokens
    return layout, offset


def _handle_bytes(handle: driver.CUipcMemHandle) -> bytes:
    return ctypes.string_at(handle.getPtr(), 64)


def _handle_from(data: bytes) -> driver.CUipcMemHandle:
    handle = driver.CUipcMemHandle()
    ctypes.memmove(handle.getPtr(), data, 64)
    return handle


class SymmetricBuffer:
    """This rank's buffer and its peers', opened after the NVLink domain is verified.

    `all_gather(obj)` must return every member's `obj` in group-rank order.
    """

    def __init__(self, group: GroupInfo, size: int, device: int, all_gather: Callable[[Any], list]) -> None:
        use_device(device)
        self.group, self.size, self.device = group, size, device
        self.local = check(driver.cuMemAlloc(size), f"cuMemAlloc({size})")
        self._opened: list[int] = []   # peers' buffers, unmapped on close
        self._owned: list[int] = [int(self.local)]  # freed on close
        self._finalizer = weakref.finalize(self, _free, device, self._opened, self._owned)
        check(driver.cuMemsetD8(self.local, 0, size), "cuMemsetD8")
        me = local_endpoint(group.rank, group.members[group.rank], device)
        mine = {"endpoint": me.__dict__, "handle": _handle_bytes(check(driver.cuIpcGetMemHandle(self.local),
                                                                      "cuIpcGetMemHandle"))}
        everyone = all_gather(mine)
        if len(everyone) != group.size:
            raise ValueError(f"all_gather: expected {group.size} entries, got {len(everyone)}")
        endpoints = [Endpoint(**e["endpoint"]) for e in everyone]
        verify_nvlink_domain(endpoints, group.rank, device)
        bases = []
        for rank, entry in enumerate(everyone):
            if rank == group.rank:
                bases.append(int(self.local))
                continue
            ptr = check(driver.cuIpcOpenMemHandle(_handle_from(entry["handle"]),
                                                  driver.CUipcMem_flags.CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                        f"opening the buffer of rank {rank}")
            self._opened.append(int(ptr))
            bases.append(int(ptr))
        self.bases = bases
        table = (ctypes.c_uint64 * len(bases))(*bases)
        self.peer_table = int(check(driver.cuMemAlloc(ctypes.sizeof(table)), "cuMemAlloc(peer table)"))
        self._owned.append(self.peer_table)
        check(driver.cuMemcpyHtoD(self.peer_table, table, ctypes.sizeof(table)), "cuMemcpyHtoD(peer table)")

    def close(self) -> None:
        """Unmap the peers' buffers and free this one (also at exit and on collection)."""
        self._finalizer()


def _free(device: int, opened: list[int], owned: list[int]) -> None:
    if not quiesce(device):
        return
    for ptr in opened:
        driver.cuIpcCloseMemHandle(ptr)
    for ptr in owned:
        driver.cuMemFree(ptr)
