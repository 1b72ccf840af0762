"""Group identity: who is in an EP group, in which order, and its member hash.

The member hash is the cache's notion of a group. Framework group ids are creation
counters that differ between processes and runs, so they are never used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence


def member_hash(members: Sequence[int]) -> str:
    """sha256 of the global ranks in group-rank order, as hex."""
    canonical = f"v1|n={len(members)}|{','.join(str(m) for m in members)}"
    return hashlib.sha256(canonical.encode()).hexdigest()


def group_tag(member_hash_hex: str) -> int:
    """64-bit protocol tag baked into kernels: peers from another group never match it."""
    return int(member_hash_hex[:16], 16)


def _check_members(members: Any) -> tuple[int, ...]:
    if isinstance(members, (str, bytes)) or not isinstance(members, Sequence):
        raise ValueError(f"members: expected a non-empty list of unique non-negative ints, got {members!r}")
    if len(members) == 0:
        raise ValueError("members: expected a non-empty list of unique non-negative ints, got []")
    for m in members:
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"members: expected non-negative ints, got {m!r} in {list(members)!r}")
    if len(set(members)) != len(members):
        raise ValueError(f"members: expected unique ranks, got duplicates in {list(members)!r}")
    return tuple(int(m) for m in members)


@dataclass(frozen=True)
class GroupInfo:
    """An EP group: global ranks in group-rank order, and this process's group rank."""

    members: tuple[int, ...]
    rank: int

    def __init__(self, members: Sequence[int], rank: int) -> None:
        checked = _check_members(members)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < len(checked):
            raise ValueError(f"rank: expected an int in [0, {len(checked)}), got {rank!r}")
        object.__setattr__(self, "members", checked)
        object.__setattr__(self, "rank", rank)

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def member_hash(self) -> str:
        return member_hash(self.members)

    @property
    def tag(self) -> int:
        return group_tag(self.member_hash)

    @classmethod
    def from_torch(cls, group: Any = None) -> "GroupInfo":
        """From a torch.distributed process group (None: the default group)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError("group: torch.distributed is not initialized; call init_process_group first")
        pg = group if group is not None else dist.group.WORLD
        return cls._with_me(dist.get_process_group_ranks(pg), dist.get_rank())

    @classmethod
    def from_paddle(cls, group: Any = None) -> "GroupInfo":
        """From a paddle.distributed group (None: the global group).

        `group.ranks` are global ranks. A single-member group reports rank -1 even on
        its member, so the rank is found from the global rank instead.
        """
        import paddle.distributed as dist

        pg = group if group is not None else dist.collective._get_global_group()
        return cls._with_me(list(pg.ranks), dist.get_rank())

    @classmethod
    def _with_me(cls, members: list[int], me: int) -> "GroupInfo":
        if me not in members:
            raise ValueError(f"group: this process (global rank {me}) is not a member of {members}")
        return cls(members, members.index(me))
