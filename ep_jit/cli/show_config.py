"""The configuration in force: versions, paths and every EP_JIT_* setting.

    python -m ep_jit [--json]        (also: cache-inspect config)
"""

from __future__ import annotations

import json
import os

from .. import config, toolchain
from ..errors import ConfigError
from ..version import __version__
from . import OneLineParser, run


def report() -> dict:
    """Everything the view shows; ConfigError if a setting is bad."""
    config.check_environment()
    settings = {name: {"value": config.raw(name), "default": s.default, "form": s.form}
                for name, s in config.SETTINGS.items()}
    return {
        "ep_jit": __version__,
        "nvrtc": {"version": toolchain.nvrtc_version(), "library": toolchain.nvrtc_library()},
        "cuda_headers": toolchain.cuda_header_versions(),
        "nvrtc_archs": [f"sm_{a}" for a in toolchain.supported_archs()],
        "cache_dir": str(config.cache_root()),
        "lock_dir": str(config.lock_root()),
        "default_arch": config.default_arch(),
        "settings": settings,
        "unknown_settings": sorted(n for n in os.environ if n.startswith("EP_JIT_") and n not in config.SETTINGS),
    }


def render(r: dict) -> str:
    headers = ", ".join(f"{k} {v}" for k, v in r["cuda_headers"].items())
    lines = [f"ep_jit          {r['ep_jit']}",
             f"NVRTC           {r['nvrtc']['version']} ({r['nvrtc']['library']})",
             f"CUDA headers    {headers}",
             f"NVRTC targets   {', '.join(r['nvrtc_archs'])}",
             f"cache root      {r['cache_dir']}",
             f"lock folder     {r['lock_dir']}",
             f"default arch    {r['default_arch']}",
             "settings (unset ones show their default):"]
    width = max(len(n) for n in r["settings"])
    for name, s in r["settings"].items():
        shown = repr(s["value"]) if s["value"] is not None else f"(unset: {s['default']})"
        lines.append(f"  {name:{width}}  {shown}")
    lines += [f"  {name:{width}}  unknown: not an ep_jit setting, ignored" for name in r["unknown_settings"]]
    return "\n".join(lines)


def show(as_json: bool) -> int:
    r = report()
    print(json.dumps(r, indent=2) if as_json else render(r))
    return 0


def _main(argv: list[str] | None) -> int:
    parser = OneLineParser(prog="python -m ep_jit", description=__doc__.split("\n\n")[0],
                           epilog="exit status: 0, or 2 when an EP_JIT_* setting is bad (one line on stderr)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_version()
    args = parser.parse_args(argv)
    try:
        return show(args.json)
    except ConfigError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    return run(lambda: _main(argv))
