"""The constants the host shares with the kernels, read from templates/ep_constants.cuh,
the one place they are written (`constexpr int kName = <int>;` and enum members)."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError

HEADER = "ep_constants.cuh"
HOST_SHARED_HEADERS = (HEADER, "ep_args.cuh")  # what the host reads or mirrors, so no template override may change
_DEFINITION = re.compile(r"^\s*(?:constexpr int\s+)?(k[A-Za-z0-9]+)\s*=\s*(-?\d+)\s*[;,]", re.M)


def shipped_template_dir() -> Path:
    """templates/ inside an installed wheel, else beside the package in a source tree."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "templates", here.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"templates: expected a templates/ folder in {here} or {here.parent}, found none")


def read_constants(path: Path) -> dict[str, int]:
    return {name: int(value) for name, value in _DEFINITION.findall(path.read_text())}


VALUES = read_constants(shipped_template_dir() / HEADER)

WARP_SIZE = VALUES["kWarpSize"]
SCALE_BLOCK = VALUES["kScaleBlock"]
COPY_THREADS = VALUES["kCopyThreads"]
LAYOUT_THREADS = VALUES["kLayoutThreads"]
MAX_RANKS = VALUES["kMaxRanks"]
MAX_LOCAL_EXPERTS = VALUES["kMaxLocalExperts"]
STATUS_WORDS = VALUES["kStatusWords"]
NUM_FLAG_KINDS = VALUES["kNumFlagKinds"]
STAGE_CONSUMED, COMBINE_CONSUMED = VALUES["kStageConsumed"], VALUES["kCombineConsumed"]
SEND_PHASE, PULL_PHASE = VALUES["kSendPhase"], VALUES["kPullPhase"]
PHASES = {VALUES["kPhaseStage"]: "dispatch staging (waiting for peers to finish reading the previous stage)",
          VALUES["kPhaseNotify"]: "count exchange",
          VALUES["kPhaseCombinePush"]: "combine push (waiting for peers to finish the previous combine)",
          VALUES["kPhaseCombineReduce"]: "combine reduce (waiting for peers' expert outputs)",
          VALUES["kPhasePull"]: "dispatch pull (waiting for peers' tokens)"}
