"""EP_JIT_* settings: every variable is declared and parsed here, and nowhere else.

A bad value raises ConfigError naming the variable, the expected form and the value.
The table in README.md ("Configuration") lists the same variables and forms.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import toolchain
from .errors import ConfigError

DEFAULT_ARCH = "sm_90a"
DEFAULT_LOCK_TIMEOUT = 600.0
DEFAULT_FUSED_DISPATCH_TOKENS = 256
NAME_MAX, PATH_MAX = 255, 4096  # Linux limits on one path component and a whole path
LOG_LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger("ep_jit")


def folder_problem(path: Path, must_exist: bool = False) -> str | None:
    """Why `path` cannot be used as a folder (or, unless must_exist, be created as one)."""
    text = os.fsencode(path)
    if len(text) >= PATH_MAX or any(len(part) > NAME_MAX for part in text.split(b"/")):
        return f"longer than {PATH_MAX} bytes, or a name in it longer than {NAME_MAX}"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != path and must_exist:
        return "it does not exist"
    return None if existing.is_dir() else f"{existing} is not a folder"


def check_folder(path: Path, name: str) -> Path:
    """`path` if it is a folder or can be created as one, else ConfigError naming `name`."""
    problem = folder_problem(path)
    if problem is not None:
        raise ConfigError(f"{name}: expected a folder path, got {_shown(str(path))}; {problem}")
    return path


def _shown(text: str) -> str:
    return repr(text if len(text) <= 200 else text[:200] + "...")


# Parsers: text -> value, or ValueError whose message (possibly empty) says why.

def _path(raw: str) -> Path:
    return Path(raw).expanduser().absolute()


def _folder(raw: str, must_exist: bool = False) -> Path:
    path = _path(raw)
    problem = folder_problem(path, must_exist)
    if problem is not None:
        raise ValueError(problem)
    return path


def _folders(raw: str) -> tuple[Path, ...]:
    roots = tuple(_folder(part) for part in raw.split(":") if part)
    if not roots:
        raise ValueError("")
    return roots


def _positive_seconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError("")
    return value


def _flag(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError("")
    return raw == "1"


def _count(raw: str) -> int:
    if not raw.isdigit():
        raise ValueError("")
    return int(raw)


def _log_level(raw: str) -> str:
    if raw.lower() not in LOG_LEVELS:
        raise ValueError("")
    return raw.lower()


def _arch(raw: str) -> str:
    if not toolchain.is_supported_arch(raw):
        raise ValueError(f"NVRTC {toolchain.nvrtc_version()} targets {toolchain.arch_targets()}")
    return raw


def _options(raw: str) -> tuple[str, ...]:
    try:
        return tuple(shlex.split(raw))
    except ValueError as exc:
        raise ValueError(str(exc).lower()) from None


@dataclass(frozen=True)
class Setting:
    name: str
    form: str      # the expected form, as errors and the README say it
    default: str   # what applies when it is unset, in words
    meaning: str
    parse: Callable[[str], Any]


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    Setting("EP_JIT_CACHE_DIR", "a folder path", "$XDG_CACHE_HOME/ep_jit, else ~/.cache/ep_jit",
            "cache root (created 0700)", _folder),
    Setting("EP_JIT_ALLOW_SHARED_CACHE", "0 or 1", "0",
            "1 accepts a cache root that group/others can write or another user owns", _flag),
    Setting("EP_JIT_ARCH", "an arch NVRTC can target, like sm_90a", DEFAULT_ARCH,
            "default arch of ep-jit-warm", _arch),
    Setting("EP_JIT_LOG", "one of " + ", ".join(LOG_LEVELS), "warning", "level of the ep_jit logger", _log_level),
    Setting("EP_JIT_LOCK_TIMEOUT", "a positive number of seconds", f"{DEFAULT_LOCK_TIMEOUT:g}",
            "wait for another process compiling the same key, then compile anyway", _positive_seconds),
    Setting("EP_JIT_LOCK_DIR", "a folder path", "$TMPDIR/ep_jit-<uid>/locks",
            "node-local folder for per-key locks (created 0700, must be this user's)", _folder),
    Setting("EP_JIT_NVRTC_OPTIONS", "NVRTC options in shell syntax, like -lineinfo", "none",
            "extra NVRTC options (part of the key)", _options),
    Setting("EP_JIT_TEMPLATE_DIR", "an existing folder path", "the installed templates",
            "compile templates from another folder (its sources enter the key)",
            functools.partial(_folder, must_exist=True)),
    Setting("EP_JIT_ALWAYS_COMPILE", "0 or 1", "0",
            "1 compiles every kernel once per process and neither reads nor writes the disk cache", _flag),
    Setting("EP_JIT_SHARED_CACHE_DIR", "':'-separated folder paths", "none",
            "read-only caches searched after the local one, never written", _folders),
    Setting("EP_JIT_REQUIRE_WARM", "0 or 1", "0",
            "1: a kernel in no cache tier raises NotWarmError instead of compiling", _flag),
    Setting("EP_JIT_FUSED_DISPATCH_TOKENS", "a non-negative integer", str(DEFAULT_FUSED_DISPATCH_TOKENS),
            "non-blocking NVLink dispatches of at most this many tokens run as one kernel (0: never)", _count),
)}


def raw(name: str) -> str | None:
    """The variable's text; unset and empty are the same."""
    value = os.environ.get(name)
    return value if value else None


