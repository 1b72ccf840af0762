"""What every transport shares: the Transport protocol, the set-up a Buffer hands it, one
operation's stream and allocator, the handle, and the kernel loading.

The Buffer checks every argument before a transport sees it; a transport checks what
only it knows (its own limits) in `check_setup`, before any CUDA call.
"""

from __future__ import annotations

import ctypes
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple, Protocol

from ..frameworks import Adapter, BoundGroup, TensorView
from ..group_warm import warm
from ..jit import record_load
from ..kernels import KERNELS, TEMPLATES
from ..runtime import Library, LoadedKernel
from ..spec import KernelSpec
from ..symmetric import aligned_offsets


@dataclass(frozen=True)
class Setup:
    """Everything a transport is built from; the same on every member (checked)."""

    bound: BoundGroup
    hidden: int
    num_experts: int
    topk: int
    dtype: str
    max_tokens: int
    num_sms: int
    timeout_s: float
    arch: str

    def specs(self, templates: tuple[str, ...]) -> list[KernelSpec]:
        info = self.bound.info
        return [KernelSpec(t, self.hidden, self.num_experts, info.size, self.topk, self.dtype, info.member_hash,
                           self.arch) for t in templates]


class Kernels:
    """A transport's kernels by catalogue name (kernels.dispatch, kernels.combine, ...). Each
    template is fetched the first time one of its kernels is asked for, from the JIT's
    tiers through ep_jit.warm (each key compiled at most once in the group), and loaded
    on the Buffer's device. A fetch is collective: every member asks for the same kernels
    in the same order, because every member runs the same operations."""

    def __init__(self, setup: Setup, templates: tuple[str, ...]) -> None:
        self._setup, self._templates = setup, templates
        self._loaded: dict[str, LoadedKernel] = {}
        self.first_fetch_s: dict[str, float] = {}  # template -> seconds its first fetch took

    def __getattr__(self, name: str) -> LoadedKernel:
        loaded = self.__dict__.get("_loaded")
        if loaded is None or name.startswith("_"):
            raise AttributeError(name)
        if name not in loaded:
            kernel = KERNELS.get(name)
            if kernel is None or kernel.template not in self._templates:
                raise AttributeError(f"kernels: no kernel {name!r} in templates {list(self._templates)}")
            self._fetch((kernel.template,))
        return loaded[name]

    @property
    def fetched(self) -> tuple[str, ...]:
        return tuple(self.first_fetch_s)

    def warm(self) -> None:
        """Fetch every template not fetched yet, in one collective round."""
        self._fetch(tuple(t for t in self._templates if t not in self.first_fetch_s))

    def _fetch(self, templates: tuple[str, ...]) -> None:
        if not templates:
            return
        start = time.perf_counter()
        binaries = warm(self._setup.specs(templates), self._setup.bound.info, all_gather=self._setup.bound.gather)
        for binary in binaries:
            spec, loaded = binary.spec, time.perf_counter()
            library = Library(binary.cubin, self._setup.bound.device, f"{spec.describe()} (key {binary.key[:16]})")
            for kernel in TEMPLATES[spec.template]:
                loaded_kernel = library.kernel(binary.symbol(kernel.name), kernel)
                self._loaded[kernel.name] = loaded_kernel
                setattr(self, kernel.name, loaded_kernel)  # later lookups skip __getattr__ (the launch path)
            record_load(time.perf_counter() - loaded)
        for t in templates:
            self.first_fetch_s[t] = (time.perf_counter() - start) / len(templates)


class Operation(NamedTuple):
    """One dispatch or combine: the tensors' adapter, the stream every step runs on, and
    that stream again if it is not the framework's current one (else None)."""

    adapter: Adapter
    stream: int
    foreign_stream: int | None

    def empty(self, shape: tuple, dtype: str, device: int) -> Any:
        return self.adapter.empty(shape, dtype, device, self.foreign_stream)

    def ptr(self, t: Any) -> int:
        """The device address of a tensor this operation allocated (0 for None)."""
        return 0 if t is None else self.adapter.pointer(t)


ITEM_SIZES = {"bool": 1, "uint8": 1, "fp8_e4m3": 1, "bf16": 2, "int32": 4, "float32": 4, "int64": 8}


class ArrayLayout(NamedTuple):
    """Where each named part of an Arrays allocation lies: (shape, dtype) and byte offset,
    each 16-byte aligned. Made once per shape, since operations repeat their shapes."""

    parts: dict[str, tuple[tuple[int, ...], str]]
    offsets: dict[str, int]
    nbytes: int

    @staticmethod
    def of(parts: dict[str, tuple[tuple[int, ...], str]]) -> "ArrayLayout":
        offsets, total = aligned_offsets(((name, math.prod(shape) * ITEM_SIZES[dtype])
                                          for name, (shape, dtype) in parts.items()), 16)
        return ArrayLayout(parts, offsets, max(total, 16))


