"""Driver-level runtime: contexts, loading cubins as libraries, and launches.

Kernels are loaded with cuLibraryLoadData (context-independent) and launched in the
device's primary context, the one PyTorch, CuPy and Paddle use. Each kernel keeps its
parameter storage, so a launch costs one ctypes initialisation and one cuLaunchKernel.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import time
from typing import Iterator, Sequence

from cuda.bindings import driver

from .compat import check_driver
from .compiler import nvrtc_version
from .config import log
from .errors import EPJitError
from .jit import KernelBinary, record_load

SHARED_MEMORY_DEFAULT_LIMIT = 48 * 1024


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


def use_device(device: int) -> None:
    """Make the device's primary context current on this thread (cheap if it already is)."""
    ctx = primary_context(device)
    if int(check(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")) != int(ctx):
        check(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")


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


class ArgPack:
    """Persistent ctypes storage for one kernel's parameters, in cuLaunchKernel's form.

    The pointer array is built once; a launch only re-initialises the values, which
    cuLaunchKernel copies before it returns, so the storage is reused at once.
    """

    def __init__(self, types: Sequence[type]) -> None:
        fields = [(f"a{i}", t) for i, t in enumerate(types)]
        self.storage = type("Params", (ctypes.Structure,), {"_fields_": fields})()
        base = ctypes.addressof(self.storage)
        offsets = [getattr(type(self.storage), name).offset for name, _ in fields]
        self.pointers = (ctypes.c_void_p * len(fields))(*[base + o for o in offsets])
        self.address = ctypes.addressof(self.pointers)

    def set(self, values: Sequence) -> int:
        ctypes.Structure.__init__(self.storage, *values)
        return self.address


class LoadedKernel:
    """One kernel of a loaded library, ready to launch on a stream.

    Not for concurrent launches from several threads: the parameter storage is shared
    (a Buffer's operations are collective and ordered anyway)."""

    def __init__(self, function: driver.CUfunction, name: str, signature: Sequence[type]) -> None:
        self.function = function
        self.name = name
        self._set_args = ArgPack(signature).set
        self.shared_memory = 0

    def use_shared_memory(self, nbytes: int) -> None:
        """Dynamic shared memory for every later launch; above 48 KB the kernel is opted in."""
        if nbytes > SHARED_MEMORY_DEFAULT_LIMIT:
            check(driver.cuFuncSetAttribute(
                self.function, driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                nbytes), f"opting {self.name} in to {nbytes} bytes of shared memory")
        self.shared_memory = nbytes

    def launch(self, grid: int, block: int, stream: int, *args) -> None:
        """Launch with `args` in the kernel's parameter order (ints for pointers)."""
        err, = _cuLaunchKernel(self.function, grid, 1, 1, block, 1, 1, self.shared_memory, stream,
                               self._set_args(args), 0)
        if err != _SUCCESS:
            check((err,), f"launching {self.name} (grid {grid}, block {block})")


_cuLaunchKernel = driver.cuLaunchKernel
_SUCCESS = driver.CUresult.CUDA_SUCCESS


class Module:
    """A KernelBinary loaded into the device's primary context."""

    def __init__(self, binary: KernelBinary, device: int, signatures: Sequence[Sequence[type]]) -> None:
        """`signatures[i]`: the ctypes types of kernel i's parameters, in order."""
        use_device(device)
        start = time.perf_counter()
        self.binary = binary
        self.library = check(driver.cuLibraryLoadData(binary.cubin, None, None, 0, None, None, 0),
                             f"loading {binary.spec.describe()} (key {binary.key[:16]})")
        self.kernels = []
        for index in range(len(binary.lowered_names)):
            name = binary.symbol(index)
            kernel = check(driver.cuLibraryGetKernel(self.library, name.encode()), f"cuLibraryGetKernel({name})")
            self.kernels.append(LoadedKernel(check(driver.cuKernelGetFunction(kernel), "cuKernelGetFunction"),
                                             binary.spec.name_expressions()[index], signatures[index]))
        seconds = time.perf_counter() - start
        record_load(seconds)
        log.debug("loaded %s in %.2f ms", binary.spec.describe(), seconds * 1e3)

    def __getitem__(self, index: int) -> LoadedKernel:
        return self.kernels[index]
