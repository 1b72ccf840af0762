"""Can this machine's CUDA driver load the cubins this NVRTC makes?

A cubin needs a driver of at least its CUDA major version; within a major, minor version
compatibility lets an older driver load it. Checked at first use, so a mismatch is a
clear error naming both versions and the install that fixes it, never a bare load failure.
"""

from __future__ import annotations

from .errors import CudaVersionError

# the wheels for each driver generation (pyproject.toml's extras)
INSTALL = {12: "pip install 'ep_jit[cu12]'", 13: "pip install 'ep_jit[cu13]'"}
EXTRAS_HINT = f"{INSTALL[13]} for a CUDA 13 driver, {INSTALL[12]} for CUDA 12"


def cuda_major(nvrtc: str) -> int:
    """The CUDA major a cubin of this NVRTC version ("13.0") needs."""
    return int(nvrtc.split(".")[0])


def driver_cuda_version() -> tuple[int, int] | None:
    """The CUDA version the installed driver supports (cuDriverGetVersion), or None where
    there is no driver."""
    try:
        from cuda.bindings import driver
        err, version = driver.cuDriverGetVersion()
    except RuntimeError:  # cuda.pathfinder found no driver library
        return None
    if err != driver.CUresult.CUDA_SUCCESS:
        return None
    return version // 1000, version % 1000 // 10


def incompatibility(driver: tuple[int, int] | None, nvrtc: str) -> str | None:
    """Why the driver cannot load this NVRTC's cubins, with the fix; None if it can (or
    there is no driver to ask)."""
    need = cuda_major(nvrtc)
    if driver is None or driver[0] >= need:
        return None
    fix = INSTALL.get(driver[0])
    wheels = f"install the wheels for this driver ({fix})" if fix else \
        f"ep_jit's wheels need a CUDA {min(INSTALL)} or newer driver"
    return (f"the CUDA driver supports CUDA {driver[0]}.{driver[1]}, but NVRTC is {nvrtc}, whose cubins need a "
            f"CUDA {need} driver: {wheels}, or upgrade the driver")


def check_driver(nvrtc: str) -> None:
    """Raise CudaVersionError if this machine's driver cannot load cubins of `nvrtc`."""
    problem = incompatibility(driver_cuda_version(), nvrtc)
    if problem:
        raise CudaVersionError(problem)
