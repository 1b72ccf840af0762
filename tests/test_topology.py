"""The NVLink-domain rule, on endpoints as members publish them (no GPU needed)."""

import pytest

from ep_jit.topology import Endpoint, TopologyError, check_reachable

VISIBLE = {"uuid-a": 0, "uuid-b": 1, "uuid-c": 2}


def members(*placements: tuple[str, str]) -> list[Endpoint]:
    return [Endpoint(r, 10 + r, host, uuid, f"0000:{r:02x}:00.0") for r, (host, uuid) in enumerate(placements)]


def test_one_host_with_peer_access_passes():
    check_reachable(members(("h", "uuid-a"), ("h", "uuid-b"), ("h", "uuid-c")), 0, VISIBLE, lambda ordinal: True)


def test_members_sharing_this_gpu_need_no_peer_access():
    asked = []
    check_reachable(members(("h", "uuid-a"), ("h", "uuid-a"), ("h", "uuid-b")), 1, VISIBLE,
                    lambda ordinal: asked.append(ordinal) or True)
    assert asked == [1]


def test_other_hosts_are_named():
    eps = members(("h", "uuid-a"), ("g", "uuid-a"), ("h", "uuid-b"), ("f", "uuid-c"))
    with pytest.raises(TopologyError, match=r"ranks \[1, 3\] are on \['f', 'g'\].*transport='collective'"):
        check_reachable(eps, 0, VISIBLE, lambda ordinal: True)


def test_invisible_gpu_is_named():
    eps = members(("h", "uuid-a"), ("h", "uuid-z"))
    with pytest.raises(TopologyError, match=r"rank 0 cannot reach .* ranks \[1\].*not visible"):
        check_reachable(eps, 0, VISIBLE, lambda ordinal: True)


def test_missing_peer_access_is_named():
    eps = members(("h", "uuid-a"), ("h", "uuid-b"), ("h", "uuid-c"))
    with pytest.raises(TopologyError, match=r"ranks \[2\] directly \(rank 2: no peer access from GPU "
                                            r"0000:00:00.0 to 0000:02:00.0\)"):
        check_reachable(eps, 0, VISIBLE, lambda ordinal: ordinal != 2)
