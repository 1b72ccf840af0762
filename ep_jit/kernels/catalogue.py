"""The kernel catalogue: every kernel declared once.

A kernel lives in one template (templates/<template>.cu, one NVRTC compile unit, one
cache entry), is instantiated with the spec's TEMPLATE_PARAMS, runs with a fixed block
size (its __launch_bounds__), and takes one argument struct by value. Transports refer
to kernels by name (`kernels.combine.launch(stream, grid, args)`), never by position.
"""

from __future__ import annotations

from ctypes import Structure
from dataclasses import dataclass

from . import args as a
from .constants import COPY_THREADS, LAYOUT_THREADS

# The KernelSpec fields every kernel is specialised on, in C++ template-parameter order
# (member_hash enters as the group's 64-bit protocol tag).
TEMPLATE_PARAMS = ("hidden", "num_experts", "num_ranks", "topk", "dtype", "member_hash")


@dataclass(frozen=True)
class Kernel:
    name: str                 # how the transports name it
    template: str             # templates/<template>.cu defines it
    symbol: str               # its C++ name in namespace ep_jit
    block: int                # threads per block
    args: type[Structure]     # its one parameter (templates/ep_args.cuh)

    @property
    def file(self) -> str:
        return f"{self.template}.cu"


CATALOGUE: tuple[Kernel, ...] = (
    Kernel("layout", "layout", "layout_kernel", LAYOUT_THREADS, a.LayoutArgs),
    Kernel("dispatch", "dispatch", "dispatch_kernel", COPY_THREADS, a.DispatchArgs),
    Kernel("combine", "combine", "combine_kernel", COPY_THREADS, a.CombineArgs),
    Kernel("count", "collective", "count_kernel", COPY_THREADS, a.CountArgs),
    Kernel("pack", "collective", "pack_kernel", COPY_THREADS, a.PackArgs),
    Kernel("unpack", "collective", "unpack_kernel", COPY_THREADS, a.UnpackArgs),
    Kernel("sum", "collective", "sum_kernel", COPY_THREADS, a.SumArgs),
)
KERNELS: dict[str, Kernel] = {k.name: k for k in CATALOGUE}
# template name -> its kernels, in catalogue order
TEMPLATES: dict[str, tuple[Kernel, ...]] = {
    t: tuple(k for k in CATALOGUE if k.template == t) for t in dict.fromkeys(k.template for k in CATALOGUE)}
