"""EP_JIT_* settings, read from the environment when they are needed.

Every variable is listed in README.md ("Configuration"). Bad values raise
ConfigError naming the variable, the expected and the actual value.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import tempfile
from pathlib import Path

from .errors import ConfigError

DEFAULT_ARCH = "sm_90a"
DEFAULT_LOCK_TIMEOUT = 600.0
ARCH_PATTERN = re.compile(r"^sm_[0-9]{2,3}[af]?$")

log = logging.getLogger("ep_jit")


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else None


def cache_root() -> Path:
    """$EP_JIT_CACHE_DIR, else $XDG_CACHE_HOME/ep_jit, else ~/.cache/ep_jit."""
    explicit = _env("EP_JIT_CACHE_DIR")
    if explicit is not None:
        return Path(explicit).expanduser().absolute()
    xdg = _env("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "ep_jit").absolute()


def lock_root() -> Path:
    """Node-local folder for per-key locks: never on the (possibly shared) cache root."""
    explicit = _env("EP_JIT_LOCK_DIR")
    if explicit is not None:
        return Path(explicit).expanduser().absolute()
    return Path(tempfile.gettempdir()) / f"ep_jit-{os.getuid()}" / "locks"


def shared_cache_roots() -> tuple[Path, ...]:
    """$EP_JIT_SHARED_CACHE_DIR: ':'-separated read-only cache roots, searched in order."""
    raw = _env("EP_JIT_SHARED_CACHE_DIR")
    if raw is None:
        return ()
    roots = tuple(Path(p).expanduser().absolute() for p in raw.split(":") if p)
    if not roots:
        raise ConfigError(f"EP_JIT_SHARED_CACHE_DIR: expected ':'-separated folders, got {raw!r}")
    return roots


def require_warm() -> bool:
    """EP_JIT_REQUIRE_WARM=1: a kernel missing from every tier is an error, never a compile."""
    raw = _env("EP_JIT_REQUIRE_WARM")
    if raw not in (None, "0", "1"):
        raise ConfigError(f"EP_JIT_REQUIRE_WARM: expected 0 or 1, got {raw!r}")
    return raw == "1"


def template_dir_override() -> Path | None:
    explicit = _env("EP_JIT_TEMPLATE_DIR")
    return Path(explicit).expanduser().absolute() if explicit else None


def check_arch(arch: str, name: str = "arch") -> str:
    if not isinstance(arch, str) or not ARCH_PATTERN.match(arch):
        raise ValueError(f"{name}: expected an arch like 'sm_90a' or 'sm_100', got {arch!r}")
    return arch


def default_arch() -> str:
    arch = _env("EP_JIT_ARCH") or DEFAULT_ARCH
    if not ARCH_PATTERN.match(arch):
        raise ConfigError(f"EP_JIT_ARCH: expected an arch like 'sm_90a', got {arch!r}")
    return arch


def lock_timeout() -> float:
    raw = _env("EP_JIT_LOCK_TIMEOUT")
    if raw is None:
        return DEFAULT_LOCK_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"EP_JIT_LOCK_TIMEOUT: expected a positive number of seconds, got {raw!r}")
    return value


def allow_shared_cache() -> bool:
    return _env("EP_JIT_ALLOW_SHARED_CACHE") == "1"


def extra_nvrtc_options() -> tuple[str, ...]:
    raw = _env("EP_JIT_NVRTC_OPTIONS")
    return tuple(shlex.split(raw)) if raw else ()


def configure_logging() -> None:
    """Apply EP_JIT_LOG (debug, info, warning, error) to the 'ep_jit' logger."""
    raw = (_env("EP_JIT_LOG") or "warning").upper()
    level = logging.getLevelName(raw)
    if not isinstance(level, int):
        raise ConfigError(f"EP_JIT_LOG: expected one of debug, info, warning, error, got {raw.lower()!r}")
    log.setLevel(level)
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("ep_jit[%(process)d] %(levelname)s: %(message)s"))
        log.addHandler(handler)
