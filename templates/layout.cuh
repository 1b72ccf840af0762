// Routing layout: what one block computes about one destination rank.
//
// From topk_idx [T, K] (global expert ids, -1 = none), for destination rank r:
//   is_token_in_rank [T, R]  1 if any of token t's experts lives on r
//   token_slot      [T, R]  position of t among the tokens sent to r (by token
//                           index), -1 if t is not sent to r
//   tokens_per_rank [R]     tokens sent to r
//   tokens_per_expert [E]   (token, expert) pairs per expert of r
//   send_index      [slot]  token index of each slot (optional: the NVLink transport's
//                           list of what r pulls)
// An id outside [-1, E) is ignored and reported once in status word 1 (1 + its flat
// index) by the block of rank 0, so the exchange that follows stays consistent on every
// rank. One block owns every output about its rank, so no output needs zeroing and the
// result does not depend on scheduling.
#pragma once

#include "ep_common.cuh"

namespace ep_jit {

template <int NUM_EXPERTS, int NUM_RANKS, int TOPK, int kThreads>
__device__ __forceinline__ void layout_rank(int rank, const int64_t* __restrict__ topk_idx, int num_tokens,
                                            bool* __restrict__ is_token_in_rank, int* __restrict__ token_slot,
                                            int* __restrict__ tokens_per_rank, int* __restrict__ tokens_per_expert,
                                            int* __restrict__ send_index, const Status& st) {
    static_assert(NUM_EXPERTS % NUM_RANKS == 0, "experts must divide evenly among ranks");
    constexpr int kLocalExperts = NUM_EXPERTS / NUM_RANKS;
    __shared__ int expert_count[kLocalExperts];
    __shared__ int scan_smem[kThreads / kWarpSize + 1];

    const int first_expert = rank * kLocalExperts;
    for (int e = threadIdx.x; e < kLocalExperts; e += kThreads) expert_count[e] = 0;
    __syncthreads();

    int base = 0;
    for (int start = 0; start < num_tokens; start += kThreads) {
        const int t = start + threadIdx.x;
        int hit = 0;
        if (t < num_tokens) {
#pragma unroll
            for (int k = 0; k < TOPK; ++k) {
                const int64_t id = topk_idx[static_cast<int64_t>(t) * TOPK + k];
                if (rank == 0 && (id < -1 || id >= NUM_EXPERTS)) report(st, 1, 1 + t * TOPK + k);
                const int64_t e = id - first_expert;
                if (id >= 0 && id < NUM_EXPERTS && e >= 0 && e < kLocalExperts) {
                    hit = 1;
                    atomicAdd(&expert_count[e], 1);
                }
            }
        }
        int chunk_total;
        const int offset = block_exclusive_scan<kThreads>(hit, &chunk_total, scan_smem);
        if (t < num_tokens) {
            const int64_t at = static_cast<int64_t>(t) * NUM_RANKS + rank;
            is_token_in_rank[at] = hit;
            token_slot[at] = hit ? base + offset : -1;
            if (hit && send_index != nullptr) send_index[base + offset] = t;
        }
        base += chunk_total;
    }
    __syncthreads();
    if (threadIdx.x == 0) tokens_per_rank[rank] = base;
    for (int e = threadIdx.x; e < kLocalExperts; e += kThreads) tokens_per_expert[first_expert + e] = expert_count[e];
}

}  // namespace ep_jit
