"""Framework adapters (torch, cupy, paddle) and the one stream resolver.

An adapter is picked from `type(x).__module__`, never from whether `import torch`
works: Paddle's torch proxy makes `import torch` return Paddle.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence


class Adapter(Protocol):
    name: str

    def pointer(self, t: Any) -> int: ...
    def shape(self, t: Any) -> tuple[int, ...]: ...
    def dtype(self, t: Any) -> str: ...
    def device(self, t: Any) -> int: ...              # CUDA ordinal, -1 for host memory
    def is_contiguous(self, t: Any) -> bool: ...
    def current_stream(self, device: int) -> int: ...
    def stream_handle(self, stream: Any) -> int | None: ...  # a stream object of this framework, else None
    def empty(self, shape: Sequence[int], dtype: str, device: int, stream: int) -> Any: ...
    def keep_alive(self, tensors: Sequence[Any], stream: int) -> None: ...


def adapter_for(x: Any) -> Adapter:
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        from .torch import TorchAdapter
        return TorchAdapter()
    if module == "cupy":
        from .cupy import CupyAdapter
        return CupyAdapter()
    if module == "paddle":
        from .paddle import PaddleAdapter
        return PaddleAdapter()
    raise TypeError(f"expected a torch, cupy or paddle tensor, got {type(x).__module__}.{type(x).__name__}")


def resolve_stream(stream: Any, adapter: Adapter, device: int) -> int:
    """The one stream of an operation: explicit `stream`, else the current stream of the
    tensors' framework on their device. Allocation, launches, records and waits all use it.
    Handle 0 (the legacy default stream) is a valid answer."""
    if stream is None:
        return adapter.current_stream(device)
    if isinstance(stream, bool):
        raise TypeError("stream: expected a stream object, __cuda_stream__ or an int handle, got a bool")
    if isinstance(stream, int):
        if stream < 0:
            raise ValueError(f"stream: expected a non-negative handle, got {stream}")
        return stream
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is not None:
        version, handle = protocol() if callable(protocol) else protocol
        return int(handle)
    for candidate in (adapter, *(_others(adapter))):
        handle = candidate.stream_handle(stream)
        if handle is not None:
            return handle
    raise TypeError(f"stream: expected a stream object, __cuda_stream__ or an int handle, got {type(stream).__name__}")


def _others(adapter: Adapter) -> list[Adapter]:
    """Adapters of the other installed frameworks (a stream may come from any of them)."""
    import importlib
    found = []
    for module, cls in (("torch", "TorchAdapter"), ("cupy", "CupyAdapter"), ("paddle", "PaddleAdapter")):
        if module == adapter.name:
            continue
        try:
            found.append(getattr(importlib.import_module(f"{__name__}.{module}"), cls)())
        except ImportError:
            continue
    return found
