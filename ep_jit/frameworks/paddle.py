"""PaddlePaddle adapter (2.6 and 3.x; attributes are picked by capability, not version)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import paddle

from . import DTYPE_NAMES, AdapterBase

_PADDLE = {v: k for k, v in DTYPE_NAMES.items()}


def _dtype_name(dtype: Any) -> str:
    return str(dtype).split(".")[-1]  # paddle.bfloat16 / VarType.BF16 / DataType.BFLOAT16 -> last part


def stream_handle_of(stream: Any) -> int | None:
    """A paddle stream's raw handle: __cuda_stream__ (3.3+), else stream_base.cuda_stream."""
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is not None:
        return int((protocol() if callable(protocol) else protocol)[1])
    base = getattr(stream, "stream_base", None)
    if base is not None and hasattr(base, "cuda_stream"):
        return int(base.cuda_stream)
    if hasattr(stream, "cuda_stream"):
        return int(stream.cuda_stream)
    return None


class PaddleAdapter(AdapterBase):
    name = "paddle"

    def pointer(self, t: paddle.Tensor) -> int:
        return t.data_ptr()  # includes a view's offset

    def shape(self, t: paddle.Tensor) -> tuple[int, ...]:
        return tuple(t.shape)

    def dtype(self, t: paddle.Tensor) -> str:
        name = _dtype_name(t.dtype).lower()  # paddle.bfloat16 (3.x) or VarType.BF16 (2.6)
        name = {"bf16": "bfloat16", "fp32": "float32", "bool_": "bool"}.get(name, name)
        return DTYPE_NAMES.get(name, name)

    def device(self, t: paddle.Tensor) -> int:
        place = t.place
        return place.gpu_device_id() if place.is_gpu_place() else -1

    def is_contiguous(self, t: paddle.Tensor) -> bool:
        if hasattr(t, "is_contiguous"):
            return bool(t.is_contiguous())
        shape, strides = list(t.shape), list(t.strides)
        expected = 1
        for size, stride in zip(reversed(shape), reversed(strides)):
            if size != 1 and stride != expected:
                return False
            expected *= size
        return True

    def current_stream(self, device: int) -> int:
        handle = stream_handle_of(paddle.device.current_stream(f"gpu:{device}"))
        if handle is None:
            raise TypeError("paddle.device.current_stream() has neither __cuda_stream__ nor stream_base.cuda_stream")
        return handle

    def stream_handle(self, stream: Any) -> int | None:
        return stream_handle_of(stream) if type(stream).__module__.startswith("paddle") else None

    def empty(self, shape: Sequence[int], dtype: str, device: int, stream: int | None) -> paddle.Tensor:
        current = paddle.device.get_device()
        if current != f"gpu:{device}":
            raise ValueError(f"device: expected paddle's current device to be gpu:{device} (the tensors' device), "
                             f"got {current}; call paddle.device.set_device first")
        return paddle.empty(list(shape), dtype=_PADDLE[dtype])

    def view(self, storage: paddle.Tensor, offset: int, shape: Sequence[int], dtype: str) -> paddle.Tensor:
        # typed first, then sliced: a dtype view of a sliced tensor loses the slice's offset
        typed = storage.view(_PADDLE[dtype])
        start = offset // typed.element_size()
        return typed[start:start + math.prod(shape)].view(list(shape))

    def check_collective_stream(self, stream: int | None) -> None:
        """Paddle runs a collective after its current stream's work and makes that stream
        wait for it; it cannot be pointed at another stream."""
        if stream is not None:
            raise ValueError(f"stream: expected Paddle's current stream for a collective of a Paddle group, got "
                             f"handle {stream}; run the operation under paddle.device.stream_guard instead")

    def all_gather(self, group: Any, out: paddle.Tensor, inp: paddle.Tensor, stream: int | None) -> None:
        self.check_collective_stream(stream)
        from paddle.distributed.communication import stream as comm
        comm.all_gather(out, inp, group=group, sync_op=True)  # a tensor: concatenated along dim 0

    def all_to_all(self, group: Any, out: paddle.Tensor, inp: paddle.Tensor, out_splits: list[int],
                   in_splits: list[int], stream: int | None) -> None:
        self.check_collective_stream(stream)
        if self.dtype(out) == "fp8_e4m3":  # fp8 is not an NCCL type everywhere; its bytes are
            out, inp = out.view("uint8"), inp.view("uint8")
        # keywords: 2.6 takes (in_tensor, out_tensor, ...), 3.x (out_tensor, in_tensor, ...)
        paddle.distributed.alltoall_single(out_tensor=out, in_tensor=inp, out_split_sizes=out_splits,
                                           in_split_sizes=in_splits, group=group, sync_op=True)

