"""cache-inspect coverage (PLAN.toml | --preset NAME): exit 0 if every kernel of the plan is
in the local cache or a shared tier (and this machine's driver can load it), else 1,
listing what is missing and why."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ep_jit.cache import DiskCache
from ep_jit.coverage import check_warm, plan_specs
from ep_jit.errors import ConfigError
from ep_jit.plan import PRESETS, PlanError
from ep_jit.spec import KernelSpec


def plan_file(text: str) -> list[KernelSpec]:
    """argparse type: the specs of a plan file, so that a bad plan is a usage error (exit 2)."""
    try:
        return plan_specs(Path(text))
    except (PlanError, ConfigError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_plan_arguments(parser: argparse.ArgumentParser, *, positional: bool, required: bool) -> None:
    """A plan file (PLAN.toml, or --plan) or --preset, the kernels a command is about."""
    which = parser.add_mutually_exclusive_group(required=required)
    if positional:
        which.add_argument("plan", nargs="?", type=plan_file, metavar="PLAN.toml", help="a plan, as for ep-jit-warm")
    else:
        which.add_argument("--plan", type=plan_file, metavar="PLAN.toml", help="a plan, as for ep-jit-warm")
    which.add_argument("--preset", choices=sorted(PRESETS), help="a preset, as for ep-jit-warm")


def selected_specs(args) -> list[KernelSpec] | None:
    if args.plan is not None:
        return args.plan
    return plan_specs(preset=args.preset) if args.preset is not None else None


def add_parser(sub, common) -> None:
    p = sub.add_parser("coverage", parents=[common], help="exit 1 unless every kernel of a plan is in a tier")
    add_plan_arguments(p, positional=True, required=True)


def cmd_coverage(cache: DiskCache, args) -> int:
    result = check_warm(selected_specs(args), cache_dir=cache.root)
    print(json.dumps(result.as_dict(), indent=2) if args.json else "\n".join(result.lines()))
    return 0 if result.ok else 1
