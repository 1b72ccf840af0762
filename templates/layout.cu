// Routing layout as a kernel of its own (the collective transport's first step): block r
// computes everything about destination rank r (layout.cuh).
#include "layout.cuh"

namespace ep_jit {

template <int HIDDEN, int NUM_EXPERTS, int NUM_RANKS, int TOPK, typename T, unsigned long long TAG>
__global__ void __launch_bounds__(kLayoutThreads) layout_kernel(const __grid_constant__ LayoutArgs a) {
    layout_rank<NUM_EXPERTS, NUM_RANKS, TOPK, kLayoutThreads>(blockIdx.x, a.topk_idx, a.num_tokens, a.is_token_in_rank,
                                                             a.token_slot, a.tokens_per_rank, a.tokens_per_expert,
                                                             nullptr, a.status);
}

}  // namespace ep_jit