class Arrays:
    """An operation's small device arrays in one allocation, by name: each part's address
    known at once, a tensor view of it made only when asked for. Allocations cost
    microseconds each on the host while the GPU waits, and a view costs as much as an
    allocation, so arrays only the kernels read never become tensors."""

    def __init__(self, op: Operation, device: int, layout: ArrayLayout) -> None:
        self._adapter, self._layout, self._views = op.adapter, layout, {}
        self.storage = op.empty((layout.nbytes,), "uint8", device)
        base = op.ptr(self.storage)
        self.ptr = {name: base + offset for name, offset in layout.offsets.items()}

    def __getitem__(self, name: str) -> Any:
        view = self._views.get(name)
        if view is None:
            shape, dtype = self._layout.parts[name]
            view = self._views[name] = self._adapter.view(self.storage, self._layout.offsets[name], shape, dtype)
        return view


@dataclass
class Handle:
    """What combine (and the backward passes) need to know about one dispatch: what every
    transport needs, and the transport's own part."""

    buffer_id: int
    framework: str
    num_tokens: int
    arrays: Arrays             # token_slot, is_token_in_rank, recv_offsets (below), and the transport's own
    num_recv: int | None       # received rows (None in non-blocking mode: read recv_offsets[R])
    capacity: int              # rows of the receive tensors
    recv_from: list[int] | None
    tokens_per_expert_list: list[int] | None
    transport: Any = None      # the transport's own part (collective: where each destination's rows went)
    layout: str = "token"
    pad_multiple: int = 1
    recv_topk_idx: Any = None  # token layout: [capacity, K] local expert ids
    recv_weights: Any = None   # expert layout: [capacity] weight of each row's pair
    expert_offsets_list: list[int] | None = None  # expert layout, default mode: [E/R + 1] segment starts
    weights_node: Any = None   # the routed weights as autograd saw them, when dispatch was recorded
    recorded: bool = False     # held by autograd (a recorded dispatch or combine): its backward reads it

    @property
    def token_slot(self) -> Any:
        """[T, R] int32: slot of token t at rank r, or -1."""
        return self.arrays["token_slot"]

    @property
    def is_token_in_rank(self) -> Any:
        """[T, R] bool."""
        return self.arrays["is_token_in_rank"]

    @property
    def recv_offsets(self) -> Any:
        """[R + 1] int32: first received row of each source; [R] is the total."""
        return self.arrays["recv_offsets"]

    @property
    def rows(self) -> int:
        """Rows of recv_x, and so of y in combine."""
        return self.capacity


class Transport(Protocol):
    """How a Buffer's tokens move. Registered by name in ep_jit/transports/__init__.py."""

    templates: ClassVar[tuple[str, ...]]  # the templates whose kernels it launches
    features: ClassVar[frozenset[str]]    # of "expert layout", "autograd"
    closed: bool
    kernels: Kernels

    @staticmethod
    def check_setup(group: Any, size: int, num_sms: int) -> None:
        """Refuse what this transport cannot do, before any CUDA call."""

    def __init__(self, setup: Setup) -> None: ...
    def check_error(self) -> None: ...
    def raise_pending(self) -> None: ...
    def check_operation(self, op: Operation, capacity: int | None) -> None: ...
    def dispatch(self, op: Operation, x: TensorView, topk_idx: TensorView, topk_weights: TensorView,
                 scales: TensorView | None, capacity: int | None, pad_multiple: int | None,
                 out: DispatchResult | None = None) -> tuple[DispatchResult, list]: ...
    # out: a result of the same shapes to overwrite and return (non-blocking mode)
    def combine(self, op: Operation, y: TensorView, handle: Handle, rows: int, weights: bool = True,
                scalars: TensorView | None = None, out: Any = None) -> tuple[Any, Any, list]: ...
    # out: the tensor to write combine's output into, else a new one
    # A repeat of an operation from the addresses of tensors the Buffer checked, on the current
    # stream; False (nothing done) sends it through the full path above:
    def dispatch_again(self, adapter: Adapter, stream: int, out: DispatchResult, x: int, topk_idx: int,
                       topk_weights: int, scales: int) -> bool: ...
    def combine_again(self, adapter: Adapter, stream: int, handle: Handle, y: int, out: int) -> bool: ...
    def restage(self, op: Operation, g: TensorView, handle: Handle) -> tuple[Any, list]: ...
    def close(self, wait_for_peers: bool) -> None: ...


class DispatchResult(NamedTuple):
    """Token layout: recv_topk_idx / recv_topk_weights [rows, K]. Expert layout: those are
    None, and recv_weights [rows] and expert_offsets [E/R + 1] (device) are set."""

    recv_x: Any
    recv_topk_idx: Any
    recv_topk_weights: Any
    recv_scales: Any
    tokens_per_expert: Any
    handle: Handle
    recv_weights: Any = None
    expert_offsets: Any = None


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
