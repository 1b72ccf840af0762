"""Coverage: does every kernel of a plan sit in the local cache or a shared tier, and if
not, why not.

ep-jit-warm records what it covered in `<root>/coverage/`: the kernels (spec, key and
every key input) and the environment that made them (ep_jit, NVRTC and CUDA header
versions, the arches, the CUDA major its cubins need). A kernel missing from every
tier is explained from those records: a record that covers the same spec under another
key says which key input of this environment differs ("warmed with NVRTC 13.5, this
environment has 13.0").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from . import compat
from .cache import CacheWriteError, CorruptEntry, DiskCache, Entry
from .config import default_arch
from .jit import spec_inputs
from .plan import PRESETS, load_plan, preset_job, unique_specs
from .shared import read_shared, shared_caches
from .spec import KernelSpec
from .toolchain import cuda_header_versions, nvrtc_version
from .version import __version__

RECORD_FORMAT = 1
RECORDS_DIR = "coverage"
# key inputs that come from the environment rather than the spec, as a person names them
ENVIRONMENT_INPUTS = {"nvrtc": "NVRTC", "cuda_headers": "CUDA headers", "ep_jit": "ep_jit",
                      "source_sha256": "template sources (sha256)", "options": "NVRTC options",
                      "format": "cache format"}


def _spec_fields(spec: KernelSpec) -> dict:
    return {"template": spec.template, **spec.params(), "member_hash": spec.member_hash, "arch": spec.arch}


def environment() -> dict:
    """What the keys made here depend on besides the spec."""
    nvrtc = nvrtc_version()
    return {"ep_jit": __version__, "nvrtc": nvrtc, "cuda_headers": cuda_header_versions(),
            "cuda_major": compat.cuda_major(nvrtc)}


def record(cache: DiskCache, specs: Iterable[KernelSpec]) -> Path:
    """Write ep-jit-warm's coverage record for `specs` into `cache`. The file name is a hash
    of the contents, so warming the same plan again rewrites the same record."""
    kernels = []
    for spec in specs:
        inputs, key = spec_inputs(spec)
        kernels.append({"key": key, "spec": _spec_fields(spec), "inputs": inputs})
    body = {"format": RECORD_FORMAT, "environment": {**environment(), "arches": sorted({k["spec"]["arch"]
                                                                                      for k in kernels})},
            "kernels": kernels}
    name = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]
    doc = {**body, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    folder = cache.root / RECORDS_DIR
    try:
        cache.ensure_root()
        cache.private_folder(folder)  # never through a link, never over a file
        target = folder / f"{name}.json"
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".record.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1, sort_keys=True)
            os.replace(tmp, target)  # readers see the old record or the new one, never half of one
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise CacheWriteError(f"coverage record in {folder}: {exc}") from None
    return target


def records(caches: Iterable[DiskCache]) -> list[dict]:
    """Every readable coverage record in these caches (read only)."""
    out = []
    for cache in caches:
        folder = cache.root / RECORDS_DIR
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else ():
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and doc.get("format") == RECORD_FORMAT:
                out.append(doc)
    return out


@dataclass
class Miss:
    spec: KernelSpec
    key: str
    reasons: list[str]


@dataclass
class Coverage:
    """The answer of check_warm: `ok` when every kernel is in a tier and the driver can load them."""

    specs: int
    driver: str
    local: int = 0
    shared: int = 0
    missing: list[Miss] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.problems

    def lines(self) -> list[str]:
        out = [f"{self.specs} kernels: {self.local} in the local cache, {self.shared} in shared tiers, "
               f"{len(self.missing)} missing; CUDA driver: {self.driver}"]
        out += [f"MISSING {m.spec.describe()} key {m.key[:16]}: {'; '.join(m.reasons)}" for m in self.missing]
        out += [f"PROBLEM {p}" for p in self.problems]
        return out

    def as_dict(self) -> dict:
        return {"ok": self.ok, "specs": self.specs, "driver": self.driver, "local": self.local, "shared": self.shared,
                "missing": [{"spec": m.spec.describe(), "key": m.key, "reasons": m.reasons} for m in self.missing],
                "problems": self.problems}


def plan_specs(plan: str | os.PathLike | Iterable[KernelSpec] | None = None, preset: str | None = None
               ) -> list[KernelSpec]:
    """The specs of a plan file, of a preset (see ep-jit-warm), or the specs themselves."""
    if (plan is None) == (preset is None):
        raise ValueError("plan: expected a plan file or specs, or a preset, and not both")
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
        return unique_specs([preset_job(preset, default_arch())])
    if isinstance(plan, (str, os.PathLike)):
        return unique_specs(load_plan(Path(plan), default_arch()))
    return list(dict.fromkeys(plan))


def check_warm(plan: str | os.PathLike | Iterable[KernelSpec] | None = None, *, preset: str | None = None,
               cache_dir: str | os.PathLike | None = None) -> Coverage:
    """Which kernels of `plan` (a plan file, or specs) or `preset` are in the local cache
    (`cache_dir`, default the configured one) or a shared tier, why the others are not, and
    whether this machine's CUDA driver can load them. Reads only; compiles nothing."""
    specs = plan_specs(plan, preset)
    local = DiskCache(Path(cache_dir) if cache_dir is not None else None)
    nvrtc, driver = nvrtc_version(), compat.driver_cuda_version()
    result = Coverage(len(specs), f"CUDA {driver[0]}.{driver[1]}" if driver else
                      f"none here, not checked (these cubins need CUDA {compat.cuda_major(nvrtc)})")
    known = _by_spec(records([local, *shared_caches()]))
    for spec in specs:
        inputs, key = spec_inputs(spec)
        entry, tier = _present(local, key)
        if entry is not None and not entry.failed:
            setattr(result, tier, getattr(result, tier) + 1)
            continue
        reasons = ["its compile failed (cache-inspect show gives the NVRTC log)"] if entry is not None else \
            _explain(inputs, key, known.get(_canonical(_spec_fields(spec)), []))
        result.missing.append(Miss(spec, key, reasons))
    problem = compat.incompatibility(driver, nvrtc)
    if problem:
        result.problems.append(problem)
    return result


