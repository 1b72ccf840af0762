"""Framework adapters (torch, cupy, paddle), the one stream resolver, tensor views and
group binding.

Which framework an object belongs to is decided in one place, `framework_of`, from
`type(x).__module__`, never from whether `import torch` works: Paddle's torch proxy
makes `import torch` return Paddle.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, NamedTuple, Protocol, Sequence

from ..group import GroupInfo


# dtype names as numpy-style libraries spell them (cupy with ml_dtypes, paddle) -> ep_jit's names
DTYPE_NAMES = {"bfloat16": "bf16", "float8_e4m3fn": "fp8_e4m3", "float32": "float32", "int64": "int64",
               "int32": "int32", "bool": "bool", "uint8": "uint8"}


class Adapter(Protocol):
    name: str

    def pointer(self, t: Any) -> int: ...
    def shape(self, t: Any) -> tuple[int, ...]: ...
    def dtype(self, t: Any) -> str: ...
    def device(self, t: Any) -> int: ...              # CUDA ordinal, -1 for host memory
    def is_contiguous(self, t: Any) -> bool: ...
    def current_stream(self, device: int) -> int: ...
    def stream_handle(self, stream: Any) -> int | None: ...  # a stream object of this framework, else None
    def empty(self, shape: Sequence[int], dtype: str, device: int, stream: int | None) -> Any: ...
    # stream: None for the framework's current stream, else the handle the memory will be used on
    def view(self, storage: Any, offset: int, shape: Sequence[int], dtype: str) -> Any: ...
    # a uint8 tensor's bytes from `offset` (a multiple of 16) as a tensor of shape and dtype
    # Collectives of a process group of this framework (torch and paddle), on `stream` as above:
    def all_gather(self, group: Any, out: Any, inp: Any, stream: int | None) -> None: ...
    def all_to_all(self, group: Any, out: Any, inp: Any, out_splits: list[int], in_splits: list[int],
                   stream: int | None) -> None: ...
    def check_collective_stream(self, stream: int | None) -> None: ...  # raises if they cannot run there
    def describe(self, t: Any) -> TensorView: ...  # AdapterBase's
    def address_if(self, t: Any, device: int, dtype: str, shape: tuple, vectors: bool) -> int: ...  # AdapterBase's


def paddle_torch_proxy_active() -> bool:
    """True when `import torch` yields Paddle (paddle.enable_compat())."""
    torch = sys.modules.get("torch")
    return torch is not None and (type(torch).__module__.startswith("paddle") or
                                  "paddle" in str(getattr(torch, "__file__", "")))


_MODULES = {"torch": ("torch", "TorchAdapter"), "cupy": ("cupy", "CupyAdapter"), "paddle": ("paddle", "PaddleAdapter")}
_adapters: dict[str, Adapter] = {}


_framework_of_type: dict[type, str] = {}


def framework_of(obj: Any) -> str:
    """The top-level module of obj's type: "torch", "paddle", "cupy", or anything else."""
    kind = type(obj)
    name = _framework_of_type.get(kind)
    if name is None:
        name = _framework_of_type[kind] = kind.__module__.split(".")[0]
    return name


def adapter_for(x: Any) -> Adapter:
    """The adapter of x's framework."""
    module = framework_of(x)
    adapter = _adapters.get(module)
    if adapter is None:
        if module not in _MODULES:
            raise TypeError(f"expected a torch, cupy or paddle tensor, got {type(x).__module__}.{type(x).__name__}")
        import importlib
        name, cls = _MODULES[module]
        adapter = _adapters[module] = getattr(importlib.import_module(f"{__name__}.{name}"), cls)()
    return adapter


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
    for module, (name, cls) in _MODULES.items():
        if module == adapter.name:
            continue
        try:
            found.append(getattr(importlib.import_module(f"{__name__}.{name}"), cls)())
        except ImportError:
            continue
    return found


class TensorView(NamedTuple):
    """What the Buffer's checks and the transports need of a tensor, read once."""

    ptr: int
    shape: tuple[int, ...]
    dtype: str
    device: int          # CUDA ordinal, -1 for host memory
    contiguous: bool
    framework: str
    tensor: Any          # the tensor itself, for the framework's own collectives

    def fits(self, device: int, dtype: str, shape: tuple, vectors: bool) -> bool:
        """A contiguous tensor of dtype and shape on device, 16-byte aligned if `vectors`."""
        return self.device == device and self.dtype == dtype and self.shape == shape and self.contiguous and \
            not (vectors and self.ptr % 16)


