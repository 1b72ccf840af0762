"""PyTorch adapter."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from . import paddle_torch_proxy_active

if paddle_torch_proxy_active():  # paddle.enable_compat(): `torch` is Paddle, use the Paddle adapter
    raise ImportError("torch is Paddle's compatibility proxy here; tensors go through the Paddle adapter")

_DTYPES = {torch.bfloat16: "bf16", torch.float32: "float32", torch.int64: "int64", torch.int32: "int32",
           torch.bool: "bool", **({torch.float8_e4m3fn: "fp8_e4m3"} if hasattr(torch, "float8_e4m3fn") else {})}
_TORCH = {v: k for k, v in _DTYPES.items()}


class TorchAdapter:
    name = "torch"

    def pointer(self, t: torch.Tensor) -> int:
        return t.data_ptr()

    def shape(self, t: torch.Tensor) -> tuple[int, ...]:
        return tuple(t.shape)

    def dtype(self, t: torch.Tensor) -> str:
        return _DTYPES.get(t.dtype, str(t.dtype).removeprefix("torch."))

    def device(self, t: torch.Tensor) -> int:
        return t.device.index if t.device.type == "cuda" else -1

    def is_contiguous(self, t: torch.Tensor) -> bool:
        return t.is_contiguous()

    def current_stream(self, device: int) -> int:
        return torch.cuda.current_stream(device).cuda_stream

    def stream_handle(self, stream: Any) -> int | None:
        return stream.cuda_stream if isinstance(stream, torch.cuda.Stream) else None

    def empty(self, shape: Sequence[int], dtype: str, device: int, stream: int | None) -> torch.Tensor:
        if stream is None:
            return torch.empty(tuple(shape), dtype=_TORCH[dtype], device=f"cuda:{device}")
        # the caching allocator ties a block to the stream current at allocation
        with torch.cuda.stream(torch.cuda.ExternalStream(stream, device=f"cuda:{device}")):
            return torch.empty(tuple(shape), dtype=_TORCH[dtype], device=f"cuda:{device}")