def _present(local: DiskCache, key: str) -> tuple[Entry | None, str]:
    try:
        return local.load(local.entry_path(key)), "local"
    except (CorruptEntry, OSError):
        return read_shared(key), "shared"


def _canonical(obj: dict) -> str:
    return json.dumps(obj, sort_keys=True)


def _by_spec(docs: list[dict]) -> dict[str, list[dict]]:
    """Recorded kernels, by their spec."""
    out: dict[str, list[dict]] = {}
    for doc in docs:
        for k in doc.get("kernels", []):
            if isinstance(k, dict) and isinstance(k.get("spec"), dict) and isinstance(k.get("inputs"), dict):
                out.setdefault(_canonical(k["spec"]), []).append(k)
    return out


def _explain(inputs: dict, key: str, recorded: list[dict]) -> list[str]:
    if not recorded:
        return ["no ep-jit-warm run recorded in these caches covers it"]
    if any(k["key"] == key for k in recorded):
        return ["it was warmed with this environment's key, but its entry is gone (pruned or removed)"]
    reasons = []
    for k in recorded:
        for name, label in ENVIRONMENT_INPUTS.items():
            theirs, ours = k["inputs"].get(name), inputs.get(name)
            if theirs != ours:
                reasons.append(f"warmed with {label} {_show(theirs)}, this environment has {_show(ours)}")
    return list(dict.fromkeys(reasons)) or ["warmed under another key (other key inputs)"]


def _show(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in sorted(value.items()))
    if isinstance(value, str) and len(value) == 64:
        return value[:12]
    return " ".join(value) if isinstance(value, list) else str(value)
