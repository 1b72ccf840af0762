"""Facts about the compiler toolchain: NVRTC's version, library and targets, and the
CUDA headers it compiles against. They enter the cache key and the configuration view.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

from cuda.bindings import nvrtc
from cuda.pathfinder import DynamicLibNotFoundError, find_nvidia_header_directory, load_nvidia_dynamic_lib

from .compat import EXTRAS_HINT
from .errors import ConfigError, EPJitError

ARCH_PATTERN = re.compile(r"^sm_([0-9]{2,3})([af]?)$")
# CUDA's suffix rules: arch-specific targets ("a") exist from sm_90, family targets ("f") from sm_100.
SUFFIX_FROM = {"": 0, "a": 90, "f": 100}


class NVRTCError(EPJitError):
    """An NVRTC call other than the compile itself failed."""


def check(result: tuple, what: str) -> tuple:
    """The values of an NVRTC call's result tuple; raises if it did not succeed."""
    err, *rest = result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, msg = nvrtc.nvrtcGetErrorString(err)
        raise NVRTCError(f"{what} failed: {msg.decode(errors='replace')}")
    return tuple(rest)


@functools.cache
def nvrtc_version() -> str:
    try:
        major, minor = check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    except DynamicLibNotFoundError as exc:
        raise ConfigError(f"NVRTC: expected the NVRTC library ({EXTRAS_HINT}), found none: {exc}") from None
    return f"{major}.{minor}"


@functools.cache
def nvrtc_library() -> str:
    """Where the NVRTC library that compiles was loaded from."""
    return load_nvidia_dynamic_lib("nvrtc").abs_path


@functools.cache
def supported_archs() -> tuple[int, ...]:
    """The compute capabilities NVRTC can target (75, 80, ..., 120)."""
    (archs,) = check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")
    return tuple(archs)


def is_supported_arch(arch: object) -> bool:
    match = ARCH_PATTERN.match(arch) if isinstance(arch, str) else None
    return match is not None and int(match[1]) in supported_archs() and int(match[1]) >= SUFFIX_FROM[match[2]]


def arch_targets() -> str:
    """The targets in words, for error messages."""
    return ", ".join(f"sm_{a}" for a in supported_archs()) + " (suffix a from sm_90, f from sm_100)"


def check_arch(arch: object, name: str = "arch") -> str:
    """`arch` if this NVRTC can compile for it, else ValueError naming `name`."""
    if not is_supported_arch(arch):
        raise ValueError(f"{name}: expected an arch NVRTC {nvrtc_version()} can target: {arch_targets()}; "
                         f"got {arch!r}")
    return arch


@functools.cache
def cuda_include_dirs() -> tuple[str, ...]:
    dirs = []
    for lib in ("cudart", "cccl"):
        found = find_nvidia_header_directory(lib)
        if found is None:
            raise ConfigError(f"CUDA headers: expected the {lib} headers ({EXTRAS_HINT}), found none")
        dirs.append(str(found))
    return tuple(dirs)


def _define(path: Path, macro: str) -> int:
    match = re.search(rf"#define\s+{macro}\s+(\d+)", path.read_text(errors="replace"))
    if match is None:
        raise ConfigError(f"CUDA headers: expected '#define {macro}' in {path}, found none")
    return int(match.group(1))


@functools.cache
def cuda_header_versions() -> dict[str, int]:
    cudart, cccl = (Path(d) for d in cuda_include_dirs())
    return {"cudart": _define(cudart / "cuda_runtime_api.h", "CUDART_VERSION"),
            "cccl": _define(cccl / "cuda/std/__cccl/version.h", "CCCL_VERSION")}
