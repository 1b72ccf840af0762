#!/usr/bin/env python3
"""Host cost of one kernel launch through ep_jit.runtime vs a raw cuLaunchKernel.

    python scripts/launch_overhead.py

Both launch the same loaded kernel (the routing layout kernel with 0 tokens). The raw
call gets its argument struct packed once beforehand; through ep_jit each launch builds
the struct from named fields, as the transports do. The median over batches of 2000
launches is reported.
"""

import ctypes
import statistics
import time

import torch
from cuda.bindings import driver

from ep_jit import get_kernel
from ep_jit.group import member_hash
from ep_jit.kernels import KERNELS
from ep_jit.kernels.args import LayoutArgs, Status
from ep_jit.runtime import Library, device_arch
from ep_jit.spec import KernelSpec


def per_launch_us(launch, batches=15, n=2000):
    out = []
    for _ in range(batches):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            launch()
        out.append((time.perf_counter() - t) / n * 1e6)
    torch.cuda.synchronize()
    return statistics.median(out)


def main():
    torch.cuda.set_device(0)
    spec = KernelSpec("layout", 2048, 8, 2, 2, "bf16", member_hash([0, 1]), device_arch(0))
    binary = get_kernel(spec)
    kernel = Library(binary.cubin, 0, "layout").kernel(binary.symbol("layout"), KERNELS["layout"])
    ws = torch.zeros(64, dtype=torch.int32, device="cuda")
    p = ws.data_ptr()

    def args() -> LayoutArgs:
        return LayoutArgs(topk_idx=p, is_token_in_rank=p, token_slot=p, tokens_per_rank=p, tokens_per_expert=p,
                          status=Status(p + 128, p + 128), num_tokens=0)
    packed = args()
    address = (ctypes.c_void_p * 1)(ctypes.addressof(packed))
    stream = torch.cuda.current_stream().cuda_stream
    fn = kernel.function
    raw = per_launch_us(lambda: driver.cuLaunchKernel(fn, 2, 1, 1, 256, 1, 1, 0, stream, ctypes.addressof(address), 0))
    ours = per_launch_us(lambda: kernel.launch(stream, 2, args()))
    print(f"raw cuLaunchKernel (arguments packed beforehand): {raw:.2f} us/launch; "
          f"LoadedKernel.launch (packing included): {ours:.2f} us ({ours / raw:.2f}x)")


if __name__ == "__main__":
    main()
