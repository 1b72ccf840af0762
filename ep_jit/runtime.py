"""Driver-level runtime: contexts, loading cubins as libraries, and launches.

Kernels are loaded from plain cubin bytes with cuLibraryLoadData (context-independent)
and launched in the device's primary context, the one PyTorch, CuPy and Paddle use. A
kernel's one parameter is its argument struct, so a launch passes a single pointer.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Iterator

from cuda.bindings import driver

from .compat import check_driver
from .toolchain import nvrtc_version
from .errors import EPJitError
from .kernels import Kernel


class CudaError(EPJitError):
    """A CUDA driver call failed."""


def check(result, what: str):
    """Unwrap a cuda.bindings driver result tuple, raising CudaError on failure."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if err != driver.CUresult.CUDA_SUCCESS:
        _, name = driver.cuGetErrorName(err)
        raise CudaError(f"{what} failed: {name.decode() if name else err}")
    return rest[0] if len(rest) == 1 else tuple(rest) if rest else None


@functools.cache
def _init() -> None:
    check(driver.cuInit(0), "cuInit")
    check_driver(nvrtc_version())  # before any cubin meets the driver


@functools.cache
def primary_context(device: int) -> driver.CUcontext:
    _init()
    dev = check(driver.cuDeviceGet(device), "cuDeviceGet")
    return check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")


@functools.cache
def _context_address(device: int) -> int:
    return int(primary_context(device))


def use_device(device: int) -> None:
    """Make the device's primary context current on this thread (cheap if it already is:
    every operation calls it)."""
    err, current = driver.cuCtxGetCurrent()
    if err != _SUCCESS:
        check((err,), "cuCtxGetCurrent")
    if int(current) != _context_address(device):
        check(driver.cuCtxSetCurrent(primary_context(device)), "cuCtxSetCurrent")


def quiesce(device: int) -> bool:
    """Before freeing at teardown: make the device current and wait for its work.
    False when the context is already gone (interpreter exit), so nothing may be freed."""
    try:
        use_device(device)
        return driver.cuCtxSynchronize()[0] == driver.CUresult.CUDA_SUCCESS
    except Exception:
        return False


@contextlib.contextmanager
def setup_stream(what: str) -> Iterator[int]:
    """A private non-blocking stream for set-up writes, synchronised when the block ends.
    Plain cuMemset* calls are asynchronous and queue behind the legacy stream's work, so
    they could land after the memory was shared; this one waits for nobody else's work."""
    stream = check(driver.cuStreamCreate(driver.CUstream_flags.CU_STREAM_NON_BLOCKING), f"cuStreamCreate({what})")
    try:
        yield int(stream)
        check(driver.cuStreamSynchronize(stream), f"cuStreamSynchronize({what})")
    finally:
        driver.cuStreamDestroy(stream)


def mapped_host_memory(nbytes: int, what: str) -> tuple[int, int]:
    """Zeroed pinned host memory that kernels write and the host polls: (host address,
    device address). Free it with cuMemFreeHost."""
    host = int(check(driver.cuMemHostAlloc(nbytes, driver.CU_MEMHOSTALLOC_DEVICEMAP |
                                           driver.CU_MEMHOSTALLOC_PORTABLE), f"cuMemHostAlloc({what})"))
    ctypes.memset(host, 0, nbytes)
    return host, int(check(driver.cuMemHostGetDevicePointer(host, 0), f"cuMemHostGetDevicePointer({what})"))


def device_attribute(device: int, attribute: driver.CUdevice_attribute) -> int:
    _init()
    return check(driver.cuDeviceGetAttribute(attribute, check(driver.cuDeviceGet(device), "cuDeviceGet")),
                 f"cuDeviceGetAttribute({attribute.name})")


def device_arch(device: int) -> str:
    """sm_XY, with the 'a' suffix (arch-specific features) from Hopper on."""
    attr = driver.CUdevice_attribute
    major = device_attribute(device, attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
    minor = device_attribute(device, attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
    return f"sm_{major}{minor}{'a' if major >= 9 else ''}"


class Library:
    """A cubin loaded with cuLibraryLoadData: context-independent, so its kernels run in
    the primary context the frameworks use. Knows nothing of where the bytes came from."""

    def __init__(self, cubin: bytes, device: int, what: str) -> None:
        use_device(device)
        self.what = what
        self.library = check(driver.cuLibraryLoadData(cubin, None, None, 0, None, None, 0), f"loading {what}")

    def kernel(self, symbol: str, declaration: Kernel) -> "LoadedKernel":
        """The kernel with mangled name `symbol`, launched as `declaration` says."""
        handle = check(driver.cuLibraryGetKernel(self.library, symbol.encode()), f"cuLibraryGetKernel({symbol})")
        return LoadedKernel(check(driver.cuKernelGetFunction(handle), "cuKernelGetFunction"), declaration)


class LoadedKernel:
    """One kernel, ready to launch on a stream with its argument struct. It keeps the struct's
    address and the launch configuration between launches: one thread launches it at a time."""

    def __init__(self, function: driver.CUfunction, declaration: Kernel) -> None:
        self.function = function
        self.declaration = declaration
        self._args: ctypes.Structure | None = None
        self._params = (ctypes.c_void_p * 1)()  # the kernel's parameters: the struct's address
        self._params_address = ctypes.addressof(self._params)
        # the launch configuration of the last (stream, grid): a launch then converts no arguments
        self._config, self._stream, self._grid = driver.CUlaunchConfig(), None, None

    def launch(self, stream: int, grid: int, args: ctypes.Structure) -> None:
        """Launch `grid` blocks of the declared size; `args` is the kernel's struct, which
        the launch copies before it returns (so the caller may reuse it at once)."""
        if args is not self._args:
            if type(args) is not self.declaration.args:
                raise TypeError(f"{self.declaration.name}: expected {self.declaration.args.__name__}, "
                                f"got {type(args).__name__}")
            self._args, self._params[0] = args, ctypes.addressof(args)
        if stream != self._stream or grid != self._grid:
            self._configure(stream, grid)
        err, = _cuLaunchKernelEx(self._config, self.function, self._params_address, 0)
        if err != _SUCCESS:
            check((err,), f"launching {self.declaration.name} (grid {grid}, block {self.declaration.block})")

    def _configure(self, stream: int, grid: int) -> None:
        config = self._config
        config.gridDimX, config.gridDimY, config.gridDimZ = grid, 1, 1
        config.blockDimX, config.blockDimY, config.blockDimZ = self.declaration.block, 1, 1
        config.sharedMemBytes, config.hStream, config.numAttrs = 0, driver.CUstream(stream), 0
        self._stream, self._grid = stream, grid


_cuLaunchKernelEx = driver.cuLaunchKernelEx
_SUCCESS = driver.CUresult.CUDA_SUCCESS
