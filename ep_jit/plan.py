"""Warm plans: which kernels a whole cluster needs, from flags, a TOML file or a preset.

A job is a product of model shapes (hidden x experts x topk x dtype x arch) over its
EP groups: consecutive blocks of ep_size ranks of world_size, or explicit groups.
"""

from __future__ import annotations

import itertools
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .config import check_arch
from .group import GroupInfo
from .transports import buffer_specs
from .spec import KernelSpec, canonical_dtype


class PlanError(ValueError):
    """A plan that cannot be expanded; the message is one line."""


@dataclass(frozen=True)
class Job:
    name: str
    hidden: tuple[int, ...]
    experts: tuple[int, ...]
    topk: tuple[int, ...]
    dtype: tuple[str, ...]
    arch: tuple[str, ...]
    groups: tuple[tuple[int, ...], ...]

    def specs(self) -> list[KernelSpec]:
        out = []
        for group, h, e, k, d, a in itertools.product(self.groups, self.hidden, self.experts, self.topk,
                                                      self.dtype, self.arch):
            try:
                out += buffer_specs(hidden=h, num_experts=e, topk=k, dtype=d, members=group, arch=a)
            except ValueError as exc:
                raise PlanError(f"job {self.name!r}: {exc}") from None
        return out


PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": dict(hidden=7168, experts=256, topk=8, dtype=["bf16", "fp8_e4m3"], world_size=8, ep_size=8),
    "qwen3-30b-a3b": dict(hidden=2048, experts=128, topk=8, dtype="bf16", world_size=8, ep_size=8),
    "mixtral-8x7b": dict(hidden=4096, experts=8, topk=2, dtype="bf16", world_size=8, ep_size=8),
    "tiny": dict(hidden=1024, experts=8, topk=2, dtype="bf16", world_size=2, ep_size=2),
}

JOB_KEYS = {"name", "hidden", "experts", "topk", "dtype", "arch", "world_size", "ep_size", "groups"}


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


def _ints(where: str, name: str, value: Any) -> tuple[int, ...]:
    values = _as_tuple(value)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
        raise PlanError(f"{where}: {name} expected a positive int or a list of them, got {value!r}")
    return values


def consecutive_groups(world_size: int, ep_size: int) -> tuple[tuple[int, ...], ...]:
    if world_size % ep_size:
        raise PlanError(f"world_size: expected a multiple of ep_size={ep_size}, got {world_size}")
    return tuple(tuple(range(s, s + ep_size)) for s in range(0, world_size, ep_size))


def _groups(where: str, table: dict) -> tuple[tuple[int, ...], ...]:
    if "groups" in table:
        if "world_size" in table or "ep_size" in table:
            raise PlanError(f"{where}: give either groups or world_size/ep_size, not both")
        raw = table["groups"]
        if not isinstance(raw, list) or not raw:
            raise PlanError(f"{where}: groups expected a non-empty list of rank lists, got {raw!r}")
        try:
            return tuple(GroupInfo(g, 0).members for g in raw)
        except ValueError as exc:
            raise PlanError(f"{where}: groups: {exc}") from None
    if "world_size" not in table:
        raise PlanError(f"{where}: expected world_size (and ep_size) or groups, got neither")
    (world,) = _ints(where, "world_size", table["world_size"])
    (ep,) = _ints(where, "ep_size", table.get("ep_size", world))
    try:
        return consecutive_groups(world, ep)
    except PlanError as exc:
        raise PlanError(f"{where}: {exc}") from None


def job_from_table(table: dict, where: str, default_arch: str) -> Job:
    """Validate one job's table (TOML [[job]], a preset, or the CLI flags)."""
    unknown = set(table) - JOB_KEYS
    if unknown:
        raise PlanError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(JOB_KEYS)}")
    for required in ("hidden", "experts", "topk"):
        if required not in table:
            raise PlanError(f"{where}: expected {required!r}, it is missing")
    try:
        dtypes = tuple(dict.fromkeys(canonical_dtype(d) for d in _as_tuple(table.get("dtype", "bf16"))))
        arches = tuple(check_arch(a) for a in _as_tuple(table.get("arch", default_arch)))
    except ValueError as exc:
        raise PlanError(f"{where}: {exc}") from None
    return Job(name=str(table.get("name", where)), hidden=_ints(where, "hidden", table["hidden"]),
               experts=_ints(where, "experts", table["experts"]), topk=_ints(where, "topk", table["topk"]),
               dtype=dtypes, arch=arches, groups=_groups(where, table))


def load_plan(path: Path, default_arch: str) -> list[Job]:
    try:
        doc = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise PlanError(f"--plan: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"--plan: {path} is not valid TOML: {exc}") from None
    jobs = doc.get("job")
    if set(doc) != {"job"} or not isinstance(jobs, list) or not jobs:
        raise PlanError(f"--plan: expected one or more [[job]] tables and nothing else in {path}")
    return [job_from_table(t, f"{path} job {i}", default_arch) for i, t in enumerate(jobs)]


def unique_specs(jobs: Iterable[Job]) -> list[KernelSpec]:
    return list(dict.fromkeys(s for job in jobs for s in job.specs()))
