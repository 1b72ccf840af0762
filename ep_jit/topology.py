"""Which members share an NVLink domain: verified from what every member publishes,
never assumed."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Callable

from cuda.bindings import driver

from .errors import EPJitError
from .runtime import check


class TopologyError(EPJitError):
    """Members of the group cannot reach each other's GPU memory directly."""


@dataclass(frozen=True)
class Endpoint:
    """What a member publishes about itself."""

    rank: int          # group rank
    global_rank: int
    hostname: str
    gpu_uuid: str
    pci_bus_id: str


def gpu_uuid(device: int) -> str:
    uuid = check(driver.cuDeviceGetUuid(check(driver.cuDeviceGet(device), "cuDeviceGet")), "cuDeviceGetUuid")
    return bytes(uuid.bytes).hex()


def local_endpoint(rank: int, global_rank: int, device: int) -> Endpoint:
    dev = check(driver.cuDeviceGet(device), "cuDeviceGet")
    bus = check(driver.cuDeviceGetPCIBusId(32, dev), "cuDeviceGetPCIBusId")
    bus = bus.split(b"\0")[0].decode() if isinstance(bus, bytes) else str(bus)
    return Endpoint(rank, global_rank, socket.gethostname(), gpu_uuid(device), bus)


def visible_devices() -> dict[str, int]:
    """GPU UUID -> device ordinal, for the GPUs this process can see."""
    count = check(driver.cuDeviceGetCount(), "cuDeviceGetCount")
    return {gpu_uuid(i): i for i in range(count)}


def verify_nvlink_domain(endpoints: list[Endpoint], me: int, device: int) -> None:
    """Raise TopologyError unless every member is on this host and this GPU reaches each
    member's GPU memory directly. The message names the members that cannot."""
    dev = check(driver.cuDeviceGet(device), "cuDeviceGet")

    def can_access_peer(ordinal: int) -> bool:
        peer = check(driver.cuDeviceGet(ordinal), "cuDeviceGet")
        return bool(check(driver.cuDeviceCanAccessPeer(dev, peer), "cuDeviceCanAccessPeer"))

    check_reachable(endpoints, me, visible_devices(), can_access_peer)


def check_reachable(endpoints: list[Endpoint], me: int, visible: dict[str, int],
                    can_access_peer: Callable[[int], bool]) -> None:
    """The rule itself: every member on this host, and each member's GPU either this GPU
    (members may share one, e.g. under MPS; IPC needs no peer access then) or a visible
    GPU that this one can access as a peer."""
    mine = endpoints[me]
    elsewhere = [e for e in endpoints if e.hostname != mine.hostname]
    if elsewhere:
        raise TopologyError(
            f"group: expected every member on host {mine.hostname!r} (one NVLink domain), but ranks "
            f"{[e.rank for e in elsewhere]} are on {sorted({e.hostname for e in elsewhere})}; for a group that "
            "spans NVLink domains, pass transport='collective'")
    unreachable = []
    for e in endpoints:
        if e.gpu_uuid == mine.gpu_uuid:
            continue
        ordinal = visible.get(e.gpu_uuid)
        if ordinal is None:
            unreachable.append((e.rank, "its GPU is not visible in this process (CUDA_VISIBLE_DEVICES)"))
        elif not can_access_peer(ordinal):
            unreachable.append((e.rank, f"no peer access from GPU {mine.pci_bus_id} to {e.pci_bus_id}"))
    if unreachable:
        detail = "; ".join(f"rank {r}: {why}" for r, why in unreachable)
        raise TopologyError(f"group: rank {me} cannot reach the GPU memory of ranks "
                            f"{[r for r, _ in unreachable]} directly ({detail}); "
                            "transport='collective' moves tokens without peer access")
