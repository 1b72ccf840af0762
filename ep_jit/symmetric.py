"""Symmetric memory: one cuMemAlloc buffer per rank, opened by every peer through CUDA
IPC, plus a device-side table of the peers' base addresses.

The byte layout (kernels.SymLayout) is the same on every rank. A buffer is zeroed and
its "consumed" flags posted for sequence 0 before its IPC handle is published, so no
peer's first write can be wiped. Once exported, it is freed only by a collective close
or at process exit: after a timeout a slower peer may still be reading or writing it.
"""

from __future__ import annotations

import ctypes
import secrets
import weakref
from typing import Any, Callable, Iterable

from cuda.bindings import driver

from .group import GroupInfo
from .kernels.args import SymLayout
from .kernels.constants import COMBINE_CONSUMED, NUM_FLAG_KINDS, SCALE_BLOCK, STAGE_CONSUMED
from .runtime import check, quiesce, setup_stream, use_device
from .topology import Endpoint, local_endpoint, verify_nvlink_domain

ALIGN = 256


def plan_layout(*, num_ranks: int, num_experts: int, hidden: int, topk: int, max_tokens: int,
                elem_size: int) -> tuple[SymLayout, int]:
    """Offsets of each region, and the total size in bytes."""
    sizes = [
        ("flags", NUM_FLAG_KINDS * num_ranks * 8),
        ("counts", num_ranks * (2 + num_experts // num_ranks) * 4),
        ("send_index", num_ranks * max_tokens * 4),
        ("stage_x", max_tokens * hidden * max(elem_size, 2)),  # gradients are restaged as bf16
        ("stage_scales", max_tokens * (hidden // SCALE_BLOCK) * 4 if elem_size == 1 else 0),
        ("stage_idx", max_tokens * topk * 8),
        ("stage_weights", max_tokens * topk * 4),
        ("stage_pos", max_tokens * topk * 4),
        ("combine", num_ranks * max_tokens * hidden * 2),
        ("combine_ready", num_ranks * max_tokens * 8),
        ("combine_scalars", num_ranks * max_tokens * topk * 4),
        ("combine_dropped", num_ranks * 4),
    ]
    offsets, total = aligned_offsets(sizes, ALIGN)
    layout = SymLayout(**offsets)
    layout.max_tokens = max_tokens
    return layout, total


def aligned_offsets(sizes: Iterable[tuple[str, int]], align: int) -> tuple[dict[str, int], int]:
    """Regions of the given byte sizes laid end to end, each at a multiple of `align`:
    their offsets by name, and the bytes they take."""
    offsets, total = {}, 0
    for name, size in sizes:
        offsets[name] = total
        total += -(-size // align) * align
    return offsets, total


def flag_word(tag: int, nonce: int, seq: int) -> int:
    """The flag a kernel posts for `seq` (make_flag(flag_identity(TAG, nonce), seq), ep_common.cuh)."""
    return ((tag & 0xFFFFFFFF00000000) ^ (nonce << 32)) | (seq & 0xFFFFFFFF)


def _handle_bytes(handle: driver.CUipcMemHandle) -> bytes:
    return ctypes.string_at(handle.getPtr(), 64)


def _handle_from(data: bytes) -> driver.CUipcMemHandle:
    handle = driver.CUipcMemHandle()
    ctypes.memmove(handle.getPtr(), data, 64)
    return handle


class SymmetricBuffer:
    """This rank's buffer and its peers', opened after the NVLink domain is verified.

    `all_gather(obj)` must return every member's `obj` in group-rank order. The members
    agree on a nonce (rank 0's draw), stored in `layout.nonce` and carried in every flag.
    """

    def __init__(self, group: GroupInfo, layout: SymLayout, size: int, device: int,
                 all_gather: Callable[[Any], list]) -> None:
        use_device(device)
        self.group, self.layout, self.size, self.device = group, layout, size, device
        layout.nonce = all_gather(secrets.randbits(32))[0]
        self.local = check(driver.cuMemAlloc(size), f"cuMemAlloc({size})")
        self._opened: list[int] = []   # peers' buffers, unmapped on close and on collection
        # freed on close and on collection; this rank's exported buffer joins only on a
        # collective close, since a Buffer dropped without one may still have peers using it
        self._owned: list[int] = []
        self._finalizer = weakref.finalize(self, _free, device, self._opened, self._owned)
        with setup_stream("symmetric buffer") as stream:
            check(driver.cuMemsetD8Async(self.local, 0, size, stream), "cuMemsetD8Async")
            self.post_own_flags((STAGE_CONSUMED, COMBINE_CONSUMED), 0, stream)
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
        with setup_stream("peer table") as stream:
            check(driver.cuMemcpyHtoDAsync(self.peer_table, table, ctypes.sizeof(table), stream),
                  "cuMemcpyHtoDAsync(peer table)")

    def post_own_flags(self, kinds: tuple[int, ...], seq: int, stream: int) -> None:
        """Write, in this rank's own buffer, every peer's flag of each kind as if posted for `seq`."""
        R, tag = self.group.size, self.group.tag
        words = (ctypes.c_uint64 * R)(*[flag_word(tag, self.layout.nonce, seq)] * R)
        for kind in kinds:  # from pageable memory, staged before the call returns
            check(driver.cuMemcpyHtoDAsync(int(self.local) + self.layout.flags + 8 * kind * R, words,
                                           ctypes.sizeof(words), stream), "cuMemcpyHtoDAsync(flags)")

    def close(self) -> None:
        """Unmap the peers' buffers and free this one: only once no peer can still use it
        (after a collective barrier)."""
        self._owned.append(int(self.local))
        self._finalizer()

    def abandon(self) -> None:
        """Unmap the peers' buffers and free what only this rank uses, but keep this rank's
        exported buffer until process exit: a slower peer may still read or write it. Also
        what collection does."""
        self._finalizer()


def _free(device: int, opened: list[int], owned: list[int]) -> None:
    if not quiesce(device):
        return
    for ptr in opened:
        driver.cuIpcCloseMemHandle(ptr)
    for ptr in owned:
        driver.cuMemFree(ptr)
