"""Warm plans: which kernels a whole cluster needs, from flags, a TOML file or a preset.

A job is a product of model shapes (hidden x experts x topk x dtype x arch) over its
EP groups: consecutive blocks of ep_size ranks of world_size, or explicit groups.
Everything a Buffer or a kernel would refuse is refused here, before anything is
built, with the flag or the plan key that holds the bad value.
"""

from __future__ import annotations

import itertools
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from .kernels.constants import MAX_LOCAL_EXPERTS, MAX_RANKS
from .spec import FIELD_NAMES, KernelSpec, canonical_dtype
from .toolchain import check_arch
from .transports import BUFFER_TEMPLATES, buffer_specs

MAX_SPECS = 100_000  # one run builds at most this many kernels
MAX_PLAN_BYTES = 2**20


class PlanError(ValueError):
    """A plan that cannot be expanded; the message is one line."""


@dataclass(frozen=True)
class Origin:
    """Where a job's values were written: errors name the job and the key as the user wrote it."""

    where: str = ""                                        # "" for flags, else "<file> job <n>"
    labels: dict[str, str] = field(default_factory=dict)  # plan key -> flag or key as written

    def error(self, key: str, message: str) -> PlanError:
        label = self.labels.get(key, key)
        return PlanError(f"{self.where}: {label}: {message}" if self.where else f"{label}: {message}")


@dataclass(frozen=True)
class Job:
    name: str
    origin: Origin
    hidden: tuple[int, ...]
    experts: tuple[int, ...]
    topk: tuple[int, ...]
    dtype: tuple[str, ...]
    arch: tuple[str, ...]
    explicit_groups: tuple[tuple[int, ...], ...] | None  # else consecutive blocks of ep_size
    world_size: int
    ep_size: int

    def group_count(self) -> int:
        return len(self.explicit_groups) if self.explicit_groups is not None else self.world_size // self.ep_size

    def groups(self) -> Iterator[tuple[int, ...]]:
        if self.explicit_groups is not None:
            yield from self.explicit_groups
        else:
            for start in range(0, self.world_size, self.ep_size):
                yield tuple(range(start, start + self.ep_size))

    def spec_count(self) -> int:
        """How many specs specs() gives, counted without expanding."""
        shapes = math.prod(len(v) for v in (self.hidden, self.experts, self.topk, self.dtype, self.arch))
        return self.group_count() * shapes * len(BUFFER_TEMPLATES)

    def specs(self) -> Iterator[KernelSpec]:
        for group, h, e, k, d, a in itertools.product(self.groups(), self.hidden, self.experts, self.topk,
                                                      self.dtype, self.arch):
            try:
                yield from buffer_specs(hidden=h, num_experts=e, topk=k, dtype=d, members=group, arch=a)
            except ValueError as exc:  # "<KernelSpec field>: ...": name the key it came from
                name, _, message = str(exc).partition(": ")
                raise self.origin.error(FIELD_NAMES.get(name, name), message) from None


PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": dict(hidden=7168, experts=256, topk=8, dtype=["bf16", "fp8_e4m3"], world_size=8, ep_size=8),
    "qwen3-30b-a3b": dict(hidden=2048, experts=128, topk=8, dtype="bf16", world_size=8, ep_size=8),
    "mixtral-8x7b": dict(hidden=4096, experts=8, topk=2, dtype="bf16", world_size=8, ep_size=8),
    "tiny": dict(hidden=1024, experts=8, topk=2, dtype="bf16", world_size=2, ep_size=2),
}