def get(name: str) -> Any:
    """The parsed value of a set variable, or None when it is unset."""
    text = raw(name)
    if text is None:
        return None
    setting = SETTINGS[name]
    try:
        return setting.parse(text)
    except ValueError as exc:
        detail = f"; {exc}" if str(exc) else ""
        raise ConfigError(f"{name}: expected {setting.form}, got {_shown(text)}{detail}") from None


def check_environment() -> dict[str, Any]:
    """Parse every EP_JIT_* variable that is set; the values in force, by name."""
    return {name: get(name) for name in SETTINGS if raw(name) is not None}


def cache_root() -> Path:
    """$EP_JIT_CACHE_DIR, else $XDG_CACHE_HOME/ep_jit, else ~/.cache/ep_jit."""
    explicit = get("EP_JIT_CACHE_DIR")
    if explicit is not None:
        return explicit
    xdg = raw("XDG_CACHE_HOME")
    if xdg:
        return check_folder(_path(xdg) / "ep_jit", "XDG_CACHE_HOME")
    return check_folder(Path.home() / ".cache" / "ep_jit", "HOME")


def lock_root() -> Path:
    """Node-local folder for per-key locks: never on the (possibly shared) cache root."""
    explicit = get("EP_JIT_LOCK_DIR")
    return explicit if explicit is not None else Path(tempfile.gettempdir()) / f"ep_jit-{os.getuid()}" / "locks"


def shared_cache_roots() -> tuple[Path, ...]:
    """$EP_JIT_SHARED_CACHE_DIR: read-only cache roots, searched in order."""
    return get("EP_JIT_SHARED_CACHE_DIR") or ()


def require_warm() -> bool:
    """EP_JIT_REQUIRE_WARM=1: a kernel missing from every tier is an error, never a compile."""
    return bool(get("EP_JIT_REQUIRE_WARM"))


def template_dir_override() -> Path | None:
    return get("EP_JIT_TEMPLATE_DIR")


def default_arch() -> str:
    return get("EP_JIT_ARCH") or DEFAULT_ARCH


def lock_timeout() -> float:
    value = get("EP_JIT_LOCK_TIMEOUT")
    return DEFAULT_LOCK_TIMEOUT if value is None else value


def allow_shared_cache() -> bool:
    return bool(get("EP_JIT_ALLOW_SHARED_CACHE"))


def always_compile() -> bool:
    return bool(get("EP_JIT_ALWAYS_COMPILE"))


def fused_dispatch_tokens() -> int:
    value = get("EP_JIT_FUSED_DISPATCH_TOKENS")
    return DEFAULT_FUSED_DISPATCH_TOKENS if value is None else value


def extra_nvrtc_options() -> tuple[str, ...]:
    return get("EP_JIT_NVRTC_OPTIONS") or ()


def configure_logging() -> None:
    """Apply EP_JIT_LOG to the 'ep_jit' logger."""
    log.setLevel((get("EP_JIT_LOG") or "warning").upper())
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("ep_jit[%(process)d] %(levelname)s: %(message)s"))
        log.addHandler(handler)
