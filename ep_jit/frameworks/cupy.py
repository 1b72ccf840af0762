"""CuPy adapter. bf16 and fp8 arrays use ml_dtypes' numpy dtypes where CuPy has them."""

from __future__ import annotations

import math
from typing import Any, Sequence

import cupy

from . import DTYPE_NAMES, AdapterBase

_NUMPY = {v: k for k, v in DTYPE_NAMES.items()}


class CupyAdapter(AdapterBase):
    name = "cupy"

    def pointer(self, t: cupy.ndarray) -> int:
        return t.data.ptr

    def shape(self, t: cupy.ndarray) -> tuple[int, ...]:
        return tuple(t.shape)

    def dtype(self, t: cupy.ndarray) -> str:
        return DTYPE_NAMES.get(t.dtype.name, t.dtype.name)

    def device(self, t: cupy.ndarray) -> int:
        return t.device.id

    def is_contiguous(self, t: cupy.ndarray) -> bool:
        return t.flags.c_contiguous

    def current_stream(self, device: int) -> int:
        with cupy.cuda.Device(device):
            return cupy.cuda.get_current_stream().ptr

    def stream_handle(self, stream: Any) -> int | None:
        return stream.ptr if isinstance(stream, cupy.cuda.Stream) else None

    def empty(self, shape: Sequence[int], dtype: str, device: int, stream: int | None) -> cupy.ndarray:
        with cupy.cuda.Device(device):
            return cupy.empty(tuple(shape), dtype=_numpy_dtype(dtype))

    def view(self, storage: cupy.ndarray, offset: int, shape: Sequence[int], dtype: str) -> cupy.ndarray:
        typed = storage.view(_numpy_dtype(dtype))
        start = offset // typed.itemsize
        return typed[start:start + math.prod(shape)].reshape(tuple(shape))


def _numpy_dtype(dtype: str):
    import numpy
    if dtype in ("float32", "int64", "int32", "bool", "uint8"):
        return numpy.dtype(_NUMPY[dtype])
    return _ml_dtype(dtype)


def _ml_dtype(dtype: str):
    import ml_dtypes
    return {"bf16": ml_dtypes.bfloat16, "fp8_e4m3": ml_dtypes.float8_e4m3fn}[dtype]
