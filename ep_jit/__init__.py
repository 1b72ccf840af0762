"""ep_jit: JIT-compiled MoE expert-parallel dispatch/combine kernels."""

import contextlib as _contextlib

from . import config as _config
from .version import __version__
from .errors import CompileError, ConfigError, CudaVersionError, EPJitError, GroupWarmError, NotWarmError, PeerTimeout
from .coverage import check_warm
from .group import GroupInfo, member_hash
from .group_warm import warm
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
    if name == "buffer_specs":  # lists the transports' templates, so it imports the transports
        from .transports import buffer_specs
        return buffer_specs
    raise AttributeError(f"module 'ep_jit' has no attribute {name!r}")


__all__ = ["Buffer", "CompileError", "ConfigError", "CudaVersionError", "EPJitError", "GroupInfo", "GroupWarmError",
           "KernelSpec", "NotWarmError", "PeerTimeout", "__version__", "buffer_specs", "check_warm", "get_kernel",
           "member_hash", "stats", "warm"]
