"""ep_jit: JIT-compiled MoE expert-parallel dispatch/combine kernels."""

__version__ = "0.1.0"

import contextlib as _contextlib

from . import config as _config
from .errors import CompileError, ConfigError, EPJitError, PeerTimeout
from .group import GroupInfo, member_hash
from .jit import get_kernel, stats
from .spec import KernelSpec

# Importing never fails on a bad setting: every entry point checks the settings and
# raises ConfigError (the command-line tools exit 2).
if _config.raw("EP_JIT_LOG"):
    with _contextlib.suppress(ConfigError):
        _config.configure_logging()


def __getattr__(name: str):
    # Buffer needs the CUDA driver and a framework; import it only when asked for
    if name == "Buffer":
        from .buffer import Buffer
        return Buffer
    raise AttributeError(f"module 'ep_jit' has no attribute {name!r}")


__all__ = ["Buffer", "CompileError", "ConfigError", "EPJitError", "GroupInfo", "KernelSpec", "PeerTimeout",
           "__version__", "get_kernel", "member_hash", "stats"]
