"""Command-line tools: what ep-jit-warm and cache-inspect share."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, NoReturn, Sequence

from ..errors import ConfigError, EPJitError
from ..version import __version__


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr and exit status 2; flags are taken
    only as written in full, so an error can name the flag as the user typed it."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)

    def add_version(self) -> None:
        self.add_argument("--version", action="version", version=f"%(prog)s (ep_jit) {__version__}")


def run(main: Callable[[], int]) -> int:
    """Run a tool's main; a reader that closes the pipe early (| head) ends it quietly."""
    try:
        status = main()
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that stays quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a shell reports for a tool ended by SIGPIPE
    except (EPJitError, OSError) as exc:  # one line, never a traceback: 2 for a bad setting, else 1
        print(f"{os.path.basename(sys.argv[0])}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1


Column = tuple[str, int]  # header (also the row key), width: negative aligns right, 0 never cuts


def table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """Rows as aligned text; a value wider than its column is cut (keys and hashes become
    prefixes), so lines keep their width."""
    def cell(value: object, width: int) -> str:
        text = str(value)
        if width == 0:
            return text
        text = text[:abs(width)]
        return text.rjust(-width) if width < 0 else text.ljust(width)
    lines = ["  ".join(cell(h, w) for h, w in columns).rstrip()]
    lines += ["  ".join(cell(r.get(h, ""), w) for h, w in columns).rstrip() for r in rows]
    return "\n".join(lines)
