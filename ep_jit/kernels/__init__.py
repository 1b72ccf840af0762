"""The kernel catalogue (catalogue.py), the argument structs the kernels take
(args.py, mirrors of templates/ep_args.cuh) and the constants shared with them
(constants.py, read from templates/ep_constants.cuh)."""

from .catalogue import CATALOGUE, KERNELS, TEMPLATE_PARAMS, TEMPLATES, Kernel

__all__ = ["CATALOGUE", "KERNELS", "TEMPLATES", "TEMPLATE_PARAMS", "Kernel"]
