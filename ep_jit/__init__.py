"""ep_jit: JIT-compiled MoE expert-parallel dispatch/combine kernels."""

__version__ = "0.1.0"

import os as _os

from . import config as _config
from .errors import CompileError, ConfigError, CudaVersionError, EPJitError, GroupWarmError, NotWarmError, PeerTimeout
from .coverage import check_warm
from .group import GroupInfo, member_hash
from .group_warm import warm
from .jit import get_kernel, stats
from .kernels import buffer_specs
from .spec import KernelSpec

if _os.environ.get("EP_JIT_LOG"):
    _config.configure_logging()


def __getattr__(name: str):
    # Buffer needs the CUDA driver and a framework; import it only when asked for
    if name == "Buffer":
        from .buffer import Buffer
        return Buffer
    raise AttributeError(f"module 'ep_jit' has no attribute {name!r}")


__all__ = ["Buffer", "CompileError", "ConfigError", "CudaVersionError", "EPJitError", "GroupInfo", "GroupWarmError",
           "KernelSpec", "NotWarmError", "PeerTimeout", "__version__", "buffer_specs", "check_warm", "get_kernel",
           "member_hash", "stats", "warm"]
