"""ctypes mirrors of the structs in templates/ep_args.cuh: field by field, in order.

Each kernel takes one of the *Args structs by value as its only parameter, so a launch
passes one pointer and every argument has a name. `__slots__ = ()` makes an assignment
to a field the struct does not declare an AttributeError, never a silent Python attribute.
"""

from __future__ import annotations

from ctypes import Structure, c_int32, c_int64, c_uint32, c_uint64, c_void_p

from .constants import MAX_LOCAL_EXPERTS, MAX_RANKS, SCALE_BLOCK, STATUS_WORDS

P = c_void_p  # any device pointer


class Status(Structure):
    __slots__ = ()
    _fields_ = [("device", P), ("host", P)]


class SymLayout(Structure):
    __slots__ = ()
    _fields_ = [("flags", c_int64), ("counts", c_int64), ("send_index", c_int64), ("stage_x", c_int64),
                ("stage_scales", c_int64), ("stage_idx", c_int64), ("stage_weights", c_int64), ("stage_pos", c_int64),
                ("combine", c_int64), ("combine_ready", c_int64), ("combine_scalars", c_int64), ("combine_dropped", c_int64), ("max_tokens", c_int32),
                ("nonce", c_uint32)]


class Sequences(Structure):
    __slots__ = ()
    _fields_ = [("dispatch", c_uint32), ("combine", c_uint32)]


class Workspace(Structure):
    __slots__ = ()
    _fields_ = [("counts_ready", c_uint64), ("layout_done", c_int32), ("stage_done", c_int32), ("pull_done", c_int32),
                ("combine_done", c_int32), ("combine_queue", c_int32), ("status", c_int32 * STATUS_WORDS),
                ("seqs", Sequences), ("tokens_per_rank", c_int32 * MAX_RANKS),
                ("tokens_per_expert", c_int32 * (MAX_RANKS * MAX_LOCAL_EXPERTS))]


class Mailbox(Structure):
    __slots__ = ()
    _fields_ = [("done_ticket", c_uint32), ("started_ticket", c_uint32), ("recv_total", c_int32),
                ("recv_from", c_int32 * MAX_RANKS), ("tokens_per_expert", c_int32 * MAX_LOCAL_EXPERTS),
                ("bad_source", c_int32), ("bad_index", c_int32), ("status", c_int32 * STATUS_WORDS)]


class Peers(Structure):
    __slots__ = ()
    _fields_ = [("bases", P), ("layout", SymLayout), ("ws", P), ("mailbox", P), ("timeout_ns", c_uint64),
                ("rank", c_int32)]


class LayoutArgs(Structure):
    __slots__ = ()
    _fields_ = [("topk_idx", P), ("is_token_in_rank", P), ("token_slot", P), ("tokens_per_rank", P),
                ("tokens_per_expert", P), ("status", Status), ("num_tokens", c_int32)]


class SendArgs(Structure):
    __slots__ = ()
    _fields_ = [("peers", Peers), ("x", P), ("scales", P), ("topk_idx", P), ("topk_weights", P),
                ("is_token_in_rank", P), ("token_slot", P), ("recv_offsets", P), ("local_expert_counts", P),
                ("expert_offsets", P), ("expert_base", P), ("sent_counts", P), ("num_tokens", c_int32),
                ("pad_multiple", c_int32),
                ("restage", c_int32), ("ticket", c_uint32)]


class PullArgs(Structure):
    __slots__ = ()
    _fields_ = [("peers", Peers), ("recv_x", P), ("recv_scales", P), ("recv_idx", P), ("recv_weights", P),
                ("recv_offsets", P), ("recv_token", P), ("pair_rows", P), ("expert_base", P), ("expert_offsets", P),
                ("expert_counts", P), ("capacity", c_int32), ("token_rows", c_int32), ("restage", c_int32)]


class DispatchArgs(Structure):
    __slots__ = ()
    _fields_ = [("send", SendArgs), ("pull", PullArgs), ("phases", c_int32)]


class CombineArgs(Structure):
    __slots__ = ()
    _fields_ = [("peers", Peers), ("y", P), ("recv_offsets", P), ("out", P), ("token_slot", P), ("sent_counts", P),
                ("pair_rows", P),
                ("pair_weights", P), ("scalars", P), ("recv_idx", P), ("scalars_out", P), ("num_rows", c_int32),
                ("num_tokens", c_int32), ("with_rows", c_int32)]


class CountArgs(Structure):
    __slots__ = ()
    _fields_ = [("gathered", P), ("send_offsets", P), ("recv_offsets", P), ("local_expert_counts", P),
                ("host", P), ("rank", c_int32), ("ticket", c_uint32)]


class PackArgs(Structure):
    __slots__ = ()
    _fields_ = [("x", P), ("scales", P), ("topk_idx", P), ("topk_weights", P), ("token_slot", P),
                ("send_offsets", P), ("send_x", P), ("send_meta", P), ("num_tokens", c_int32)]


class UnpackArgs(Structure):
    __slots__ = ()
    _fields_ = [("recv_meta", P), ("recv_scales", P), ("recv_idx", P), ("recv_weights", P), ("num_rows", c_int32)]


class SumArgs(Structure):
    __slots__ = ()
    _fields_ = [("returned", P), ("token_slot", P), ("send_offsets", P), ("out", P), ("num_tokens", c_int32)]


# every struct shared with the kernels, by its C++ name in namespace ep_jit
MIRRORS: dict[str, type[Structure]] = {cls.__name__: cls for cls in (
    Status, SymLayout, Sequences, Workspace, Mailbox, Peers, LayoutArgs, SendArgs, PullArgs, DispatchArgs,
    CombineArgs, CountArgs, PackArgs, UnpackArgs, SumArgs)}


def meta_row_bytes(hidden: int, topk: int, dtype: str) -> int:
    """Bytes of the metadata the collective transport sends with each row (struct MetaRow,
    collective.cu): fp8 scales, int32 top-k ids and fp32 weights, padded to 16 bytes."""
    scales = hidden // SCALE_BLOCK * 4 if dtype == "fp8_e4m3" else 0
    return (scales + 8 * topk + 15) // 16 * 16