# tensor_view((ptr, shape, ...)) is TensorView(ptr, shape, ...) without the Python frame of a
# NamedTuple's __new__: every operation makes a few
tensor_view: Callable[[tuple], TensorView] = functools.partial(tuple.__new__, TensorView)


class AdapterBase:
    """What adapters share: a tensor's view from its parts (an adapter may read them at once)."""

    name: str

    def describe(self, t: Any) -> TensorView:
        return tensor_view((self.pointer(t), self.shape(t), self.dtype(t), self.device(t), self.is_contiguous(t),
                            self.name, t))

    def address_if(self, t: Any, device: int, dtype: str, shape: tuple, vectors: bool) -> int:
        """t's address if it is this framework's tensor and fits (TensorView.fits), else 0: a
        repeated operation's checks in one call (0 sends it through the full checks)."""
        if framework_of(t) != self.name:
            return 0
        v = self.describe(t)
        return v.ptr if v.fits(device, dtype, shape, vectors) else 0


class BoundGroup(NamedTuple):
    """A process group as a Buffer uses it."""

    info: GroupInfo
    device: int
    gather: Callable[[Any], list]  # obj -> every member's obj, in group-rank order
    framework: str | None          # "torch" or "paddle" for a framework group, None for a GroupInfo
    group: Any                     # the caller's group object, whose collectives a transport may use


def group_info(group: Any) -> GroupInfo:
    """The members of a GroupInfo, a torch group or a paddle group."""
    if isinstance(group, GroupInfo):
        return group
    framework = framework_of(group)
    if framework == "torch":
        return GroupInfo.from_torch(group)
    if framework == "paddle":
        return GroupInfo.from_paddle(group)
    raise TypeError(f"group: expected a GroupInfo, a torch or a paddle process group, got {type(group).__name__}")


def bind_group(group: Any, device: int | None = None, all_gather: Callable[[Any], list] | None = None) -> BoundGroup:
    """A torch or paddle process group, or a GroupInfo with `device` and (for more than
    one member) `all_gather`: its members, this process's device and an object gather."""
    info = group_info(group)
    device = device if device is not None else group_device(group)
    if device is None:
        raise ValueError("device: expected the CUDA device ordinal when group is a GroupInfo, got None")
    gather = group_all_gather(group, info.size, all_gather)
    return BoundGroup(info, device, gather, None if isinstance(group, GroupInfo) else framework_of(group), group)


def object_all_gather(group: Any, size: int) -> Callable[[Any], list] | None:
    """obj -> every member's obj in group-rank order, through the group's framework;
    None for a group object of no framework (a GroupInfo)."""
    module = framework_of(group)
    if module == "paddle":
        import paddle.distributed as paddle_dist

        def gather(obj: Any) -> list:
            out: list = []
            paddle_dist.all_gather_object(out, obj, group=group)  # appends to the list it is given
            return out[-size:]
        return gather
    if module == "torch":
        import torch.distributed as torch_dist

        def gather(obj: Any) -> list:
            out = [None] * size
            torch_dist.all_gather_object(out, obj, group=group)
            return out
        return gather
    return None


def group_all_gather(group: Any, size: int, all_gather: Callable[[Any], list] | None = None
                     ) -> Callable[[Any], list]:
    """`all_gather` if given, else the group framework's object all-gather; a lone member
    gathers itself. A GroupInfo of more members needs `all_gather`."""
    gather = all_gather or object_all_gather(group, size)
    if gather is not None:
        return gather
    if size > 1:
        raise ValueError("all_gather: expected a callable when group is a GroupInfo of more than one member")
    return lambda obj: [obj]


def group_device(group: Any) -> int | None:
    """The CUDA device this process uses with the group's framework, if it has one."""
    module = framework_of(group)
    if module == "paddle":
        import paddle
        place = paddle.device.get_device()
        return int(place.split(":")[1]) if place.startswith("gpu:") else None
    if module == "torch":
        import torch
        return torch.cuda.current_device() if torch.cuda.is_available() else None
    return None
