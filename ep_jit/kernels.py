"""The kernels an EP Buffer uses: their specs, their parameter types, and the host
mirrors of the structs they share with the host.

ep-jit-warm and Buffer both build their kernel lists here, so what is warmed ahead
of time (the kernels of either transport) covers what a Buffer asks for at run time.
The ctypes mirrors follow the structs in templates/ (tests/test_mirrors.py compiles a
check of every offset).
"""

from __future__ import annotations

import ctypes
from ctypes import c_int, c_uint32, c_uint64, c_void_p
from typing import Sequence

from .group import member_hash
from .spec import KernelSpec

# The templates of each transport. "nvlink" moves tokens through symmetric memory inside one
# NVLink domain; "collective" through the group framework's all_to_all, anywhere.
TRANSPORT_TEMPLATES: dict[str, tuple[str, ...]] = {"nvlink": ("dispatch", "combine"),
                                                   "collective": ("layout", "collective")}
TRANSPORTS = tuple(TRANSPORT_TEMPLATES)
BUFFER_TEMPLATES: tuple[str, ...] = tuple(dict.fromkeys(t for ts in TRANSPORT_TEMPLATES.values() for t in ts))
MAX_RANKS, MAX_LOCAL_EXPERTS = 64, 1024


class SymLayout(ctypes.Structure):
    """Byte offsets inside every rank's symmetric buffer (struct SymLayout, ep_common.cuh)."""

    _fields_ = [("flags", ctypes.c_int64), ("counts", ctypes.c_int64), ("send_index", ctypes.c_int64),
                ("stage_x", ctypes.c_int64), ("stage_scales", ctypes.c_int64), ("stage_idx", ctypes.c_int64),
                ("stage_weights", ctypes.c_int64), ("combine", ctypes.c_int64), ("combine_ready", ctypes.c_int64),
                ("combine_dropped", ctypes.c_int64), ("max_tokens", ctypes.c_int32), ("nonce", c_uint32)]


COMBINE_CHUNK_ROWS = 8  # kCombineChunkRows: combine flags its pushes per this many rows
NUM_FLAG_KINDS = 4      # kNumFlagKinds: flag words per peer in the symmetric buffer
STAGE_CONSUMED, COMBINE_CONSUMED = 1, 2  # kStageConsumed, kCombineConsumed: posted for sequence 0 at set-up


class Status(ctypes.Structure):
    """Status words: the kernels' device copy and the host copy (struct Status, ep_common.cuh)."""

    _fields_ = [("device", c_void_p), ("host", c_void_p)]


class Mailbox(ctypes.Structure):
    """Mapped pinned host memory the kernels write (struct Mailbox in dispatch.cu, then the
    host copy of the status words)."""

    _fields_ = [("done_ticket", c_uint32), ("started_ticket", c_uint32), ("recv_total", c_int),
                ("recv_from", c_int * MAX_RANKS),
                ("tokens_per_expert", c_int * MAX_LOCAL_EXPERTS), ("bad_source", c_int), ("bad_index", c_int),
                ("status", c_int * 4)]


P = c_void_p  # any device pointer
# Parameter types of every kernel, per template, in the order of Template.kernels.
SIGNATURES: dict[str, tuple[tuple[type, ...], ...]] = {
    "layout": ((P, c_int, P, P, P, P, Status),),
    "dispatch": ((P, P, P, P, c_int, P, P, P, P, P, SymLayout, c_int, P, c_uint32, c_uint64, Status, P, P, P,
                  P),                                                                 # send
                 (P, P, P, P, c_int, P, P, SymLayout, c_int, P, c_uint64, Status, P)),  # pull
    "combine": ((P, c_int, P, P, P, c_int, P, SymLayout, c_int, P, c_uint64, Status, P),),
    "collective": ((P, c_int, P, P, P, P, c_uint32),                                  # count
                   (P, P, P, P, P, c_int, P, P, P),                                   # pack
                   (P, c_int, P, P, P),                                               # unpack
                   (P, P, c_int, P, P)),                                              # sum
}


def meta_row_bytes(hidden: int, topk: int, dtype: str) -> int:
    """Bytes of the metadata the collective transport sends with each row (struct MetaRow,
    collective.cu): fp8 scales, int32 top-k ids and fp32 weights, padded to 16 bytes."""
    scales = hidden // 128 * 4 if dtype == "fp8_e4m3" else 0
    return (scales + 8 * topk + 15) // 16 * 16


def buffer_specs(*, hidden: int, num_experts: int, topk: int, dtype: str, members: Sequence[int],
                 arch: str, transport: str | None = None) -> list[KernelSpec]:
    """Every spec a Buffer over `members` needs for this model shape, with one transport
    or (None, for warming ahead of time) with either."""
    mh = member_hash(members)
    templates = BUFFER_TEMPLATES if transport is None else TRANSPORT_TEMPLATES[transport]
    return [KernelSpec(t, hidden, num_experts, len(members), topk, dtype, mh, arch) for t in templates]
