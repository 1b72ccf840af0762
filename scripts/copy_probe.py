#!/usr/bin/env python3
"""Probe: how fast do copy loops of a given shape move bytes on this GPU (local and to a peer)?

    python scripts/copy_probe.py

Compiles a few copy kernels with NVRTC (templates/ep_common.cuh included) and times
them with CUDA events (median of 20 after 3 warm-ups) on 58 MB rows of 14336 bytes.
"""

import statistics
from ctypes import c_int, c_longlong, c_void_p

import torch
from cuda.bindings import driver, nvrtc

from ep_jit.compiler import cuda_include_dirs, template_dir
from ep_jit.runtime import ArgPack, check, device_arch, use_device

SRC = r'''
#include "ep_common.cuh"
using namespace ep_jit;
template <int UNROLL>
__global__ void row_copy(int4* dst, const int4* src, int rows, int vecs) {
    const int lane = threadIdx.x % 32, warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int nw = gridDim.x * blockDim.x / 32;
    for (int r = warp; r < rows; r += nw) warp_copy<UNROLL>(dst + (long long)r * vecs, src + (long long)r * vecs, vecs, lane);
}
template <int UNROLL>
__global__ void flat_copy(int4* dst, const int4* src, long long n) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (; i + (UNROLL - 1) * stride < n; i += UNROLL * stride) {
        int4 v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) v[u] = ld_stream(src + i + u * stride);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) st_stream(dst + i + u * stride, v[u]);
    }
    for (; i < n; i += stride) st_stream(dst + i, ld_stream(src + i));
}
'''
NAMES = ["row_copy<4>", "row_copy<8>", "row_copy<16>", "flat_copy<4>", "flat_copy<8>"]


def build(arch):
    err, prog = nvrtc.nvrtcCreateProgram(SRC.encode(), b"probe.cu", 0, [], [])
    for n in NAMES:
        nvrtc.nvrtcAddNameExpression(prog, n.encode())
    opts = [b"-std=c++17", f"-arch={arch}".encode(), f"-I{template_dir()}".encode(),
            *[f"-I{d}".encode() for d in cuda_include_dirs()]]
    err, = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise SystemExit(log.decode())
    _, size = nvrtc.nvrtcGetCUBINSize(prog)
    cubin = b" " * size
    nvrtc.nvrtcGetCUBIN(prog, cubin)
    lib = check(driver.cuLibraryLoadData(cubin, None, None, 0, None, None, 0), "load")
    out = {}
    for n in NAMES:
        _, low = nvrtc.nvrtcGetLoweredName(prog, n.encode())
        k = check(driver.cuLibraryGetKernel(lib, low), "kernel")
        out[n] = check(driver.cuKernelGetFunction(k), "function")
    return out


def median_ms(fn):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main():
    torch.cuda.set_device(0)
    torch.zeros(1, device="cuda:0")
    use_device(0)
    fns = build(device_arch(0))
    rows, row_bytes = 4096, 14336
    vecs = row_bytes // 16
    src = torch.randint(0, 255, (rows * row_bytes,), dtype=torch.uint8, device="cuda:0")
    targets = {"local": torch.empty_like(src)}
    if torch.cuda.device_count() > 1:
        ctx1 = check(driver.cuDevicePrimaryCtxRetain(check(driver.cuDeviceGet(1), "dev")), "ctx")
        err, = driver.cuCtxEnablePeerAccess(ctx1, 0)
        targets["peer(write)"] = torch.empty(rows * row_bytes, dtype=torch.uint8, device="cuda:1")
    stream = torch.cuda.current_stream().cuda_stream
    row_args, flat_args = ArgPack((c_void_p, c_void_p, c_int, c_int)), ArgPack((c_void_p, c_void_p, c_longlong))

    def run(name, dst, src_buf, blocks, threads, label):
        address = (row_args.set((dst.data_ptr(), src_buf.data_ptr(), rows, vecs)) if name.startswith("row")
                   else flat_args.set((dst.data_ptr(), src_buf.data_ptr(), rows * vecs)))
        ms = median_ms(lambda: driver.cuLaunchKernel(fns[name], blocks, 1, 1, threads, 1, 1, 0, stream, address, 0))
        print(f"{name:14} {label:12} {blocks:6} {threads:7} {rows * row_bytes / ms / 1e6:8.0f}")

    print(f"{'kernel':14} {'target':12} {'blocks':>6} {'threads':>7} {'GB/s':>8}")
    for label, dst in targets.items():
        for name in fns:
            for blocks, threads in ((24, 512), (24, 1024), (132, 512)):
                run(name, dst, src, blocks, threads, label)
    if "peer(write)" in targets:  # pull: read the peer, write locally
        peer_src = targets["peer(write)"]
        peer_src.copy_(src)
        for name in ("row_copy<8>", "row_copy<16>", "flat_copy<8>"):
            for blocks, threads in ((24, 512), (24, 1024)):
                run(name, targets["local"], peer_src, blocks, threads, "peer(read)")


if __name__ == "__main__":
    main()
