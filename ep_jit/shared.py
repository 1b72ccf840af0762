"""Shared read-only cache tiers ($EP_JIT_SHARED_CACHE_DIR): caches filled by ep-jit-warm,
for example on a cluster filesystem that many nodes mount.

They are only ever read: no lock, no rename, no quarantine, no last-use time. That keeps
them safe on NFS (no cross-node flock, no rename races) and unchanged by the jobs that use
them. A hit is verified here and copied into the local cache by the caller; an entry that
does not verify is skipped, left in place for whoever owns the tier, and rebuilt locally.
"""

from __future__ import annotations

import stat

from . import config
from .cache import CorruptEntry, DiskCache, Entry
from .errors import ConfigError

log = config.log


def shared_caches() -> list[DiskCache]:
    """The shared tiers, in search order."""
    return [DiskCache(root) for root in config.shared_cache_roots()]


def _check_tier(cache: DiskCache) -> None:
    """A tier anyone can write to could hand out any code: refuse it unless told otherwise."""
    try:
        mode = cache.root.stat().st_mode
    except OSError:
        return
    if mode & stat.S_IWOTH and not config.allow_shared_cache():
        raise ConfigError(f"EP_JIT_SHARED_CACHE_DIR: expected folders that others cannot write, got {cache.root} "
                          f"(mode {stat.S_IMODE(mode):o}); set EP_JIT_ALLOW_SHARED_CACHE=1 to accept it")


def read_shared(key: str) -> Entry | None:
    """The first verified entry for `key` in the shared tiers, or None."""
    for cache in shared_caches():
        _check_tier(cache)
        path = cache.entry_path(key)
        try:
            return cache.load(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except CorruptEntry as exc:
            log.warning("shared cache entry %s does not verify (%s); ignored, building it locally", path, exc)
        except OSError as exc:
            log.warning("shared cache entry %s cannot be read (%s); ignored, building it locally", path, exc)
    return None
