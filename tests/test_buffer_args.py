"""Buffer checks that come before any CUDA call, so they run without a GPU."""

import pytest

from ep_jit import GroupInfo
from ep_jit.buffer import Buffer


def test_members_must_agree_on_the_arguments():
    mine = None

    def gather(obj):
        nonlocal mine
        mine = obj
        return [obj, {**obj, "hidden": 4096}]  # rank 1 asked for another hidden size

    with pytest.raises(ValueError, match=r"group: expected every member to pass the same hidden; ranks \[1\]"):
        Buffer(GroupInfo([0, 1], 0), 2048, 64, 2, 128, device=0, all_gather=gather)
    assert mine["hidden"] == 2048 and mine["members"] == [0, 1]


def test_groupinfo_needs_a_device_and_a_gather():
    with pytest.raises(ValueError, match="device: expected the CUDA device ordinal"):
        Buffer(GroupInfo([0, 1], 0), 2048, 64, 2, 128)
    with pytest.raises(ValueError, match="all_gather: expected a callable"):
        Buffer(GroupInfo([0, 1], 0), 2048, 64, 2, 128, device=0)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(max_tokens_per_rank=0), "max_tokens_per_rank: expected a positive int, got 0"),
    (dict(dtype="fp16"), "dtype: expected one of"),
    (dict(num_sms=0), "num_sms: expected a positive int, got 0"),
    (dict(group=GroupInfo([0, 1, 2], 0), num_sms=3, all_gather=lambda obj: [obj] * 3),
     "num_sms: expected at least 4 for the NVLink transport over 3 ranks, got 3"),
])
def test_bad_arguments(kwargs, needle):
    args = dict(group=GroupInfo([0], 0), hidden=2048, num_experts=64, topk=2, max_tokens_per_rank=128, device=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        Buffer(**args)


def test_transport_is_checked_before_any_cuda_call():
    args = dict(group=GroupInfo([0], 0), hidden=2048, num_experts=64, topk=2, max_tokens_per_rank=128, device=0)
    with pytest.raises(ValueError, match=r"transport: expected one of \['nvlink', 'collective'\], got 'nccl'"):
        Buffer(**args, transport="nccl")
    with pytest.raises(TypeError, match="group: expected a torch or paddle process group for transport='collective'"):
        Buffer(**args, transport="collective")
