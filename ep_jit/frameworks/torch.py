"""PyTorch adapter."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from . import AdapterBase, TensorView, framework_of, paddle_torch_proxy_active, tensor_view

if paddle_torch_proxy_active():  # paddle.enable_compat(): `torch` is Paddle, use the Paddle adapter
    raise ImportError("torch is Paddle's compatibility proxy here; tensors go through the Paddle adapter")

_DTYPES = {torch.bfloat16: "bf16", torch.float32: "float32", torch.int64: "int64", torch.int32: "int32",
           torch.bool: "bool", torch.uint8: "uint8",
           **({torch.float8_e4m3fn: "fp8_e4m3"} if hasattr(torch, "float8_e4m3fn") else {})}
_TORCH = {v: k for k, v in _DTYPES.items()}
_DEVICES = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
# the current stream's handle without a Stream object (about 10x cheaper, on every operation)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda device: torch.cuda.current_stream(device).cuda_stream)
# whether the current stream is being captured into a graph, without the Python wrapper's frame
_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None) or torch.cuda.is_current_stream_capturing
# all_gather_single (newer torch) replaces all_gather_into_tensor (deprecated there); same arguments
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TorchAdapter(AdapterBase):
    name = "torch"

    pointer = staticmethod(torch.Tensor.data_ptr)  # (t) -> int, without a Python frame: every operation calls it

    def shape(self, t: torch.Tensor) -> tuple[int, ...]:
        return tuple(t.shape)

    def dtype(self, t: torch.Tensor) -> str:
        return _DTYPES.get(t.dtype, str(t.dtype).removeprefix("torch."))

    def device(self, t: torch.Tensor) -> int:
        return t.device.index if t.device.type == "cuda" else -1

    def is_contiguous(self, t: torch.Tensor) -> bool:
        return t.is_contiguous()

    def describe(self, t: torch.Tensor) -> TensorView:  # every operation's checks: one call, not five
        return tensor_view((t.data_ptr(), t.shape, _DTYPES.get(t.dtype) or self.dtype(t), t.get_device(),
                            t.is_contiguous(), "torch", t))  # torch.Size is a tuple

    def address_if(self, t: Any, device: int, dtype: str, shape: tuple, vectors: bool) -> int:
        # AdapterBase's test on the tensor's own attributes: a decode step checks five tensors
        if framework_of(t) != "torch":
            return 0
        ptr = t.data_ptr()
        return ptr if t.dtype is _TORCH[dtype] and t.shape == shape and t.get_device() == device and \
            t.is_contiguous() and not (vectors and ptr % 16) else 0

    def current_stream(self, device: int) -> int:
        return _raw_stream(device)

    def stream_handle(self, stream: Any) -> int | None:
        return stream.cuda_stream if isinstance(stream, torch.cuda.Stream) else None

    def empty(self, shape: Sequence[int], dtype: str, device: int, stream: int | None) -> torch.Tensor:
        if stream is None:  # the hot path: a few microseconds matter while the GPU waits for the pull
            return _empty(tuple(shape), dtype, device)
        # the caching allocator ties a block to the stream current at allocation
        with _current(stream, _DEVICES[device]):
            return _empty(tuple(shape), dtype, device)

    def view(self, storage: torch.Tensor, offset: int, shape: Sequence[int], dtype: str) -> torch.Tensor:
        typed = storage.view(_TORCH[dtype])
        start = offset // typed.element_size()
        return typed[start:start + math.prod(shape)].view(shape)

    def check_collective_stream(self, stream: int | None) -> None:
        """torch's collectives run on any stream."""

    def all_gather(self, group: Any, out: torch.Tensor, inp: torch.Tensor, stream: int | None) -> None:
        with _current(stream, out.device):
            _all_gather_single(out, inp, group=group)

    def all_to_all(self, group: Any, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int],
                   in_splits: list[int], stream: int | None) -> None:
        # ordered after the work queued on the current stream; that stream waits for it
        if out.element_size() == 1:  # fp8 is not an NCCL type everywhere; its bytes are
            out, inp = out.view(torch.uint8), inp.view(torch.uint8)
        with _current(stream, out.device):
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)


def _empty(shape: tuple[int, ...], dtype: str, device: int) -> torch.Tensor:
    """torch.empty(shape, ...) in about half its host time: torch.empty_like of a cached tensor
    of that shape over one element parses fewer arguments, and operations repeat their shapes.
    Not while the stream is being captured: the graph's private pool would hold the cached
    element."""
    if _capturing():
        return torch.empty(shape, dtype=_TORCH[dtype], device=_DEVICES[device])
    return torch.empty_like(_shaped(shape, dtype, device), memory_format=torch.contiguous_format)


@functools.cache
def _one(dtype: str, device: int) -> torch.Tensor:
    return torch.empty((), dtype=_TORCH[dtype], device=_DEVICES[device])


@functools.lru_cache(maxsize=256)
def _shaped(shape: tuple[int, ...], dtype: str, device: int) -> torch.Tensor:
    return _one(dtype, device).expand(shape)


@contextlib.contextmanager
def _current(stream: int | None, device: torch.device) -> Iterator[None]:
    """Make `stream` torch's current stream (None: leave the current one)."""
    if stream is None:
        yield
        return
    with torch.cuda.stream(torch.cuda.ExternalStream(stream, device=device)):
        yield
