"""Human sizes and ages, in and out, with one rule.

Sizes: a number and an optional unit. k, M, G, T (optionally followed by B) are decimal
(powers of 1000, as disks are sold); KiB, MiB, GiB, TiB are binary (powers of 1024); no
unit or B is bytes. Sizes are written decimal: "2.1 GB".
Ages: a number and a unit, one of s, m (minutes), h, d, w; a bare number is refused.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?)b?|b)?\s*$", re.IGNORECASE)
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4}
AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
SIZE_FORM = "a size like 500M, 2G (decimal) or 2GiB (binary)"
AGE_FORM = "an age with a unit, like 30d, 12h or 90m"


def parse_size(text: str) -> int:
    """Bytes in `text` (see the module's rule); ValueError if it is not a size."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"expected {SIZE_FORM}, got {text!r}")
    unit, binary = (m[2] or "").lower(), bool(m[3])
    base = 1024 if binary else 1000
    return int(float(m[1]) * base ** _POWERS.get(unit, 0))


def parse_age(text: str) -> float:
    """Seconds in `text`; ValueError if it is not a number with a unit."""
    m = _AGE.match(text)
    if not m:
        raise ValueError(f"expected {AGE_FORM}, got {text!r}")
    return float(m[1]) * AGE_UNITS[m[2]]


def format_size(n: int) -> str:
    """Decimal units, three significant digits: 950 B, 1.2 kB, 34.5 MB, 2.1 GB."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000
        if value < 999.5:
            break
    return f"{value:.3g} {unit}"


def format_age(seconds: float) -> str:
    """The largest whole unit: 45s, 12m, 5h, 3d, 8w."""
    for unit in ("w", "d", "h", "m"):
        if seconds >= AGE_UNITS[unit]:
            return f"{int(seconds // AGE_UNITS[unit])}{unit}"
    return f"{max(0, int(seconds))}s"
