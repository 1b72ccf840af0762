// Combine: expert ranks push their outputs back over NVLink, then each source
// rank reduces the rows of every token in fp32, in rank order (deterministic).
//
// push_kernel    on expert rank r: output row j came from source s at slot
//                j - offset[s]; it is written to s's buffer at combine[r][slot],
//                with 16-byte stores. Waits first until every source has reduced
//                the previous combine.
// reduce_kernel  on source s: out[t] = sum over r with token_slot[t, r] >= 0 of
//                combine[r][token_slot[t, r]], accumulated in fp32.
#include "ep_common.cuh"

namespace ep_jit {

constexpr int kCombineThreads = 512;
using bf16 = __nv_bfloat16;

template <int HIDDEN, int NUM_EXPERTS, int NUM_RANKS, int TOPK, typename T, unsigned long long TAG>
__global__ void __launch_bounds__(kCombineThreads)
push_kernel(const bf16* __restrict__ y, int num_rows, const int* __restrict__ recv_offsets,
            const uint64_t* __restrict__ peers, SymLayout L, int rank, const Sequences* seqs,
            uint64_t timeout_ns, Status st, int* counter) {
    constexpr int kVecs = HIDDEN * sizeof(bf16) / 16;
    __shared__ int offsets[NUM_RANKS + 1];
    if (failed(st)) return;
    const int prev_seq = seqs->combine, seq = prev_seq + 1;
    if (prev_seq != 0 && !block_wait_all<NUM_RANKS>(peers[rank], L, kCombineConsumed, make_flag(TAG, prev_seq),
                                                     timeout_ns, st, kPhaseCombinePush))
        return;
    if (threadIdx.x <= NUM_RANKS) offsets[threadIdx.x] = recv_offsets[threadIdx.x];
    __syncthreads();
    const int total = min(offsets[NUM_RANKS], num_rows);
    const int lane = threadIdx.x % kWarpSize;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / kWarpSize;
    const int num_warps = gridDim.x * blockDim.x / kWarpSize;
    const PeerChunks<NUM_RANKS> chunks(offsets, total, rank);  // spread the pushes over every peer's link
    for (int c = warp; c < chunks.count; c += num_warps) {
        const int dst = chunks.peer(c), begin = chunks.begin(c), end = chunks.end(c);
        for (int j = begin; j < end; ++j) {
            int4* to = sym_ptr<int4>(peers[dst], L.combine) +
                       (static_cast<int64_t>(rank) * L.max_tokens + (j - offsets[dst])) * kVecs;
            warp_copy(to, reinterpret_cast<const int4*>(y) + static_cast<int64_t>(j) * kVecs, kVecs, lane);
        }
    }
    // the combine is recorded done by the reduce kernel, which ends it
    grid_done_post<NUM_RANKS>(counter, gridDim.x, peers, L, kCombinePushed, rank, make_flag(TAG, seq), nullptr, 0);
}

template <int HIDDEN, int NUM_EXPERTS, int NUM_RANKS, int TOPK, typename T, unsigned long long TAG>
__global__ void __launch_bounds__(kCombineThreads)
reduce_kernel(bf16* __restrict__ out, const int* __restrict__ token_slot, int num_tokens,
              const uint64_t* __restrict__ peers, SymLayout L, int rank, Sequences* seqs, uint64_t timeout_ns,
              Status st, int* counter) {
    constexpr int kVecs = HIDDEN * sizeof(bf16) / 16;
    if (failed(st)) return;
    const int seq = seqs->combine + 1;
    const uint64_t my_base = peers[rank];
    if (!block_wait_all<NUM_RANKS>(my_base, L, kCombinePushed, make_flag(TAG, seq), timeout_ns, st,
                                   kPhaseCombineReduce))
        return;
    const int4* rows = sym_ptr<const int4>(my_base, L.combine);
    const int lane = threadIdx.x % kWarpSize;
    const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / kWarpSize;
    const int num_warps = gridDim.x * blockDim.x / kWarpSize;
    for (int t = warp; t < num_tokens; t += num_warps) {
        const int4* from[NUM_RANKS];
#pragma unroll
        for (int r = 0; r < NUM_RANKS; ++r) {
            const int slot = token_slot[static_cast<int64_t>(t) * NUM_RANKS + r];
            from[r] = slot < 0 ? nullptr : rows + (static_cast<int64_t>(r) * L.max_tokens + slot) * kVecs;
        }
        warp_sum_rows<kVecs, NUM_RANKS>(reinterpret_cast<int4*>(out) + static_cast<int64_t>(t) * kVecs, from, lane);
    }
    grid_done_post<NUM_RANKS>(counter, gridDim.x, peers, L, kCombineConsumed, rank, make_flag(TAG, seq),
                              &seqs->combine, seq);
}

}  // namespace ep_jit