LIST_KEYS = {"hidden": int, "experts": int, "topk": int, "dtype": str, "arch": str}  # a value or a list
JOB_KEYS = {"name", *LIST_KEYS, "world_size", "ep_size", "groups"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _values(origin: Origin, key: str, value: Any) -> tuple:
    """A value, or a non-empty flat list of values, of the key's type."""
    kind = LIST_KEYS[key]
    what = "a positive int" if kind is int else "a string"
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    ok = values and all((_is_int(v) and v > 0) if kind is int else isinstance(v, str) for v in values)
    if not ok:
        raise origin.error(key, f"expected {what} or a non-empty list of them, got {value!r}")
    return tuple(dict.fromkeys(values))


def _positive(origin: Origin, key: str, value: Any) -> int:
    if not _is_int(value) or value <= 0:
        raise origin.error(key, f"expected a positive int, got {value!r}")
    return value


def _explicit_groups(origin: Origin, raw: Any, world_size: int | None) -> tuple[tuple[int, ...], ...]:
    shape = "a non-empty list of non-empty lists of ranks (ints >= 0)"
    if not isinstance(raw, list) or not raw or not all(isinstance(g, list) and g for g in raw):
        raise origin.error("groups", f"expected {shape}, got {raw!r}")
    seen: set[int] = set()
    for group in raw:
        bad = [r for r in group if not _is_int(r) or r < 0 or (world_size is not None and r >= world_size)]
        if bad:
            limit = f" below world_size={world_size}" if world_size is not None else ""
            raise origin.error("groups", f"expected ranks (ints >= 0{limit}), got {bad[0]!r} in {group!r}")
        if len(set(group)) != len(group):
            raise origin.error("groups", f"expected each rank once in a group, got {group!r}")
        if seen & set(group):
            raise origin.error("groups", f"expected groups that do not overlap, got rank {min(seen & set(group))} "
                                         f"in two groups")
        seen |= set(group)
    return tuple(tuple(g) for g in raw)


def _group_layout(origin: Origin, table: dict) -> tuple[tuple[tuple[int, ...], ...] | None, int, int]:
    """(explicit groups or None, world_size, ep_size)."""
    world = _positive(origin, "world_size", table["world_size"]) if "world_size" in table else None
    if "groups" in table:
        if "ep_size" in table:
            raise origin.error("ep_size", "give either groups or ep_size, not both")
        groups = _explicit_groups(origin, table["groups"], world)
        return groups, world or max(max(g) for g in groups) + 1, 0
    if world is None:
        raise origin.error("world_size", "expected world_size (and ep_size) or groups, got neither")
    ep = _positive(origin, "ep_size", table.get("ep_size", world))
    if world % ep:
        raise origin.error("world_size", f"expected a multiple of ep_size={ep}, got {world}")
    return None, world, ep


def _check_buffer_limits(origin: Origin, size_key: str, sizes: set[int], experts: tuple[int, ...]) -> None:
    """The Buffer's limits on ranks per group and experts per rank."""
    if max(sizes) > MAX_RANKS:
        raise origin.error(size_key, f"expected at most {MAX_RANKS} ranks per group, got {max(sizes)}")
    for e in experts:
        local = max(e // s for s in sizes)
        if local > MAX_LOCAL_EXPERTS:
            raise origin.error("experts", f"expected at most {MAX_LOCAL_EXPERTS} experts per rank, got {e} experts "
                                          f"over {min(sizes)} ranks")


def job_from_table(table: Any, origin: Origin, default_arch: str) -> Job:
    """Validate one job's table (TOML [[job]], a preset, or the CLI flags)."""
    if not isinstance(table, dict):
        raise PlanError(f"{origin.where}: expected a table of job keys, got {table!r}")
    unknown = set(table) - JOB_KEYS
    if unknown:
        raise origin.error(sorted(unknown)[0], f"unknown key; expected some of {sorted(JOB_KEYS)}")
    for required in ("hidden", "experts", "topk"):
        if required not in table:
            raise origin.error(required, "expected a value, it is missing")
    name = table.get("name", origin.where or "flags")
    if not isinstance(name, str):
        raise origin.error("name", f"expected a string, got {name!r}")
    values = {k: _values(origin, k, table[k]) for k in LIST_KEYS if k in table}
    try:
        dtypes = tuple(dict.fromkeys(canonical_dtype(d) for d in values.get("dtype", ("bf16",))))
    except ValueError as exc:
        raise origin.error("dtype", str(exc).partition(": ")[2]) from None
    arches = values.get("arch", (default_arch,))
    for a in arches:
        try:
            check_arch(a)
        except ValueError as exc:
            raise origin.error("arch", str(exc).partition(": ")[2]) from None
    groups, world, ep = _group_layout(origin, table)
    sizes = {len(g) for g in groups} if groups is not None else {ep}
    size_key = "groups" if groups is not None else "ep_size" if "ep_size" in table else "world_size"
    _check_buffer_limits(origin, size_key, sizes, values["experts"])
    return Job(name=name, origin=origin, hidden=values["hidden"], experts=values["experts"], topk=values["topk"],
               dtype=dtypes, arch=arches, explicit_groups=groups, world_size=world, ep_size=ep)


def preset_job(name: str, default_arch: str) -> Job:
    """The job of a preset, as ep-jit-warm --preset NAME builds it (without other flags)."""
    return job_from_table({**PRESETS[name], "name": name}, Origin(where=f"preset {name}"), default_arch)


def _read_text(path: Path) -> str:
    try:
        if not path.is_file():
            raise PlanError(f"--plan: expected a file, got {path}")
        if path.stat().st_size > MAX_PLAN_BYTES:
            raise PlanError(f"--plan: expected at most {MAX_PLAN_BYTES} bytes, got {path.stat().st_size} in {path}")
        data = path.read_bytes()
    except OSError as exc:
        raise PlanError(f"--plan: cannot read {path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PlanError(f"--plan: {path} is not UTF-8 text (byte {exc.start})") from None


def load_plan(path: Path, default_arch: str) -> list[Job]:
    try:
        doc = tomllib.loads(_read_text(Path(path)))
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"--plan: {path} is not valid TOML: {exc}") from None
    jobs = doc.get("job")
    if set(doc) != {"job"} or not isinstance(jobs, list) or not jobs:
        raise PlanError(f"--plan: expected one or more [[job]] tables and nothing else in {path}")
    return [job_from_table(t, _plan_origin(path, i, t), default_arch) for i, t in enumerate(jobs)]


def _plan_origin(path: Path, index: int, table: Any) -> Origin:
    name = table.get("name") if isinstance(table, dict) else None
    return Origin(f"{path} job {index}" + (f" ({name!r})" if isinstance(name, str) else ""))


def unique_specs(jobs: Iterable[Job]) -> list[KernelSpec]:
    """Every job's specs, once each; refused before expanding when there are more than MAX_SPECS."""
    jobs = list(jobs)
    count = sum(job.spec_count() for job in jobs)
    if count > MAX_SPECS:
        raise PlanError(f"the plan expands to {count} kernels; expected at most {MAX_SPECS} (split it)")
    return list(dict.fromkeys(s for job in jobs for s in job.specs()))
