"""Exception types. Every error ep_jit raises on purpose is one of these or a
ValueError/TypeError that names the argument, the expected and the actual value."""

from __future__ import annotations

from typing import Any


class EPJitError(RuntimeError):
    """Base class of ep_jit's own errors."""


class ConfigError(EPJitError):
    """An EP_JIT_* setting or the cache root cannot be used."""


class CompileError(EPJitError):
    """NVRTC rejected a kernel. Carries the log, the spec, the key and the source."""

    def __init__(self, message: str, *, spec: Any, key: str, log: str, source: str) -> None:
        super().__init__(f"{message}\nspec: {spec}\nkey: {key}\nNVRTC log:\n{log}")
        self.spec = spec
        self.key = key
        self.log = log
        self.source = source


class PeerTimeout(EPJitError):
    """A peer did not reach a phase in time; the Buffer cannot be used any more."""


class NotWarmError(EPJitError):
    """EP_JIT_REQUIRE_WARM=1 and a kernel is in no cache tier; nothing was compiled."""


class CudaVersionError(EPJitError):
    """The CUDA driver cannot load the cubins this NVRTC makes."""


class GroupWarmError(EPJitError):
    """A member of the group could not take part in a collective warm; every member raises it."""
