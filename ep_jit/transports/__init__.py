"""The transports, by the name `Buffer(transport=...)` takes, and the kernel specs a
Buffer of each asks for (ep-jit-warm warms the same list).

- nvlink: symmetric memory inside one NVLink domain (verified, never assumed).
- collective: the group framework's all_to_all (NCCL), for groups that span domains.
"""

from __future__ import annotations

from typing import Sequence

from ..group import member_hash
from ..spec import KernelSpec
from .base import DispatchResult, Handle, Transport
from .collective import CollectiveTransport
from .nvlink import NVLinkTransport

TRANSPORTS: dict[str, type[Transport]] = {"nvlink": NVLinkTransport, "collective": CollectiveTransport}
BUFFER_TEMPLATES: tuple[str, ...] = tuple(dict.fromkeys(t for c in TRANSPORTS.values() for t in c.templates))


def transport_class(name: str) -> type[Transport]:
    if name not in TRANSPORTS:
        raise ValueError(f"transport: expected one of {list(TRANSPORTS)}, got {name!r}")
    return TRANSPORTS[name]


def buffer_specs(*, hidden: int, num_experts: int, topk: int, dtype: str, members: Sequence[int],
                 arch: str, transport: str | None = None) -> list[KernelSpec]:
    """Every spec a Buffer over `members` needs for this model shape, with one transport
    or (None, for warming ahead of time) with either."""
    mh = member_hash(members)
    templates = BUFFER_TEMPLATES if transport is None else transport_class(transport).templates
    return [KernelSpec(t, hidden, num_experts, len(members), topk, dtype, mh, arch) for t in templates]


__all__ = ["BUFFER_TEMPLATES", "TRANSPORTS", "DispatchResult", "Handle", "Transport", "buffer_specs",
           "transport_class"]
