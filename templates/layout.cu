// Routing layout as a kernel of its own (the collective transport's first step): block r
// computes everything about destination rank r (layout.cuh).
#include "layout.cuh"

namespace ep_jit {

constexpr int kLayoutThreads = 256;

template <int HIDDEN, int NUM_EXPERTS, int NUM_RANKS, int TOPK, typename T, unsigned long long TAG>
__global__ void __launch_bounds__(kLayoutThreads)
layout_kernel(const int64_t* __restrict__ topk_idx, int num_tokens, bool* __restrict__ is_token_in_rank,
              int* __restrict__ token_slot, int* __restrict__ tokens_per_rank, int* __restrict__ tokens_per_expert,
              Status st) {
    layout_rank<NUM_EXPERTS, NUM_RANKS, TOPK, kLayoutThreads>(blockIdx.x, topk_idx, num_tokens, is_token_in_rank,
                                                             token_slot, tokens_per_rank, tokens_per_expert, nullptr,
                                                             st);
}

}  // namespace ep_jit
