"""The expert layout, autograd and lazy compilation on real GPUs (tests/gpu/ep_worker_layout.py),
checked against CPU references; ranks share GPUs where there are fewer GPUs than ranks."""

import pytest

from helpers import REPO
from test_ep_gpu import run_ranks

WORKER = REPO / "tests" / "gpu" / "ep_worker_layout.py"


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
def test_expert_layout_matches_reference(world):
    run_ranks("expert", world, worker=WORKER)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 3])
def test_expert_capacity_drop_is_reported_at_both_ends(world):
    run_ranks("expert_drop", world, worker=WORKER)


@pytest.mark.gpu
def test_both_dispatch_paths_match_reference():
    """Non-blocking dispatch in one launch (few tokens) and in two, each forced."""
    run_ranks("paths", 2, worker=WORKER)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
def test_moe_layer_trains_like_the_dense_reference(world):
    run_ranks("train", world, worker=WORKER)


@pytest.mark.gpu
def test_gradients_match_finite_differences():
    run_ranks("gradcheck", 2, worker=WORKER)


@pytest.mark.gpu
def test_kernels_are_fetched_at_first_use():
    outs = run_ranks("lazy", 2, worker=WORKER)
    print("".join(line + "\n" for out in outs for line in out.splitlines() if line.startswith("LAZY ")))
