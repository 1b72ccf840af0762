import hashlib
import textwrap

import pytest

from helpers import free_ports, run_py, spawn_ranks
from ep_jit import GroupInfo, member_hash
from ep_jit.frameworks import bind_group


def test_member_hash_is_sha256_of_canonical_text():
    expected = hashlib.sha256(b"v1|n=4|0,1,2,3").hexdigest()
    assert member_hash([0, 1, 2, 3]) == expected
    assert GroupInfo([0, 1, 2, 3], 2).member_hash == expected


def test_member_hash_depends_on_members_and_their_order():
    hashes = {member_hash(m) for m in ([0, 1, 2, 3], [0, 1, 2, 4], [1, 0, 2, 3], [0, 1, 2], [0, 12, 3])}
    assert len(hashes) == 5


def test_same_members_same_hash_in_another_process():
    out = run_py("from ep_jit import member_hash; print(member_hash([8, 9, 10, 11]))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == member_hash([8, 9, 10, 11])


def test_groupinfo_fields():
    g = GroupInfo([4, 5, 6, 7], rank=3)
    assert (g.members, g.rank, g.size) == ((4, 5, 6, 7), 3, 4)
    assert g.tag == int(g.member_hash[:16], 16)


@pytest.mark.parametrize("members, rank, needle", [
    ([], 0, "members"),
    ([0, 0, 1], 0, "unique"),
    ([0, -1], 0, "non-negative"),
    ([0, 1.5], 0, "non-negative ints"),
    ([0, True], 0, "non-negative ints"),
    ("01", 0, "members"),
    (None, 0, "members"),
    ([0, 1], 2, "rank: expected an int in [0, 2), got 2"),
    ([0, 1], -1, "rank"),
    ([0, 1], "0", "rank"),
])
def test_groupinfo_rejects_bad_input(members, rank, needle):
    with pytest.raises(ValueError, match=None) as err:
        GroupInfo(members, rank)
    assert needle in str(err.value)


def test_binding_rejects_unknown_group_objects():
    with pytest.raises(TypeError, match="group: expected a GroupInfo"):
        bind_group(object())


TORCH_WORKER = textwrap.dedent("""
    import sys, torch.distributed as dist
    from ep_jit import GroupInfo
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    sub = dist.new_group([1, 2])                  # every rank must create it
    g = GroupInfo.from_torch(sub) if rank in (1, 2) else None
    w = GroupInfo.from_torch()
    print("WORLD", w.member_hash, w.rank)
    if g: print("SUB", g.member_hash, g.rank)
    dist.destroy_process_group()
""")


def _lines(out: str, tag: str) -> list[tuple[str, int]]:
    return [(l.split()[1], int(l.split()[2])) for l in out.splitlines() if l.startswith(tag + " ")]


def test_torch_gloo_groups():
    pytest.importorskip("torch.distributed")
    outs = spawn_ranks(TORCH_WORKER, 3)
    for r, out in enumerate(outs):
        assert _lines(out, "WORLD") == [(member_hash([0, 1, 2]), r)]
    assert _lines(outs[1], "SUB") == [(member_hash([1, 2]), 0)]
    assert _lines(outs[2], "SUB") == [(member_hash([1, 2]), 1)]
    assert _lines(outs[0], "SUB") == []


PADDLE_WORKER = textwrap.dedent("""
    import sys
    from ep_jit import GroupInfo  # before paddle: Paddle 2.6's CPU wheel breaks Python's zlib on import
    import paddle, paddle.distributed as dist
    dist.init_parallel_env()
    rank = dist.get_rank()
    sub = dist.new_group([1, 2], backend="gloo")
    w = GroupInfo.from_paddle()
    print("WORLD", w.member_hash, w.rank)
    if rank in (1, 2):
        g = GroupInfo.from_paddle(sub)
        print("SUB", g.member_hash, g.rank)
    dist.barrier()  # rank 0 hosts the store: keep it up until everyone is done
""")


def _paddle_env(world: int):
    ports = free_ports(world)
    eps = ",".join(f"127.0.0.1:{p}" for p in ports)
    return lambda r: {"PADDLE_TRAINER_ID": str(r), "PADDLE_TRAINERS_NUM": str(world),
                      "PADDLE_TRAINER_ENDPOINTS": eps, "PADDLE_CURRENT_ENDPOINT": f"127.0.0.1:{ports[r]}",
                      "PADDLE_DISTRI_BACKEND": "gloo", "CUDA_VISIBLE_DEVICES": ""}


def test_paddle_gloo_groups_hash_like_torch():
    pytest.importorskip("paddle")
    outs = spawn_ranks(PADDLE_WORKER, 3, _paddle_env(3))
    for r, out in enumerate(outs):
        assert _lines(out, "WORLD") == [(member_hash([0, 1, 2]), r)]
    assert _lines(outs[1], "SUB") == [(member_hash([1, 2]), 0)]
    assert _lines(outs[2], "SUB") == [(member_hash([1, 2]), 1)]
