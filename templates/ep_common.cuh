// Shared device helpers for ep_jit's EP kernels: element types, 16-byte vector
// copies, and system-scope flags that order the phases between GPUs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda/std/cstdint>

namespace ep_jit {

using cuda::std::int32_t;
using cuda::std::int64_t;
using cuda::std::uint32_t;
using cuda::std::uint64_t;

constexpr int kWarpSize = 32;
constexpr int kScaleBlock = 128;  // fp8 rows carry one fp32 scale per 128 elements

// ---- 16-byte vectors -------------------------------------------------------

template <typename T>
struct VecTraits {
    static constexpr int kPerVec = 16 / sizeof(T);  // elements per int4
};

// Streaming load of read-once data: skip L1 so it does not evict what is reused.
__device__ __forceinline__ int4 ld_stream(const int4* p) {
    int4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Store that bypasses L1 and is not kept in L2 on the way to a peer.
__device__ __forceinline__ void st_stream(int4* p, const int4& v) {
    asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1,%2,%3,%4};"
                 :: "l"(p), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w) : "memory");
}

// Lanes of a warp copy `n_vec` int4s together, unrolled so several loads are in flight.
template <int kUnroll = 4>
__device__ __forceinline__ void warp_copy(int4* dst, const int4* src, int n_vec, int lane) {
    int i = lane;
    for (; i + (kUnroll - 1) * kWarpSize < n_vec; i += kUnroll * kWarpSize) {
        int4 v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = ld_stream(src + i + u * kWarpSize);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) st_stream(dst + i + u * kWarpSize, v[u]);
    }
    for (; i < n_vec; i += kWarpSize) st_stream(dst + i, ld_stream(src + i));
}

// ---- system-scope flags ----------------------------------------------------
// A flag word holds (group tag << 32 | sequence) folded to 64 bits, so a kernel
// of another group or an older round never mistakes a stale word for its own.

__device__ __forceinline__ uint64_t make_flag(uint64_t tag, uint32_t seq) {
    return (tag & 0xffffffff00000000ull) | seq;
}

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
    uint64_t v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_relaxed_sys(int* p, int v) {
    asm volatile("st.relaxed.sys.global.s32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ int ld_relaxed_sys(const int* p) {
    int v;
    asm volatile("ld.relaxed.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Spin until *p == want; returns false after `max_spins` polls so a dead peer
// turns into an error on the host instead of a hang.
__device__ __forceinline__ bool wait_flag(const uint64_t* p, uint64_t want, long long max_spins) {
    for (long long i = 0; i < max_spins; ++i) {
        if (ld_acquire_sys(p) == want) return true;
        __nanosleep(64);
    }
    return false;
}

// ---- block-wide exclusive scan of one int per thread ------------------------

template <int kThreads>
__device__ __forceinline__ int block_exclusive_scan(int value, int* total, int* smem /* kThreads/32 + 1 */) {
    static_assert(kThreads % kWarpSize == 0, "block size must be a multiple of 32");
    constexpr int kWarps = kThreads / kWarpSize;
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    int inclusive = value;
#pragma unroll
    for (int d = 1; d < kWarpSize; d <<= 1) {
        int other = __shfl_up_sync(0xffffffffu, inclusive, d);
        if (lane >= d) inclusive += other;
    }
    if (lane == kWarpSize - 1) smem[warp] = inclusive;
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = 0;
        for (int w = 0; w < kWarps; ++w) { int c = smem[w]; smem[w] = run; run += c; }
        smem[kWarps] = run;
    }
    __syncthreads();
    const int result = smem[warp] + inclusive - value;
    *total = smem[kWarps];
    __syncthreads();  // smem may be reused by the caller's next round
    return result;
}

}  // namespace ep_jit
