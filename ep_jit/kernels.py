"""The kernels an EP Buffer uses, as KernelSpecs.

ep-jit-warm and Buffer both build their kernel lists here, so what is warmed ahead
of time is exactly what a Buffer asks for at run time.
"""

from __future__ import annotations

from typing import Sequence

from .group import member_hash
from .spec import KernelSpec

BUFFER_TEMPLATES: tuple[str, ...] = ("layout", "notify", "dispatch", "combine")


def buffer_specs(*, hidden: int, num_experts: int, topk: int, dtype: str, members: Sequence[int],
                 arch: str) -> list[KernelSpec]:
    """Every spec a Buffer over `members` needs for this model shape."""
    mh = member_hash(members)
    return [KernelSpec(t, hidden, num_experts, len(members), topk, dtype, mh, arch) for t in BUFFER_TEMPLATES]
