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
//   pair_pos      [T, K]    for pairs whose expert lives on r: the pair's rank among this
//                           source's pairs of that expert, in (token, k) order (optional:
//                           where the expert layout puts it)
// An id outside [-1, E) is ignored and reported once in status word 1 (1 + its flat
// index) by the block of rank 0, so the exchange that follows stays consistent on every
// rank. One block owns every output about its rank, so no output needs zeroing and the
// result does not depend on scheduling.
#pragma once

#include "ep_common.cuh"

namespace ep_jit {

// pair_pos for the kThreads tokens from `start`: each warp ranks its 32 tokens' pairs with
// __match_any_sync (32 pairs at a time, in (token, k) order), then the warps' counts are
// scanned per expert on top of `run` (the pairs of earlier chunks). No atomics: the result
// does not depend on scheduling.
template <int NUM_EXPERTS, int kLocal, int TOPK, int kThreads>
__device__ __forceinline__ void rank_pairs(int first_expert, const int64_t* __restrict__ topk_idx, int start,
                                           int num_tokens, int* __restrict__ pair_pos) {
    constexpr int kWarps = kThreads / kWarpSize;
    constexpr int kPerThread = (kLocal + kThreads - 1) / kThreads;
    static_assert(kThreads * TOPK < 65536, "chunk counts must fit 16 bits");
    __shared__ uint16_t warp_count[kWarps][kLocal];
    __shared__ int run[kLocal];
    const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
    if (start == 0)
        for (int e = threadIdx.x; e < kLocal; e += kThreads) run[e] = 0;
    for (int i = threadIdx.x; i < kWarps * kLocal; i += kThreads) (&warp_count[0][0])[i] = 0;
    __syncthreads();
    const int first_pair = (start + warp * kWarpSize) * TOPK, end_pair = num_tokens * TOPK;
    int local[TOPK], pos[TOPK];
#pragma unroll
    for (int i = 0; i < TOPK; ++i) {
        const int p = first_pair + i * kWarpSize + lane;
        int e = -1;
        if (p < end_pair) {
            const int64_t id = topk_idx[p], l = id - first_expert;
            if (id >= 0 && id < NUM_EXPERTS && l >= 0 && l < kLocal) e = static_cast<int>(l);
        }
        const unsigned same = __match_any_sync(0xffffffffu, e);
        pos[i] = e >= 0 ? warp_count[warp][e] + __popc(same & ((1u << lane) - 1u)) : 0;
        __syncwarp();
        if (e >= 0 && (same >> lane) == 1u) warp_count[warp][e] += __popc(same);  // the group's last lane
        __syncwarp();
        local[i] = e;
    }
    __syncthreads();
    int chunk_total[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
        const int e = threadIdx.x + u * kThreads;
        int sum = 0;
        for (int w = 0; e < kLocal && w < kWarps; ++w) {
            const int c = warp_count[w][e];
            warp_count[w][e] = sum;
            sum += c;
        }
        chunk_total[u] = sum;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < TOPK; ++i)
        if (local[i] >= 0)
            pair_pos[first_pair + i * kWarpSize + lane] = run[local[i]] + warp_count[warp][local[i]] + pos[i];
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kPerThread; ++u)
        if (threadIdx.x + u * kThreads < kLocal) run[threadIdx.x + u * kThreads] += chunk_total[u];
}

template <int NUM_EXPERTS, int NUM_RANKS, int TOPK, int kThreads, bool kRankPairs = false>
__device__ __forceinline__ void layout_rank(int rank, const int64_t* __restrict__ topk_idx, int num_tokens,
                                            bool* __restrict__ is_token_in_rank, int* __restrict__ token_slot,
                                            int* __restrict__ tokens_per_rank, int* __restrict__ tokens_per_expert,
                                            int* __restrict__ send_index, const Status& st,
                                            int* __restrict__ pair_pos = nullptr) {
    static_assert(NUM_EXPERTS % NUM_RANKS == 0, "experts must divide evenly among ranks");
    constexpr int kLocalExperts = NUM_EXPERTS / NUM_RANKS;
    __shared__ int expert_count[kLocalExperts];
    __shared__ int scan_smem[kThreads / kWarpSize + 1];

    const int first_expert = rank * kLocalExperts;
    for (int e = threadIdx.x; e < kLocalExperts; e += kThreads) expert_count[e] = 0;
    __syncthreads();

    int base = 0;
    for (int start = 0; start < num_tokens; start += kThreads) {
        if constexpr (kRankPairs)
            if (pair_pos != nullptr)
                rank_pairs<NUM_EXPERTS, kLocalExperts, TOPK, kThreads>(first_expert, topk_idx, start, num_tokens,
                                                                       pair_pos);
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
