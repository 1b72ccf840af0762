"""KernelSpec: the frozen description of one compiled kernel binary.

Token counts are runtime arguments and never part of a spec, so a longer batch
never recompiles.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from .group import group_tag
from .kernels.catalogue import KERNELS, TEMPLATE_PARAMS, TEMPLATES
from .kernels.constants import SCALE_BLOCK, WARP_SIZE
from .toolchain import check_arch

# dtype name -> C++ element type
DTYPES: dict[str, str] = {"bf16": "__nv_bfloat16", "fp8_e4m3": "__nv_fp8_e4m3"}
DTYPE_ALIASES: dict[str, str] = {"bfloat16": "bf16", "fp8": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3"}


MAX_TOPK = WARP_SIZE  # the kernels give each top-k entry of a row one lane of a warp
# The names users see for a spec's fields: the same in ep-jit-warm's flags, plans and
# dry run and in cache-inspect's list and show.
FIELD_NAMES: dict[str, str] = {"template": "template", "hidden": "hidden", "num_experts": "experts",
                               "num_ranks": "ep_size", "topk": "topk", "dtype": "dtype", "member_hash": "group",
                               "arch": "arch"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def canonical_dtype(dtype: str) -> str:
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(DTYPES)}, got {dtype!r}")
    return name


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


@dataclass(frozen=True)
class KernelSpec:
    template: str
    hidden: int
    num_experts: int
    num_ranks: int
    topk: int
    dtype: str
    member_hash: str
    arch: str

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise ValueError(f"template: expected one of {sorted(TEMPLATES)}, got {self.template!r}")
        for name in ("hidden", "num_experts", "num_ranks", "topk"):
            _positive_int(name, getattr(self, name))
        if self.hidden % SCALE_BLOCK:
            raise ValueError(f"hidden: expected a multiple of {SCALE_BLOCK}, got {self.hidden}")
        if self.num_experts % self.num_ranks:
            raise ValueError(
                f"num_experts: expected a multiple of num_ranks={self.num_ranks}, got {self.num_experts}")
        if self.topk > min(self.num_experts, MAX_TOPK):
            raise ValueError(f"topk: expected at most num_experts={self.num_experts} and {MAX_TOPK}, got {self.topk}")
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if not isinstance(self.member_hash, str) or not _HEX64.match(self.member_hash):
            raise ValueError(f"member_hash: expected 64 lowercase hex digits, got {self.member_hash!r}")
        check_arch(self.arch)

    def params(self) -> dict[str, object]:
        """The template parameters, as they enter the cache key."""
        d = asdict(self)
        for k in ("template", "member_hash", "arch"):
            d.pop(k)
        return d

    def name_expression(self, kernel: str) -> str:
        """The C++ name of the instance of catalogue kernel `kernel` that this spec compiles."""
        rendered = {"dtype": DTYPES[self.dtype], "member_hash": f"0x{group_tag(self.member_hash):016x}ull"}
        args = ", ".join(rendered.get(p, str(getattr(self, p))) for p in TEMPLATE_PARAMS)
        return f"ep_jit::{KERNELS[kernel].symbol}<{args}>"

    def name_expressions(self) -> tuple[str, ...]:
        """Every kernel's instance, in catalogue order."""
        return tuple(self.name_expression(k.name) for k in TEMPLATES[self.template])

    def fields(self) -> dict[str, object]:
        """Every field under the name users see (FIELD_NAMES)."""
        return shown_fields(asdict(self))

    def describe(self) -> str:
        fields = {**self.fields(), "group": self.member_hash[:12]}
        template = fields.pop("template")
        return f"{template}({', '.join(f'{k}={v}' for k, v in fields.items())})"


def shown_fields(spec_fields: dict) -> dict:
    """A spec's fields (KernelSpec names, as entry headers record them) under the names users
    see, in KernelSpec's order."""
    return {FIELD_NAMES[k]: spec_fields[k] for k in FIELD_NAMES if k in spec_fields}
