"""Small shared values for the CPU tests."""

from ep_jit import KernelSpec, member_hash


def layout_spec(**overrides) -> KernelSpec:
    fields = dict(template="layout", hidden=2048, num_experts=64, num_ranks=4, topk=4, dtype="bf16",
                  member_hash=member_hash([0, 1, 2, 3]), arch="sm_90a")
    fields.update(overrides)
    return KernelSpec(**fields)
